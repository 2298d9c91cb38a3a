"""SIGTERM while a job writes its files: unwind, so no half-written or temporary file stays.

evaluate.py and export.py write through ``siamese.exports.atomic_write`` (a hidden
``.<name>.tmp`` renamed into place). Python's default SIGTERM action ends the process where
it stands, leaving those temporaries (megabytes of embeddings); ``stop_on_sigterm`` turns
the signal into an exit that unwinds the writes. (train.py's own stop, with its saves, is
``siamese.callbacks.LastCheckpoint``.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# A second SIGTERM this long after the first ends the process at once (the unwinding may
# hang on a long library call); one sooner is the same stop delivered twice (a process
# group and its launcher both forward it) and does not cut the first one's line short.
INSIST_AFTER_S = 5.0


def end_at_once_if_insisted(first: float) -> None:
    """Python's default SIGTERM action, now, when the first came ``INSIST_AFTER_S`` ago."""
    if time.monotonic() - first >= INSIST_AFTER_S:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def owns_default_sigterm() -> bool:
    """Whether a handler may be put in for SIGTERM here: only Python's default action is
    replaced (never a handler a job runner installed), and only the main thread can."""
    return (
        threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    )


@contextlib.contextmanager
def stop_on_sigterm(out_dir: Path, doing: str, script: str) -> Iterator[None]:
    """SIGTERM ends the block by unwinding it (SystemExit 143, one ``stopped:`` line), so the
    files being written remove their temporaries; Python's default action would end the
    process where it stands and leave megabytes of hidden ``.*.tmp`` files. Only Python's
    default action is replaced (not a handler a job runner installed)."""
    if not owns_default_sigterm():
        yield
        return
    got: list[int] = []
    first = time.monotonic()  # when the signal came (set by it)

    def stop(signum: int, frame: Any) -> None:
        nonlocal first
        if got:
            end_at_once_if_insisted(first)
            return
        got.append(signum)
        first = time.monotonic()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
        if got:  # raised inside a library's callback, which made it an error and dropped it
            raise SystemExit(128 + got[0])
    except BaseException:
        if not got:
            raise
        # Whatever the exit became on its way out (faiss and torch turn an exception in the
        # file writes they call back into a RuntimeError), it was the signal.
        print(
            f"stopped: {signal.Signals(got[0]).name} while {doing}; no half-written or "
            f"temporary file was left in {out_dir}: run {script} again",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(128 + got[0]) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
