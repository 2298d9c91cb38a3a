"""Faults: a resumed sampler skips exactly the batches already trained; a save interrupted or
refused by the disk leaves the previous checkpoint intact; stop signals write last.ckpt."""

from __future__ import annotations

import errno
import os
import signal
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import ROOT, TESTING_STOPPED, assert_fragments, compose_train
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, TensorDataset

from siamese.callbacks.signals import (
    StopSignals,
    exit_on_stop_signal,
    parse_signal,
    resume_hint,
    sigterm_stops_outside_fit,
)
from siamese.checkpointing import AtomicCheckpointIO, CheckpointWriteError
from siamese.config import build
from siamese.data.samplers import ClassBalancedBatchSampler
from siamese.errors import ConfigError


def last_ckpt(run_dir: Path, every: int | None = None) -> list[Callback]:
    """conf/callbacks/default.yaml's last.ckpt callbacks (the periodic saves at epoch ends and
    every ``every`` steps, and the signal saves), writing ``run_dir/checkpoints/last.ckpt``."""
    cfg = compose_train([f"checkpoints.every_n_train_steps={every or 'null'}"], run_dir)
    names = ("last_checkpoint", "last_checkpoint_steps", "stop_signals")
    return [build(cfg.callbacks[name]) for name in names]


def test_a_resumed_sampler_skips_exactly_the_batches_already_trained():
    targets = torch.arange(200) % 10
    whole = ClassBalancedBatchSampler(targets, 20, 4, seed=3)
    whole.set_epoch(2)
    epoch = list(whole)
    resumed = ClassBalancedBatchSampler(targets, 20, 4, seed=3)
    resumed.resume(2, 3)  # what the checkpoint's loader state says
    resumed.set_epoch(2)  # the module's epoch start must not undo it
    assert list(resumed) == epoch[3:]
    assert list(resumed) == epoch  # only the first iteration after a resume skips
    finished = ClassBalancedBatchSampler(targets, 20, 4, seed=3)
    finished.resume(2, len(epoch))  # an epoch-end checkpoint goes on with the next epoch
    whole.set_epoch(3)
    assert list(finished) == list(whole)


def test_a_failed_write_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, path)

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError) as err:
        io.save_checkpoint({"step": torch.tensor(2)}, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "No space left on device" in message and "previous checkpoint there is intact" in message
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary left


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_a_kill_during_the_write_leaves_the_old_file(tmp_path: Path):
    """A child process is killed while torch.save is half way through the new checkpoint."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(1)}, path)
    script = f"""
import os, signal, torch
from siamese.checkpointing import AtomicCheckpointIO
real = torch.save
def dying_save(obj, f, *a, **k):
    f.write(b"x" * 4096)
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = dying_save
AtomicCheckpointIO().save_checkpoint({{"step": torch.tensor(2)}}, {str(path)!r})
"""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(path, weights_only=True)["step"] == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftovers == [".last.ckpt.tmp"]  # the next save replaces it
    AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(3)}, path)
    assert torch.load(path, weights_only=True)["step"] == 3


class _RunsCode:
    """What an attacker puts in a checkpoint: unpickling it would call os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path):
    import siamese
    from siamese.errors import ConfigError
    from siamese.pipelines.train import resolve_ckpt_path

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": _RunsCode(marker)}, evil)
    for load in (lambda: siamese.load(evil), lambda: resolve_ckpt_path(str(evil), tmp_path)):
        with pytest.raises(ConfigError) as err:
            load()
        message = str(err.value)
        assert "\n" not in message and str(evil) in message
        assert "holds pickled Python objects (posix.system) that would run code" in message
    assert not marker.exists()


