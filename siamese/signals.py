"""SIGTERM while a job writes its files: unwind, so no half-written or temporary file stays.

evaluate.py and export.py write through ``siamese.exports.atomic_write`` (a hidden
``.<name>.tmp`` renamed into place). Python's default SIGTERM action ends the process where
it stands, leaving those temporaries (megabytes of embeddings); ``stop_on_sigterm`` turns
the signal into an exit that unwinds the writes. (train.py's own stop, with its saves, is
``siamese.callbacks.LastCheckpoint``.)
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def stop_on_sigterm(out_dir: Path, doing: str, script: str) -> Iterator[None]:
    """SIGTERM ends the block by unwinding it (SystemExit 143, one ``stopped:`` line), so the
    files being written remove their temporaries; Python's default action would end the
    process where it stands and leave megabytes of hidden ``.*.tmp`` files. Only Python's
    default action is replaced (not a handler a job runner installed)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    got: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if not got:  # a second SIGTERM does not cut the unwinding of the first short
            got.append(signum)
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
