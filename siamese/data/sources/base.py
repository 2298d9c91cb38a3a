"""What every source shares: config-value checks, the download root, tidying a failed download."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence

from siamese.checks import check_int_setting, image_size, is_int
from siamese.errors import ConfigError, DataError


def check_count(key: str, value: int) -> int:
    """``value`` as a count (a whole number >= 0); a ConfigError names ``data.source.<key>``."""
    return check_int_setting(f"data.source.{key}", value, 0, expected="a whole number >= 0")


def check_seed(value: int) -> int:
    """``value`` as a split seed (an int, not a bool)."""
    if not is_int(value):
        raise ConfigError(f"data.source.seed must be an integer, got {value!r}")
    return int(value)


def check_image_size(key: str, value: int | Sequence[int]) -> tuple[int, int]:
    """An int side or a (height, width) pair (a list from YAML) as a tuple."""
    return image_size(f"data.source.{key}", value)


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