def test_a_folder_passed_as_ckpt_path_names_the_checkpoint_to_pass(tmp_path: Path):
    import siamese
    from siamese.errors import ConfigError
    from siamese.pipelines.train import resolve_ckpt_path

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError) as err:
        siamese.load(empty)
    assert_fragments(
        str(err.value),
        f"ckpt_path={str(empty)!r} is a folder, not a checkpoint",
        "it holds no .ckpt file",
        "pass a checkpoint file written by train.py",
    )
    (run / "checkpoints" / "best.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        siamese.load(run)
    assert_fragments(
        str(err.value),
        f"ckpt_path={str(run)!r} is a folder, not a checkpoint",
        f"e.g. ckpt_path={run / 'checkpoints' / 'best.ckpt'}",
    )
    with pytest.raises(ConfigError, match=r"e\.g\. ckpt_path=.*best\.ckpt$"):
        resolve_ckpt_path(str(run), tmp_path)  # no last.ckpt: nothing to resume
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        resolve_ckpt_path(str(run), tmp_path)
    assert_fragments(
        str(err.value),
        f"ckpt_path={str(run)!r} is a run folder, not a checkpoint",
        f"resume it with ckpt_path=last hydra.run.dir={run}",
    )


def test_resuming_into_another_model_is_one_line_naming_the_first_difference():
    from siamese.errors import ConfigError
    from siamese.module import check_same_model

    saved = {"head.weight": torch.zeros(64, 256), "head.bias": torch.zeros(64)}
    check_same_model(saved, {k: v.clone() for k, v in saved.items()})  # the same: no error
    tail = (
        "resume with the run's own model, distance and loss settings (ckpt_path=last or auto "
        "reuses the run's own, saved in the checkpoint), or start a new run"
    )
    cases = [
        (
            {"head.weight": torch.zeros(32, 256), "head.bias": torch.zeros(32)},
            "head.weight is 64x256 there and 32x256 here; 2 tensors differ",
        ),
        ({**saved, "distance.head.bias": torch.zeros(())}, "distance.head.bias is not in it; 1"),
        ({"head.weight": saved["head.weight"]}, "it has head.bias, which this model lacks; 1"),
    ]
    for own, first in cases:
        with pytest.raises(ConfigError) as err:
            check_same_model(saved, own)
        count = "" if "tensors differ" in first else " tensor differs"
        assert_fragments(
            str(err.value), f"the checkpoint holds another model ({first}{count})", tail
        )


class _Tiny(pl.LightningModule):
    """A linear layer on random numbers: just enough for Lightning's loops and checkpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _SignalWhen(Callback):
    """Sends a signal to this process at one hook: a training batch's start, or validation."""

    def __init__(self, hook: str, step: int, signum: int = signal.SIGUSR2) -> None:
        self.hook, self.step, self.signum = hook, step, signum

    def _maybe(self, trainer: pl.Trainer, hook: str) -> None:
        if hook == self.hook and trainer.global_step == self.step and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._maybe(trainer, "batch")

    def on_validation_start(self, trainer, pl_module):
        self._maybe(trainer, "validation")


@pytest.mark.parametrize(
    ("hook", "step", "saved_at"),
    [("batch", 3, 4), ("validation", 5, 5)],  # 5 batches an epoch
)
def test_a_requeue_signal_writes_last_ckpt_before_its_handler_runs(
    tmp_path: Path, hook: str, step: int, saved_at: int
):
    """submitit's handler requeues and exits at once; StopSignals holds the signal until
    the running batch (or the epoch, during validation) ends and last.ckpt is written."""
    last = tmp_path / "checkpoints" / "last.ckpt"
    seen: list[tuple[int, int, int]] = []

    def requeue_and_exit(signum, frame):  # what submitit's handler does on rank 0
        saved = torch.load(last, weights_only=True)
        seen.append((signum, saved["global_step"], saved["epoch"]))
        raise SystemExit(-1)

    before = signal.signal(signal.SIGUSR2, requeue_and_exit)
    try:
        trainer = pl.Trainer(
            max_epochs=3,
            limit_train_batches=5,
            limit_val_batches=1,
            callbacks=[*last_ckpt(tmp_path), _SignalWhen(hook, step)],
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            plugins=[AtomicCheckpointIO()],
        )
        data = DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=4)
        with pytest.raises(SystemExit):
            trainer.fit(_Tiny(), data, data)
        assert seen == [(signal.SIGUSR2, saved_at, 0)]  # epoch 0's end is still epoch 0
        assert signal.getsignal(signal.SIGUSR2) is requeue_and_exit
    finally:
        signal.signal(signal.SIGUSR2, before)


