"""What every source shares: config-value checks, the download root, tidying a failed download."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

from siamese.errors import ConfigError, DataError


def check_count(key: str, value: int) -> int:
    """``value`` as a count (a whole number >= 0); a ConfigError names ``data.source.<key>``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"data.source.{key} must be a whole number >= 0, got {value!r}")
    return value


def check_seed(value: int) -> int:
    """``value`` as a split seed (an int, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"data.source.seed must be an integer, got {value!r}")
    return value


def check_image_size(key: str, value: int | Sequence[int]) -> tuple[int, int]:
    """An int side or a (height, width) pair (a list from YAML) as a tuple."""
    try:
        pair = (value, value) if isinstance(value, int) else tuple(value)
    except TypeError:
        pair = ()
    if len(pair) != 2 or not all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in pair
    ):
        raise ConfigError(
            f"data.source.{key} must be a positive int or [height, width], got {value!r}"
        )
    return int(pair[0]), int(pair[1])


@contextlib.contextmanager
def tidy_on_failure(*folders: str) -> Iterator[None]:
    """If the block fails, remove those of ``folders`` (outermost first) that it created
    and left empty: a failed download leaves no empty ``root/FashionMNIST/raw`` behind."""
    new = [f for f in folders if not os.path.exists(f)]
    try:
        yield
    except BaseException:
        for folder in reversed(new):
            with contextlib.suppress(OSError):  # not empty, or not there: leave it
                os.rmdir(folder)
        raise


def download_root(root: str | os.PathLike | None, what: str) -> str:
    """``root`` as the folder ``what`` is read from and downloaded into (made when missing)."""
    if root is None:
        raise DataError(
            f"data.root is not set; {what} is read from (and downloaded into) data.root, "
            "so pass data.root=PATH"
        )
    path = os.path.expanduser(os.fspath(root))
    if os.path.exists(path) and not os.path.isdir(path):
        raise DataError(
            f"data.root {path!r} is not a directory; pass a folder for {what} to live in"
        )
    return path
