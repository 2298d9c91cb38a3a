"""Stops on signals: SIGTERM, Ctrl-C and the requeue signal, while fitting, testing or writing.

- ``StopSignals`` (a callback): training stops at the end of the batch a SIGTERM or Ctrl-C
  came in, with ``last.ckpt`` written there (every DDP process agreeing first), and a
  requeue signal goes on to its handler once ``last.ckpt`` is written. The periodic
  ``last.ckpt`` saves are configuration (``ModelCheckpoint`` with ``monitor: null``); this
  writes the same file, found from the trainer's callbacks.
- ``exit_on_stop_signal`` / ``sigterm_stops_outside_fit``: train.py's stages end with one
  ``stopped:`` line and exit ``128 + signal`` (143, 130 for Ctrl-C), never 0.
- ``stop_on_sigterm``: evaluate.py and export.py unwind their writes on SIGTERM, so no
  half-written or temporary file stays.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
import threading
import time
from collections.abc import Iterator
from numbers import Integral
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from siamese.errors import ConfigError

log = logging.getLogger(__name__)

# A second SIGTERM this long after the first ends the process at once (the unwinding may
# hang on a long library call); one sooner is the same stop delivered twice (a process
# group and its launcher both forward it) and does not cut the first one's line short.
INSIST_AFTER_S = 5.0


def exit_status(signum: int) -> int:
    """``128 + signum``: what a shell reports for a process a signal stopped (130, 143)."""
    return 128 + int(signum)


def parse_signal(name: str | int | None) -> signal.Signals | None:
    """``SIGUSR2``, ``USR2`` or a number as a signal; None for none."""
    if name is None or (isinstance(name, str) and name.strip().lower() in ("", "none", "null")):
        return None
    try:
        if isinstance(name, Integral) or str(name).isdigit():
            return signal.Signals(int(name))
        text = str(name).strip().upper()
        return signal.Signals[text if text.startswith("SIG") else f"SIG{text}"]
    except (KeyError, ValueError):
        raise ConfigError(
            f"checkpoints.requeue_signal={name!r} is not a signal; use SIGUSR2 (what "
            "submitit sends), another name such as SIGUSR1, or null"
        ) from None


class StopSignalled(SIGTERMException):
    """A run stopped for a signal (``signum``) at a batch's or epoch's end: while fitting with
    ``last.ckpt`` written there, while testing with nothing to save. A ``SIGTERMException``
    (a ``SystemExit``), as Lightning's own stop for SIGTERM, so Lightning runs its interrupt
    hooks and tears down the same way."""

    def __init__(self, signum: int) -> None:
        super().__init__(exit_status(signum))
        self.signum = int(signum)


def last_checkpoint_path(trainer: pl.Trainer) -> Path:
    """Where the trainer's periodic ``last.ckpt`` goes: the file of its first
    ``ModelCheckpoint`` with no monitor (``callbacks.last_checkpoint``)."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.monitor is None:
            return Path(callback.format_checkpoint_name({}))
    raise ConfigError(
        "callbacks.stop_signals writes last.ckpt where a ModelCheckpoint with monitor: null "
        "writes it, and there is none; keep callbacks.last_checkpoint (or remove "
        "callbacks.stop_signals too)"
    )


