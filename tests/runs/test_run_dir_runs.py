"""The entry points on a run folder that is in use, unusable, or shared by two runs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
from helpers import (
    FAST,
    ROOT,
    assert_fragments,
    fake_run,
    guard,
    one_line_error,
    refused,
    run_script,
    run_scripts,
    snapshot,
)

from siamese import run_dirs

# Holds a run folder's lock as a running job would, until killed.
HOLD = (
    "import sys, time; from pathlib import Path; from siamese import run_dirs; "
    "run_dirs.lock(Path(sys.argv[1])); print('locked', flush=True); time.sleep(120)"
)


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
    assert_fragments(
        one_line_error(empty),
        "hydra.run.dir='' is empty",
        "leave hydra.run.dir out to get a new one under outputs/",
    )
    assert_fragments(
        one_line_error(named_file),
        f"hydra.run.dir={str(file)!r} is an existing file, not a folder",
        "choose a folder",
    )
    assert_fragments(
        one_line_error(under_file),
        f"cannot write into hydra.run.dir={str(file / 'run')!r}",
        "a part of that path is a file",
        "choose another hydra.run.dir",
    )
    assert list(cwd.iterdir()) == [] and file.read_text() == "mine"
