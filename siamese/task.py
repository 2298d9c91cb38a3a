"""The one task wrapper of the entry points: errors become one line and an exit status here.

Code under ``siamese/`` raises; only this module exits (lightning-hydra-template's
``task_wrapper``). ``task_wrapper`` wraps the task function inside ``hydra.main``; ``run``
calls that main, with Hydra told to re-raise (``HYDRA_FULL_ERROR``) so that its composition
errors reach ``siamese.cli``'s formatter instead of its own several-line report.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from siamese.config import user_error_in

EXIT_USER_ERROR = 2
EXIT_SIGINT = 128 + 2  # 130, as a shell reports a process stopped by SIGINT
CTRL_C_LINE = "stopped: Ctrl-C (SIGINT) before the run finished; run it again to start over"


class TaskExit(BaseException):
    """A single run's user error on its way out of Hydra's ``run_job`` (which would print a
    line of its own for an Exception) to ``run``; a BaseException, as SystemExit is."""

    def __init__(self, line: str) -> None:
        super().__init__(line)
        self.line = line


def _sweep_job_dir() -> Path | None:
    """The directory of the sweep job this process runs; None in a single run."""
    from hydra.core.hydra_config import HydraConfig

    from siamese.console import in_sweep

    return Path(HydraConfig.get().runtime.output_dir) if in_sweep() else None


def task_wrapper(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The task function's wrapper. In a single run a user error (a SiameseError, also
    inside Hydra's InstantiationException) leaves as ``TaskExit``. In a sweep every error
    stays an exception, for Hydra's ``JobReturn`` (SweepSummary records the job as failed),
    and a job whose process stops inside it (Ctrl-C, a signal's exit) is recorded stopped."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from siamese.console import quiet_console

        quiet_console()  # Hydra has set up logging: library chatter to the log file only
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            cause = user_error_in(exc)
            if cause is None or _sweep_job_dir() is not None:
                raise
            raise TaskExit(f"error: {cause}") from None
        except (KeyboardInterrupt, SystemExit) as stop:
            job_dir = _sweep_job_dir()
            if job_dir is not None:
                from siamese.sweeps import write_job_status

                how = "Ctrl-C (SIGINT)" if isinstance(stop, KeyboardInterrupt) else None
                how = how or f"the process exited with status {stop.code} (a signal or a requeue)"
                write_job_status(job_dir, "stopped", how)
            raise

    return wrapper


def _print_unfinished_sweep(ended: str) -> None:
    """The summary table of a sweep that ended with an error or a stop, as its end would."""
    from siamese.sweeps import unfinished_summary

    table = unfinished_summary(ended)
    if table:
        print(table, flush=True)


def report_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as an entry point runs its task: a user error is one line and exit 2, Ctrl-C
    one line and exit 130 (for code that calls a pipeline outside Hydra, and tests)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return run(lambda: task_wrapper(fn)(*args, **kwargs), "train", [])

    return wrapper


def run(main: Callable[[], Any], config_name: str, argv: Sequence[str] | None = None) -> Any:
    """Call a ``hydra.main`` function and end the process as its outcome says: a user error
    or a config Hydra refuses is ``error: ...`` on stderr and exit 2, Ctrl-C one line and
    exit 130; anything else (a bug) keeps its traceback."""
    from hydra._internal.utils import get_args_parser

    argv = list(sys.argv[1:] if argv is None else argv)
    parsed = get_args_parser().parse_known_args(argv)[0]
    overrides, name = list(parsed.overrides or []), parsed.config_name or config_name
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises: the formatter words its errors
    from siamese.composition import group_set_as_value

    line = group_set_as_value(overrides)
    if line is not None:
        _exit(f"error: {line}", EXIT_USER_ERROR)
    try:
        return main()
    except TaskExit as stop:
        _exit(stop.line, EXIT_USER_ERROR)
    except KeyboardInterrupt:
        _print_unfinished_sweep("stopped by Ctrl-C")
        _exit(CTRL_C_LINE, EXIT_SIGINT)
    except SystemExit:
        _print_unfinished_sweep("stopped")
        raise
    except Exception as exc:
        _print_unfinished_sweep("ended by a failed job")
        cause = user_error_in(exc)
        if cause is not None:
            _exit(f"error: {cause}", EXIT_USER_ERROR)
        from siamese.cli import hydra_error_line

        line = hydra_error_line(exc, name, overrides)
        if line is None:
            raise
        _exit(f"error: {line}", EXIT_USER_ERROR)


def _exit(line: str, status: int) -> None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(status)
