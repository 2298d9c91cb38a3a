"""Run folders: one job per folder (run.json says which), one process at a time (a lock),
a copied or moved run resumes from its own files, and an unusable hydra.run.dir is one
line before Hydra writes anything."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch
from helpers import FAST, assert_fragments, compose_train, fake_run, guard, refused, snapshot

from siamese import run_dirs
from siamese.checkpointing import AtomicCheckpointIO, CheckpointWriteError
from siamese.pipelines.train import resolve_ckpt_path, run_training


def test_evaluate_and_export_never_write_into_a_training_run(tmp_path, capsys):
    run = fake_run(tmp_path / "run", "train", "checkpoints/best.ckpt", "metrics.json")
    before = snapshot(run)
    best = str(run / "checkpoints" / "best.ckpt")
    line = refused(capsys, run, "evaluate", best)
    assert_fragments(
        line,
        f"hydra.run.dir={str(run)!r} already holds a run of train.py",
        "choose another hydra.run.dir",
        "(nothing in it was changed)",
    )
    assert "already holds a run of train.py" in refused(capsys, run, "evaluate", "last")
    assert "already holds a run of train.py" in refused(capsys, run, "export", best)
    assert snapshot(run) == before and not (run / run_dirs.LOCK).exists()


def test_train_resumes_only_a_training_run(tmp_path, capsys):
    ev = fake_run(tmp_path / "ev", "evaluate", "metrics.json", "model.ckpt")
    before = snapshot(ev)
    for mode in ("auto", "last", str(ev / "model.ckpt")):
        line = refused(capsys, ev, "train", mode)
        assert line.startswith(
            f"error: hydra.run.dir={str(ev)!r} holds a run of evaluate.py, not a training run; "
            f"train.py resumes (ckpt_path={mode}) only a folder train.py made"
        )
    # A fresh train.py run there is refused without offering to resume it.
    assert_fragments(
        refused(capsys, ev, "train"),
        f"hydra.run.dir={str(ev)!r} already holds a run of evaluate.py (metrics.json, model.ckpt)",
        "choose another hydra.run.dir",
    )
    assert snapshot(ev) == before

    # A folder evaluate.py wrote before run.json existed is told by its files.
    (ev / run_dirs.RECORD).unlink()
    assert "not a training run" in refused(capsys, ev, "train", "auto")

    run = fake_run(tmp_path / "run", "train", "checkpoints/last.ckpt")
    record = (run / run_dirs.RECORD).read_text()
    guard(run, "train", "last")  # its own run: resumed, locked, its record kept
    assert (run / run_dirs.RECORD).read_text() == record
    lock = json.loads((run / run_dirs.LOCK).read_text())
    assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
    run_dirs.unlock(run)


def test_export_replaces_only_its_own_export_and_new_folders_record_their_job(tmp_path, capsys):
    ex = fake_run(tmp_path / "ex", "export", "model.json", "model.onnx", "best.ckpt")
    guard(ex, "export", str(ex / "best.ckpt"))  # its own earlier export of that checkpoint
    assert json.loads((ex / run_dirs.RECORD).read_text())["task"] == "export"
    run_dirs.unlock(ex)
    assert "already holds a run of export.py" in refused(capsys, ex, "export", "/elsewhere.ckpt")

    new = tmp_path / "new" / "evaluation"
    guard(new, "evaluate", "/elsewhere/best.ckpt")
    record = json.loads((new / run_dirs.RECORD).read_text())
    assert record["task"] == "evaluate" and "command" in record and "created" in record
    assert sorted(p.name for p in new.iterdir()) == [run_dirs.LOCK, run_dirs.RECORD]
    run_dirs.unlock(new)


def checkpoint_state(path: Path) -> dict:
    """The monitored ModelCheckpoint's (best.ckpt) state saved in a checkpoint (the two that
    write last.ckpt are unmonitored)."""
    states = torch.load(path, weights_only=True)["callbacks"]
    (state,) = [s for k, s in states.items() if k.startswith("ModelCheckpoint{'monitor': 'val/")]
    return state


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_a_copied_or_moved_run_resumes_tests_and_reports_its_own_files(tmp_path, recwarn):
    run = tmp_path / "run"
    run_training(compose_train(FAST, run))
    state = checkpoint_state(run / "checkpoints" / "last.ckpt")
    assert state["dirpath"] == "checkpoints" and state["best_model_path"] == "checkpoints/best.ckpt"
    assert list(state["best_k_models"]) == ["checkpoints/best.ckpt"]

    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    (run / "checkpoints" / "best.ckpt").write_bytes(b"not the copy's")  # must not be read
    run_training(compose_train([*FAST, "ckpt_path=last"], copy))
    report = json.loads((copy / "metrics.json").read_text())
    assert report["checkpoint"] == str(copy / "checkpoints" / "best.ckpt")
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]

    # A checkpoint from before (absolute paths of the folder it was saved in), moved.
    last = copy / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    for key, saved in ckpt["callbacks"].items():
        if key.startswith("ModelCheckpoint"):
            saved["dirpath"] = str(copy / "checkpoints")
            saved["best_model_path"] = str(copy / "checkpoints" / "best.ckpt")
            saved["best_k_models"] = {saved["best_model_path"]: saved["best_model_score"]}
    torch.save(ckpt, last)
    moved = tmp_path / "moved"
    copy.rename(moved)
    run_training(compose_train([*FAST, "ckpt_path=last"], moved))
    report = json.loads((moved / "metrics.json").read_text())
    assert report["checkpoint"] == str(moved / "checkpoints" / "best.ckpt")


def test_a_read_only_run_dir_is_one_line(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:  # root writes anyway: there the system's refusal is simulated
        folder.chmod(0o555)
    else:
        real_open = os.open

        def read_only(path, flags, *args, **kwargs):
            if Path(path).parent == folder and flags & os.O_CREAT:
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(run_dirs.os, "open", read_only)
    try:
        line = refused(capsys, folder, "train")
    finally:
        folder.chmod(0o755)
    assert line.startswith(f"error: cannot write into hydra.run.dir={str(folder)!r} (")
    assert line.endswith(": make the folder writable), or choose another hydra.run.dir")
    assert list(folder.iterdir()) == []


def test_a_full_disk_at_the_first_save_names_a_way_forward_that_works(tmp_path, monkeypatch):
    run = fake_run(tmp_path / "run", "train")
    io = AtomicCheckpointIO(run)

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointWriteError) as err:
        io.save_checkpoint({}, run / "checkpoints" / "best.ckpt")
    message = str(err.value)
    assert message.endswith(
        f"free some space, then run the same command with ckpt_path=auto hydra.run.dir={run} "
        "(no last.ckpt was written yet, so it starts the run over there)"
    )
    # That command is let in and starts over; so is a plain re-run (nothing was saved).
    guard(run, "train", "auto")
    assert resolve_ckpt_path("auto", run) is None
    guard(run, "train")
    run_dirs.unlock(run)

    # Once a last.ckpt is there, the way forward resumes it.
    (run / "checkpoints" / "last.ckpt").write_bytes(b"saved")
    with pytest.raises(CheckpointWriteError) as err:
        io.save_checkpoint({}, run / "checkpoints" / "last.ckpt")
    assert str(err.value).endswith(f"then resume with ckpt_path=last hydra.run.dir={run}")
