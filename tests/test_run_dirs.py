"""Run folders: one job per folder (run.json says which), one process at a time (a lock),
a copied or moved run resumes from its own files, and an unusable hydra.run.dir is one
line before Hydra writes anything."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, ROOT, compose_train, one_line_error, run_script, run_scripts
from omegaconf import OmegaConf

from siamese import run_dirs
from siamese.checkpointing import AtomicCheckpointIO, CheckpointWriteError
from siamese.hydra_callbacks import RunDirGuard
from siamese.pipelines.train import resolve_ckpt_path, run_training
from siamese.task import report_errors

# Holds a run folder's lock as a running job would, until killed.
HOLD = (
    "import sys, time; from pathlib import Path; from siamese import run_dirs; "
    "run_dirs.lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"
)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: "nothing in it was changed" exactly."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def fake_run(folder: Path, task: str, *files: str) -> Path:
    """A finished ``task`` run's folder: run.json, .hydra/config.yaml and ``files``."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"task_name: {task}\n")
    (folder / run_dirs.RECORD).write_text(json.dumps({"task": task, "created": "earlier"}))
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


def guard(run_dir: Path | str, task: str, ckpt_path: str | None = None) -> None:
    """RunDirGuard as Hydra calls it for a single run (before it writes anything)."""
    config = {"hydra": {"run": {"dir": str(run_dir)}}, "task_name": task, "ckpt_path": ckpt_path}
    RunDirGuard().on_run_start(OmegaConf.create(config))


def refused(capsys, run_dir: Path | str, task: str, ckpt_path: str | None = None) -> str:
    """The one line and exit 2 of a refused run folder."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        report_errors(guard)(run_dir, task, ckpt_path)  # as train.py's task wrapper
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.fixture
def holder(tmp_path):
    """A process holding ``tmp_path / 'held'``'s lock; killed at the end."""
    folder = tmp_path / "held"
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(folder)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "locked"
    yield folder, proc
    proc.kill()
    proc.wait()


# --- 2. a run folder belongs to one job ----------------------------------------------------