def test_a_signal_with_no_handler_is_left_alone(tmp_path: Path):
    during: list = []

    class Look(Callback):
        def on_train_batch_end(self, trainer, *args):
            during.append(signal.getsignal(signal.SIGUSR2))

    before = signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    try:
        trainer = pl.Trainer(
            max_epochs=1,
            limit_train_batches=2,
            callbacks=[*last_ckpt(tmp_path), Look()],
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(_Tiny(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4))
    finally:
        signal.signal(signal.SIGUSR2, before)
    assert during == [signal.SIG_DFL, signal.SIG_DFL]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2


class _Validated(_Tiny):
    """_Tiny that counts its validations (the sanity check left out)."""

    def __init__(self) -> None:
        super().__init__()
        self.validated = 0

    def on_validation_epoch_end(self) -> None:
        self.validated += not self.trainer.sanity_checking

    def on_save_checkpoint(self, checkpoint) -> None:
        checkpoint["validated"] = self.validated


def test_last_ckpt_is_written_every_n_steps_and_after_each_epochs_validation(tmp_path: Path):
    """Every 2 steps of 4-step epochs: a step save falls on each epoch's last batch, before
    its validation, and the epoch's end still writes last.ckpt after it (one
    ModelCheckpoint would skip a second save at the same step); one file, no last-v1.ckpt."""
    saves: list[tuple[int, int]] = []

    class Saves(Callback):
        def on_save_checkpoint(self, trainer, pl_module, checkpoint):
            saves.append((trainer.global_step, pl_module.validated))

    trainer = pl.Trainer(
        max_epochs=2,
        limit_train_batches=4,
        limit_val_batches=1,
        callbacks=[*last_ckpt(tmp_path, every=2), Saves()],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        plugins=[AtomicCheckpointIO()],
    )
    data = DataLoader(TensorDataset(torch.randn(16, 4)), batch_size=4)
    trainer.fit(_Validated(), data, data)
    assert saves == [(2, 0), (4, 0), (4, 1), (6, 1), (8, 1), (8, 2)]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["last.ckpt"]
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["global_step"], last["epoch"], last["validated"]) == (8, 1, 2)


