"""Command-line plumbing shared by the entry points: one-line errors and override checks."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from siamese.config import user_error_in

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EXIT_USER_ERROR = 2


def fail(message: str) -> None:
    """Print ``error: message`` on one line to stderr and exit with status 2."""
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def report_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a SiameseError raised by ``fn`` into one line and a non-zero exit."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            cause = user_error_in(exc)  # also unwraps Hydra's InstantiationException
            if cause is None:
                raise
            fail(str(cause))

    return wrapper


def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str] | None:
    """The options of a config group, or None when ``group`` is not a group folder."""
    folder = conf_dir / group
    if not folder.is_dir():
        return None
    return sorted(p.stem for p in folder.glob("*.yaml"))


def check_group_overrides(argv: Sequence[str], conf_dir: Path = CONF_DIR) -> None:
    """Fail with one line for ``group=option`` where the option does not exist.

    Hydra's own report spans a dozen lines; this catches the common typo first. Sweep lists
    (``loss=contrastive,triplet``) are checked item by item; sweep functions are left to Hydra.
    """
    for arg in argv:
        if arg.startswith(("-", "+", "~")) or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        # hydra/... groups also take options that plugins register (hydra/launcher=submitit_local).
        if "." in key or key.startswith("hydra/") or "(" in value or "*" in value:
            continue
        options = group_options(key, conf_dir)
        if options is None:
            continue
        if value == "null":  # Hydra's answer is a traceback
            fail(f"{key}=null cannot drop a config group; write ~{key} to run without one")
        for item in value.split(","):
            if item and item not in options:
                fail(f"unknown {key}={item}; choose one of: {', '.join(options)}")