def test_evaluate_and_export_never_write_into_a_training_run(tmp_path, capsys):
    run = fake_run(tmp_path / "run", "train", "checkpoints/best.ckpt", "metrics.json")
    before = snapshot(run)
    best = str(run / "checkpoints" / "best.ckpt")
    line = refused(capsys, run, "evaluate", best)
    assert line == (
        f"error: hydra.run.dir={str(run)!r} already holds a run of train.py (checkpoints, "
        "metrics.json); choose another hydra.run.dir (nothing in it was changed)"
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
    assert refused(capsys, ev, "train") == (
        f"error: hydra.run.dir={str(ev)!r} already holds a run of evaluate.py (metrics.json, "
        "model.ckpt); choose another hydra.run.dir (nothing in it was changed)"
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


@pytest.mark.slow  # ~3 s: three entry-point processes (default suite under 5 minutes)
def test_the_entry_points_refuse_before_hydra_writes(tmp_path):
    """The issue's commands, each one line and exit 2, with every file as it was."""
    run = fake_run(tmp_path / "run", "train", "checkpoints/best.ckpt", "metrics.json")
    ev = fake_run(tmp_path / "ev", "evaluate", "metrics.json")
    before = {run: snapshot(run), ev: snapshot(ev)}
    best = run / "checkpoints" / "best.ckpt"
    procs = run_scripts(
        [
            ("evaluate.py", [f"ckpt_path={best}", f"hydra.run.dir={run}"]),
            ("evaluate.py", ["ckpt_path=last", f"hydra.run.dir={run}"]),
            ("export.py", [f"ckpt_path={best}", f"hydra.run.dir={run}"]),
            ("train.py", [*FAST, f"hydra.run.dir={ev}", "ckpt_path=auto"]),
        ]
    )
    for proc in procs[:3]:
        assert "already holds a run of train.py" in one_line_error(proc)
    assert "holds a run of evaluate.py, not a training run" in one_line_error(procs[3])
    assert {run: snapshot(run), ev: snapshot(ev)} == before


# --- 3. one process at a time ---------------------------------------------------------------


def test_a_folder_in_use_is_refused_naming_the_running_job(holder, capsys, monkeypatch):
    folder, proc = holder
    # The running job's folder holds a training run: a fresh start and a resume are refused.
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    before = snapshot(folder)
    for ckpt_path in (None, "last"):
        line = refused(capsys, folder, "train", ckpt_path)
        assert f"is in use by a running job (pid {proc.pid} on host {socket.gethostname()}" in line
        assert "-c" in line and "wait for it to end, or choose another hydra.run.dir" in line
    assert snapshot(folder) == before

    # Lightning's other DDP processes of that job run in its folder: never refused.
    monkeypatch.setenv("LOCAL_RANK", "1")
    guard(folder, "train", "last")
    monkeypatch.delenv("LOCAL_RANK")
    assert snapshot(folder) == before

    # The job dies (a crash, SIGKILL): its lock goes with it, the folder can be resumed.
    proc.kill()
    proc.wait()
    guard(folder, "train", "last")
    assert json.loads((folder / run_dirs.LOCK).read_text())["pid"] == os.getpid()
    run_dirs.unlock(folder)


def test_train_py_on_a_folder_in_use_is_one_line(holder):
    folder, proc = holder
    line = one_line_error(run_script("train.py", *FAST, f"hydra.run.dir={folder}"))
    assert f"in use by a running job (pid {proc.pid} " in line
    assert sorted(p.name for p in folder.iterdir()) == [run_dirs.LOCK]  # no .hydra, no log


@pytest.mark.slow  # two train.py runs side by side, ~20 s
def test_two_train_py_on_one_folder_the_second_stops(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    args = [sys.executable, str(ROOT / "train.py"), *FAST, f"hydra.run.dir={run}"]
    first = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    time.sleep(2)
    second = run_script("train.py", *FAST, f"hydra.run.dir={run}")
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()[-3000:]
    assert f"in use by a running job (pid {first.pid} " in one_line_error(second)
    assert json.loads((run / "metrics.json").read_text())["checkpoint"] == str(
        run / "checkpoints" / "best.ckpt"
    )


# --- 4. a copied or moved run resumes from its own files -------------------------------------


def checkpoint_state(path: Path) -> dict:
    """The ModelCheckpoint (best.ckpt) state saved in a checkpoint."""
    states = torch.load(path, weights_only=True)["callbacks"]
    (state,) = [s for k, s in states.items() if k.startswith("ModelCheckpoint")]
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


# --- 9. an unusable hydra.run.dir -----------------------------------------------------------


def test_an_unusable_run_dir_is_one_line_from_the_entry_point(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("mine")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    empty, named_file, under_file = run_scripts(
        [
            ("train.py", [*FAST, "hydra.run.dir="]),
            ("train.py", [*FAST, f"hydra.run.dir={file}"]),
            ("evaluate.py", ["ckpt_path=x.ckpt", f"hydra.run.dir={file}/run"]),
        ],
        cwd=cwd,
    )
    assert one_line_error(empty) == (
        "error: hydra.run.dir='' is empty (an unset shell variable?); give a folder for the "
        "run, or leave hydra.run.dir out to get a new one under outputs/"
    )
    assert one_line_error(named_file) == (
        f"error: hydra.run.dir={str(file)!r} is an existing file, not a folder; choose a "
        "folder (a new or a run's own) for hydra.run.dir"
    )
    assert one_line_error(under_file) == (
        f"error: cannot write into hydra.run.dir={str(file / 'run')!r} (a part of that path is "
        "a file, not a folder), or choose another hydra.run.dir"
    )
    assert list(cwd.iterdir()) == [] and file.read_text() == "mine"


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


# --- 10. a full disk at the first checkpoint -------------------------------------------------


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