def test_stop_signals_without_a_last_checkpoint_is_refused_before_training(tmp_path: Path):
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        callbacks=[StopSignals()],
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = _Tiny()
    before = [p.detach().clone() for p in module.parameters()]
    with pytest.raises(ConfigError) as err:
        trainer.fit(module, DataLoader(TensorDataset(torch.randn(4, 4)), batch_size=4))
    message = str(err.value)
    assert "ModelCheckpoint with monitor: null" in message
    assert message.endswith("keep callbacks.last_checkpoint (or remove callbacks.stop_signals too)")
    assert all(torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize(
    ("name", "want"),
    [("SIGUSR2", signal.SIGUSR2), ("usr1", signal.SIGUSR1), (None, None), ("null", None)],
)
def test_requeue_signal_names(name, want):
    assert parse_signal(name) == want


def test_an_unknown_requeue_signal_is_one_line():
    with pytest.raises(ConfigError, match=r"requeue_signal='SIGNOPE' is not a signal; use SIGUSR2"):
        StopSignals(requeue_signal="SIGNOPE")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_writes_last_ckpt_as_a_step_save_would_then_exits_128_plus_it(
    tmp_path: Path, capfd, signum: int
):
    """Training stops at the end of the batch SIGTERM or Ctrl-C came in; last.ckpt is
    written at that batch's end, in the same state an every-N-steps save writes there (the
    resume path test_a_run_killed_mid_epoch_resumes_to_the_same_metrics checks end to end),
    and the run exits 143 (130) with one line, not 0 as Lightning's SIGTERMException (a
    SystemExit) would, nor 1 with nothing saved as Lightning's Ctrl-C would."""

    class CopyAt(Callback):  # Lightning runs checkpoint callbacks last: copy a batch later
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 4:
                (tmp_path / "every4.ckpt").write_bytes(
                    (tmp_path / "a" / "checkpoints" / "last.ckpt").read_bytes()
                )

    def fit(folder: str, *callbacks: Callback, every: int | None = None) -> None:
        trainer = pl.Trainer(
            max_epochs=2,
            limit_train_batches=5,
            callbacks=[*last_ckpt(tmp_path / folder, every), *callbacks],
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        torch.manual_seed(0)
        with exit_on_stop_signal(trainer, tmp_path / folder, "training"):
            trainer.fit(_Tiny(), DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=4))

    fit("a", CopyAt(), every=4)
    capfd.readouterr()
    before = signal.getsignal(signum)
    if signum == signal.SIGINT:
        signal.signal(signum, signal.default_int_handler)  # as Python starts it
    handler = signal.getsignal(signum)
    try:
        with pytest.raises(SystemExit) as stopped:
            fit("b", _SignalWhen("batch", 3, signum))
        assert signal.getsignal(signum) == handler  # given back
    finally:
        signal.signal(signum, before)
    assert stopped.value.code == 128 + signum
    stopped_line = (
        "while training, at epoch 0, step 4; checkpoints/last.ckpt holds epoch 0, step 4: "
        f"resume with ckpt_path=last hydra.run.dir={tmp_path / 'b'}"
    )
    if signum == signal.SIGTERM:
        want = [f"stopped: SIGTERM {stopped_line}"]
    else:
        want = [
            "Ctrl-C: training stops at the end of this batch (after validation, if it is "
            f"running) with {tmp_path / 'b' / 'checkpoints' / 'last.ckpt'} written; press "
            "Ctrl-C again to stop at once without saving",
            f"stopped: Ctrl-C (SIGINT) {stopped_line}",
        ]
    assert [line for line in capfd.readouterr().err.splitlines() if line] == want
    want = torch.load(tmp_path / "every4.ckpt", weights_only=True)
    got = torch.load(tmp_path / "b" / "checkpoints" / "last.ckpt", weights_only=True)
    assert got["global_step"] == want["global_step"] == 4
    assert got["loops"] == want["loops"]
    for name, value in want["state_dict"].items():
        assert torch.equal(got["state_dict"][name], value), name


class _PressTwice(Callback):
    """Ctrl-C twice within one training batch, or once during one validation."""

    def __init__(self, hook: str, step: int) -> None:
        self.hook, self.step = hook, step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.hook == "batch" and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)  # the first is handled before the second is sent
            os.kill(os.getpid(), signal.SIGINT)

    def on_validation_start(self, trainer, pl_module):
        at = trainer.global_step == self.step and not trainer.sanity_checking
        if self.hook == "validation" and at:
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.parametrize(
    ("hook", "step", "epoch", "saved_at"),
    [
        # Once during epoch 0's validation: the epoch's end save is the stop (step 5).
        ("validation", 5, 0, 5),
        # Twice at step 7: Lightning's own stop at once; last.ckpt is epoch 0's end save.
        ("batch", 7, 1, 5),
    ],
    ids=["once-during-validation", "twice"],
)
def test_ctrl_c_during_validation_or_twice(
    tmp_path: Path, capfd, hook: str, step: int, epoch: int, saved_at: int
):
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        trainer = pl.Trainer(
            max_epochs=3,
            limit_train_batches=5,
            limit_val_batches=1,
            callbacks=[*last_ckpt(tmp_path), _PressTwice(hook, step)],
            default_root_dir=tmp_path,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        data = DataLoader(TensorDataset(torch.randn(20, 4)), batch_size=4)
        with (
            pytest.raises(SystemExit) as stopped,
            exit_on_stop_signal(trainer, tmp_path, "training"),
        ):
            trainer.fit(_Tiny(), data, data)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, before)
    assert stopped.value.code == 130
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert (saved["global_step"], saved["epoch"]) == (saved_at, 0)
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("stopped")]
    assert err == [
        f"stopped: Ctrl-C (SIGINT) while training, at epoch {epoch}, step {step}; "
        f"checkpoints/last.ckpt holds epoch 0, step {saved_at}: resume with "
        f"ckpt_path=last hydra.run.dir={tmp_path}"
    ]


# -- SIGTERM after training: while testing, and between the stages ------------------------
class _TinyTested(_Tiny):
    """_Tiny with a test stage; its test epoch's end is where train.py's module scores."""

    def __init__(self) -> None:
        super().__init__()
        self.scored = False

    def test_step(self, batch, batch_idx):
        return None

    def on_test_epoch_end(self) -> None:
        self.scored = True


