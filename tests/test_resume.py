"""Faults: a run killed with SIGKILL mid-epoch resumes to the uninterrupted run's metrics;
a save interrupted or refused by the disk leaves the previous checkpoint intact."""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run_script, run_scripts

from siamese.checkpointing import AtomicCheckpointIO, CheckpointWriteError
from siamese.data.samplers import ClassBalancedBatchSampler

RUN = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "checkpoints.every_n_train_steps=2",
    "~callbacks.plots",
    "eval_pairs=500",
]


def train(run_dir: Path, *extra: str):
    return run_script("train.py", *RUN, f"hydra.run.dir={run_dir}", *extra)


def train_epoch_logs(run_dir: Path) -> list[float]:
    """Every epoch's train/ means in the run's CSV log, in order."""
    keys = ("train/loss_epoch", "train/active_fraction", "train/pos_distance", "train/neg_distance")
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    return [float(r[k]) for r in rows for k in keys]


def test_a_run_killed_mid_epoch_resumes_to_the_same_metrics(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # fault_callbacks, for Hydra
    kill = [
        "+callbacks.killer._target_=fault_callbacks.KillAtStep",
        "+callbacks.killer.step=7",  # epoch 1 runs steps 4-7: killed before its last batch
    ]
    whole, killed = run_scripts(  # independent: side by side
        [
            ("train.py", [*RUN, f"hydra.run.dir={tmp_path / 'whole'}"]),
            ("train.py", [*RUN, f"hydra.run.dir={tmp_path / 'killed'}", *kill]),
        ]
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "killed" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1  # mid-epoch, 2 batches in
    assert not list((tmp_path / "killed" / "checkpoints").glob(".*.tmp"))
    # One last.ckpt, written by whichever save came latest (no last-v1.ckpt beside it).
    assert not list((tmp_path / "whole" / "checkpoints").glob("last-v*.ckpt"))

    resumed = train(tmp_path / "killed", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    want = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    got = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    tested = [k for k in want if k.startswith("test/")]
    assert len(tested) >= 10
    for key in tested:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
    # The epoch means of training statistics cover the steps before the kill too (Lightning
    # keeps no logged sums in a checkpoint; the module does).
    assert train_epoch_logs(tmp_path / "killed") == pytest.approx(
        train_epoch_logs(tmp_path / "whole"), abs=1e-6
    )
    # The same weights, not only the same rounded metrics.
    a = torch.load(tmp_path / "whole/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(last, weights_only=True)["state_dict"]
    for name in a:
        assert torch.allclose(a[name].float(), b[name].float(), atol=1e-6), name


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