class StopSignals(Callback):
    """Write ``last.ckpt`` at the end of the batch a stop or requeue signal came in, then stop
    (or hand the requeue signal on), so a job about to be stopped loses nothing.

    ``last.ckpt`` is the file of the trainer's ``ModelCheckpoint`` with ``monitor: null``
    (``last_checkpoint_path``), written through the trainer's checkpoint IO (temporary file,
    fsync, rename) as that callback's periodic saves are.

    On ``SIGTERM`` (a pre-emption, a ``kill``) training stops after the running training
    batch, with ``last.ckpt`` written at its end. Under DDP, Lightning 2.6's SIGTERM handler
    broadcasts from inside the signal handler, which can meet another rank's gradient
    all-reduce and hang every process; while fitting, the handler here only notes the
    signal, and at each training batch's end (and epoch's end) the processes agree with one
    tiny all-reduce whether any of them got it, then all save and stop together (Lightning
    already reads a flag back from the device at every DDP step). The test after fitting
    stops at a test batch's end too, nothing saved (training has finished): under DDP agreed
    the same way, with one process also at the last batch, where Lightning's own check lets
    the test go on. The sanity check before training is not covered under DDP.

    Ctrl-C (``SIGINT``) while fitting is handled the same way: the first press says that
    training stops at the end of the running training batch (after validation, if it is
    running) with ``last.ckpt`` written, and it does (under DDP every process, as with
    SIGTERM); a second press stops at once, unsaved, as Lightning does (its "graceful
    shutdown"). Only Python's default SIGINT handler is replaced (not an ignored SIGINT, as
    in a background job, nor another handler). Either stop raises ``StopSignalled``.

    When ``requeue_signal`` already has a Python handler as training starts (submitit
    installs one for ``SIGUSR2``, which SLURM sends ``signal_delay_s`` before a time limit
    or a pre-emption), the signal is held until the running training batch ends (during
    validation: the epoch), ``last.ckpt`` is written, and then it goes on to that handler
    (submitit requeues the job and exits; ``ckpt_path=auto`` resumes at that step). Only
    rank 0 writes there, with no barrier: submitit signals ranks apart, and only rank 0
    requeues. A signal with no handler keeps its default action.

    Args:
        requeue_signal: the signal name (``SIGUSR2``) to save on before its handler runs, or
            null for none.
    """

    def __init__(self, requeue_signal: str | None = "SIGUSR2") -> None:
        super().__init__()
        self.requeue_signal = parse_signal(requeue_signal)
        self.path: Path | None = None  # last.ckpt, found as training starts
        self._handed_on: Any = None  # the handler the signal goes on to, while held
        self._held: tuple[int, Any] | None = None  # (signum, frame) of a held signal
        self._lightning_sigterm: Any = None  # Lightning's SIGTERM handler, while replaced
        self._int_handler: Any = None  # Python's SIGINT handler, while replaced
        self._noted = 0  # the stop signal this process got while fitting (0: none)
        self._pressed = False  # Ctrl-C was pressed once while fitting
        self._says = False  # this process prints the Ctrl-C line (rank 0)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            last_checkpoint_path(trainer)  # none to write: refused before any batch

    def _save(self, trainer: pl.Trainer, barrier: bool = True) -> None:
        path = self.path or last_checkpoint_path(trainer)
        if barrier:
            trainer.save_checkpoint(path, weights_only=False)
        else:  # rank 0 alone: Trainer.save_checkpoint would wait for the others
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.save_checkpoint(checkpoint, path)

    # -- the requeue signal ----------------------------------------------------------------
    def _hold(self, signum: int, frame: Any) -> None:
        if self._held is None:
            self._held = (signum, frame)

    def _give_back_requeue_signal(self) -> None:
        if self._handed_on is not None:
            signal.signal(self.requeue_signal, self._handed_on)
            self._handed_on = None

    def _release(self) -> None:
        """Give the signals back to their handlers, dropping a held one."""
        self._held = None
        self._give_back_requeue_signal()
        if self._lightning_sigterm is not None:
            signal.signal(signal.SIGTERM, self._lightning_sigterm)
            self._lightning_sigterm = None
        if self._int_handler is not None:
            # After a second Ctrl-C Lightning ignores SIGINT until its teardown puts back the
            # handlers it found: leave that to it.
            if signal.getsignal(signal.SIGINT) == self._note_interrupt:
                signal.signal(signal.SIGINT, self._int_handler)
            self._int_handler = None

    def _hand_on(self, trainer: pl.Trainer) -> None:
        handler, held = self._handed_on, self._held
        if held is None or not callable(handler):
            return
        self._held = None
        self._give_back_requeue_signal()
        if trainer.is_global_zero:
            log.info(
                "%s: last.ckpt written at step %d; handing the signal on",
                signal.Signals(held[0]).name,
                trainer.global_step,
            )
        handler(*held)

    # -- SIGTERM under DDP, and Ctrl-C ------------------------------------------------------
    def _note_sigterm(self, signum: int, frame: Any) -> None:
        self._noted = max(self._noted, signum)  # no collective here: this rank may be in one

    def _note_interrupt(self, signum: int, frame: Any) -> None:
        if self._pressed:  # the second press: stop at once, as Lightning does
            signal.default_int_handler(signum, frame)
        self._pressed = True
        self._noted = max(self._noted, signum)
        if self._says:  # os.write: a print could land inside another write to stderr
            os.write(
                2,
                b"\nCtrl-C: training stops at the end of this batch (after validation, if it "
                + f"is running) with {self.path} written; press "
                "Ctrl-C again to stop at once without saving\n".encode(),
            )

    def _stop_agreed(self, trainer: pl.Trainer) -> int:
        """The signal training stops for now (0: none). Under DDP every rank calls this at the
        same points, and one all-reduce tells them all whether any rank got one."""
        if self._lightning_sigterm is None:
            if self._noted:
                return self._noted
            return signal.SIGTERM if trainer.received_sigterm else 0
        flag = torch.tensor([float(self._noted)], device=trainer.strategy.root_device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())

    def _stop_for(self, trainer: pl.Trainer, signum: int, saved: bool = True) -> None:
        if trainer.is_global_zero:
            log.info(
                "%s: %s; stopping %d process(es)",
                signal.Signals(signum).name,
                f"last.ckpt written at step {trainer.global_step}" if saved else "while testing",
                trainer.world_size,
            )
        raise StopSignalled(signum)  # on every rank at the same point: the way Lightning stops

    def _note_sigterm_under_ddp(self, trainer: pl.Trainer) -> None:
        if trainer.world_size > 1 and torch.distributed.is_initialized():
            self._lightning_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._note_sigterm)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = last_checkpoint_path(trainer)
        if threading.current_thread() is not threading.main_thread():
            return
        sig = self.requeue_signal
        handler = signal.getsignal(sig) if sig is not None else None
        if callable(handler) and handler != self._hold:
            self._handed_on = handler
            signal.signal(sig, self._hold)
        self._noted, self._pressed = 0, False
        self._note_sigterm_under_ddp(trainer)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._says = trainer.is_global_zero
            self._int_handler = signal.default_int_handler
            signal.signal(signal.SIGINT, self._note_interrupt)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hand_on(trainer)
        self._release()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._release()  # the run is stopping; the handlers are back for what follows

    # Testing (train.py tests after fitting): SIGTERM stops at a test batch's end, the last
    # one included (Lightning's own check skips it and would score the whole split). Under
    # DDP it is noted and agreed there, as while fitting (every process has the same number
    # of test batches), so Lightning's broadcast inside its handler cannot meet the
    # embeddings' gather. Nothing is saved: training has finished. A Ctrl-C is Lightning's.
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self._noted = 0
            self._note_sigterm_under_ddp(trainer)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        stop = self._stop_agreed(trainer)  # DDP: every rank, every test batch
        if stop:
            self._stop_for(trainer, stop, saved=False)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._release()

    # Fitting: this callback runs before every ModelCheckpoint (Lightning runs checkpoint
    # callbacks last), so a stop saves here and the periodic saves of this point never run.
    def _save_and_stop(self, trainer: pl.Trainer) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        stop = self._stop_agreed(trainer)  # DDP: every rank, every batch and epoch end
        if stop or self._held is not None:
            # A stop reaches every rank here together (DDP) or there is one process; a
            # requeue signal may have reached rank 0 alone.
            self._save(trainer, barrier=bool(stop))
        self._hand_on(trainer)
        if stop:
            self._stop_for(trainer, stop)

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._save_and_stop(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_and_stop(trainer)  # a signal got during validation stops here


# -- train.py's stages: one line and exit 128 + the signal --------------------------------
@contextlib.contextmanager
def exit_on_stop_signal(
    trainer: pl.Trainer, output_dir: Path, doing: str, hint: str | None = None
) -> Iterator[None]:
    """Say where a stage stopped for a signal and what ``last.ckpt`` holds (or ``hint``), and
    exit 128 + the signal's number (143 for SIGTERM, 130 for Ctrl-C).

    Lightning ends a stage it got SIGTERM in with ``SIGTERMException``, a SystemExit that
    would exit 0, as if the run had finished; ``StopSignals`` stops the same way for SIGTERM
    under DDP and for a Ctrl-C, after writing ``last.ckpt`` at the end of that batch, and
    ``sigterm_stops_outside_fit`` outside fit. A second Ctrl-C is Lightning's own stop
    (exit status 1 after its "graceful shutdown"), reported here too."""
    try:
        yield
        # Lightning notes a SIGTERM that comes after its last check (in on_train_end, the
        # last test batch, the scoring of the split) and returns as if nothing came.
        if trainer.received_sigterm:
            raise StopSignalled(signal.SIGTERM)
    except SIGTERMException as stop:
        signum = getattr(stop, "signum", signal.SIGTERM)  # Lightning's own: SIGTERM
        say_stopped(trainer, output_dir, doing, signum, hint)
        raise SystemExit(exit_status(signum)) from None
    except SystemExit as stop:
        if stop.code != 1 or not trainer.interrupted:
            raise
        # Lightning's KeyboardInterrupt
        say_stopped(trainer, output_dir, doing, signal.SIGINT, hint)
        raise SystemExit(exit_status(signal.SIGINT)) from None


@contextlib.contextmanager
def sigterm_stops_outside_fit(trainer: pl.Trainer) -> Iterator[None]:
    """SIGTERM raises ``StopSignalled`` at once wherever a stop loses nothing, as a Ctrl-C
    does: between and after Lightning's stages (it gives its handlers back at each stage's
    end, before ``on_fit_end``, where Python's default would end the process without a
    word) and, with one process, while testing (Lightning only notes the signal there, and
    scores the whole split when it came in the last batch). While fitting the stop waits for
    the training batch's end, where last.ckpt is written (Lightning and ``StopSignals``);
    under DDP a test stops at an agreed test batch's end (``StopSignals``).

    Only Python's default SIGTERM action is replaced (not a handler a job runner installed).
    Inside a stage Lightning's handler calls this one after its own."""
    if not owns_default_sigterm():
        yield
        return
    fired: list[float] = []  # when this handler stopped the run

    def stop(signum: int, frame: Any) -> None:
        between = signal.getsignal(signal.SIGTERM) is stop  # no stage's handler in place
        if fired:
            end_at_once_if_insisted(fired[0])
        elif between or (trainer.testing and trainer.world_size == 1):
            fired.append(time.monotonic())
            raise StopSignalled(signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def say_stopped(
    trainer: pl.Trainer, output_dir: Path, doing: str, signum: int, hint: str | None = None
) -> None:
    """The ``stopped:`` line (rank 0): the signal, the stage, where, and how to go on."""
    if trainer.is_global_zero:
        name = "Ctrl-C (SIGINT)" if signum == signal.SIGINT else signal.Signals(signum).name
        print(
            f"stopped: {name} while {doing}, at epoch {trainer.current_epoch}, step "
            f"{trainer.global_step}; {hint or resume_hint(output_dir)}",
            file=sys.stderr,
            flush=True,
        )


def after_training_hint(output_dir: Path, best: str | None) -> str:
    """After training: the checkpoints are complete; how to get the test it did not finish."""
    if not best:
        return resume_hint(output_dir)
    return (
        f"its checkpoints are complete: test with python evaluate.py ckpt_path={best} (or "
        f"rerun with ckpt_path=last hydra.run.dir={output_dir})"
    )


def resume_hint(output_dir: Path) -> str:
    """What the run folder's ``checkpoints/last.ckpt`` holds and the command resuming it."""
    last = output_dir / "checkpoints" / "last.ckpt"  # what ckpt_path=last resumes
    try:  # mmap: only the two numbers are read
        saved = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        where = f"epoch {saved['epoch']}, step {saved['global_step']}"
    except (OSError, RuntimeError, KeyError, pickle.UnpicklingError):
        # A plain re-run into this folder is refused (it holds a run): auto lets it in and,
        # finding no last.ckpt, starts over there.
        return (
            f"no readable {last} was written: start over with the same command and "
            f"ckpt_path=auto hydra.run.dir={output_dir}"
        )
    return (
        f"checkpoints/last.ckpt holds {where}: resume with ckpt_path=last "
        f"hydra.run.dir={output_dir}"
    )


# -- evaluate.py and export.py: SIGTERM unwinds the writes --------------------------------
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
    files being written (``siamese.exports.atomic_write``) remove their hidden ``.*.tmp``
    temporaries; Python's default action would end the process where it stands and leave
    megabytes of them. Only Python's default action is replaced (not a handler a job runner
    installed)."""
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
        raise SystemExit(exit_status(signum))

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
        if got:  # raised inside a library's callback, which made it an error and dropped it
            raise SystemExit(exit_status(got[0]))
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
        raise SystemExit(exit_status(got[0])) from None
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