class _TermAt(Callback):
    """SIGTERM to this process at one hook; refused (an assertion) where nothing would catch
    it, which would end pytest itself."""

    def __init__(self, hook: str) -> None:
        self.hook = hook

    def _send(self, hook: str) -> None:
        if hook == self.hook:
            assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL, f"nothing at {hook}"
            os.kill(os.getpid(), signal.SIGTERM)

    def on_fit_end(self, trainer, pl_module):
        self._send("fit_end")  # after fit's teardown: Lightning's handlers are given back

    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if batch_idx == trainer.num_test_batches[0] - 1:  # Lightning's own check skips it
            self._send("last_test_batch")

    def on_test_epoch_end(self, trainer, pl_module):
        self._send("test_epoch_end")  # callbacks run before the module scores the split

    def on_test_end(self, trainer, pl_module):
        self._send("test_end")  # where DashboardPlots draws


@pytest.mark.parametrize(
    ("hook", "runner", "scored"),
    [
        ("last_test_batch", False, False),
        ("test_epoch_end", False, False),
        ("test_end", False, True),
        ("fit_end", False, False),
        # A job runner's own SIGTERM handler stays (submitit's, say): StopSignals stops
        # the test at the last batch's end, where Lightning would go on to score the split;
        # a signal Lightning only noted while scoring stops the run as the test returns.
        ("last_test_batch", True, False),
        ("test_epoch_end", True, True),
    ],
    ids=[
        "last-test-batch",
        "test-epoch-end",
        "test-end",
        "fit-end",
        "runner-handler-last-test-batch",
        "runner-handler-test-epoch-end",
    ],
)
def test_sigterm_after_training_stops_at_once_with_exit_143(
    tmp_path: Path, capfd, hook: str, runner: bool, scored: bool
):
    """train.py's fit-then-test wiring on a tiny model: SIGTERM while testing (Lightning only
    notes it at the last batch and after) or after fit gave Lightning's handlers back (where
    Python's default would kill the process without a word) stops the run with exit 143
    and one line, as a Ctrl-C does there."""
    got: list[int] = []

    def runner_handler(signum, frame):  # submitit's for SIGTERM only logs ("bypassing")
        got.append(signum)

    own = runner_handler if runner else signal.SIG_DFL
    before = signal.signal(signal.SIGTERM, own)
    trainer = pl.Trainer(
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=1,
        limit_test_batches=2,
        callbacks=[*last_ckpt(tmp_path), _TermAt(hook)],
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)
    module = _TinyTested()
    try:
        with pytest.raises(SystemExit) as stopped, sigterm_stops_outside_fit(trainer):
            with exit_on_stop_signal(trainer, tmp_path, "training"):
                trainer.fit(module, data, data)
            with exit_on_stop_signal(trainer, tmp_path, "testing (training had finished)", "H"):
                trainer.test(module, data, verbose=False)
        assert signal.getsignal(signal.SIGTERM) == own  # given back
    finally:
        signal.signal(signal.SIGTERM, before)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert module.scored == scored
    assert got == ([signal.SIGTERM] if runner else [])
    err = [line for line in capfd.readouterr().err.splitlines() if line.startswith("stopped")]
    if hook == "fit_end":
        want = (
            "stopped: SIGTERM while training, at epoch 1, step 2; checkpoints/last.ckpt holds "
            f"epoch 0, step 2: resume with ckpt_path=last hydra.run.dir={tmp_path}"
        )
    else:
        want = f"{TESTING_STOPPED}; H"
    assert err == [want]


def test_a_stop_before_any_last_ckpt_names_a_command_that_is_let_in(tmp_path):
    from siamese.run_dirs import refusal

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "best.ckpt").write_bytes(b"x")  # a run, but no last.ckpt
    hint = resume_hint(tmp_path)
    assert hint.endswith(
        f"start over with the same command and ckpt_path=auto hydra.run.dir={tmp_path}"
    )
    assert refusal(tmp_path, "train", "auto") is None  # the folder guard lets it in
