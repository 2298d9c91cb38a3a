"""Run folders: which job made one (``run.json``), who is using it now (a lock), and who may
write into it.

A run folder belongs to one job. train.py may go on in its own training run (resume with
``ckpt_path=last|auto``); evaluate.py and export.py never write into a folder that holds
another job's results, except that export.py may replace its own earlier export of a
checkpoint that lies in its folder. While a job runs it holds an exclusive ``flock`` on
``<run dir>/.run.lock`` (the kernel drops it when the process ends, so a crashed job's lock
never blocks), and a second command on that folder stops with one line naming it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from siamese.errors import ConfigError
from siamese.exports import atomic_write
from siamese.resume import RESUME_MODES

RECORD = "run.json"  # the job that made the folder: task, created, command
LOCK = ".run.lock"  # flock'ed for the whole job; holds the running job's pid/host/command
TRAIN_TASKS = ("train", "debug")  # debug=... runs are training runs under outputs/debug/
SCRIPTS = {
    "train": "train.py",
    "debug": "train.py",
    "evaluate": "evaluate.py",
    "export": "export.py",
    "index": "index.py",
    "search": "search.py",
    "serve": "serve.py",
}

# What a finished (or part-finished) job leaves: train.py's checkpoints and report,
# evaluate.py's report, thresholded model, index and embeddings, export.py's model files,
# index.py's gallery, search.py's results.
RESULTS = (
    "checkpoints",
    "metrics.json",
    "model.json",
    "model.ckpt",
    "index.faiss",
    "embeddings",
    "model.onnx",
    "model.ts",
    "model.pt2",
    "gallery.json",
    "results.csv",
)

# A held lock is tried this many times, this far apart, before the folder counts as in use.
LOCK_ATTEMPTS = 5
LOCK_RETRY_S = 0.05

# Locks this process holds: resolved run folder -> open fd. Kept open for the whole process
# (closing the fd would drop the lock); a second claim of the same folder reuses it.
_held: dict[Path, int] = {}


def check_run_dir_value(value: Any) -> Path:
    """``hydra.run.dir`` as a folder path; ConfigError when it is empty or names a file."""
    text = "" if value is None else str(value)
    if not text.strip():
        raise ConfigError(
            f"hydra.run.dir={text!r} is empty (an unset shell variable?); give a folder for "
            "the run, or leave hydra.run.dir out to get a new one under outputs/"
        )
    run_dir = Path(text)  # as Hydra takes it: no ~ expansion
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"hydra.run.dir={text!r} is an existing file, not a folder; choose a folder "
            "(a new or a run's own) for hydra.run.dir"
        )
    return run_dir


def results_in(run_dir: Path) -> list[str]:
    """The names in ``RESULTS`` that ``run_dir`` holds (an empty checkpoints/ does not count:
    a disk that filled during the first save leaves one)."""
    found = []
    for name in RESULTS:
        path = run_dir / name
        if path.is_dir() and name == "checkpoints":
            if any(p.is_file() for p in path.iterdir()):
                found.append(name)
        elif path.exists():
            found.append(name)
    return found


def read_record(run_dir: Path) -> dict[str, Any] | None:
    """``run_dir/run.json``, or None when there is none (or it is unreadable)."""
    try:
        record = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def made_by(run_dir: Path, record: dict[str, Any] | None = None) -> str | None:
    """The task (train, debug, evaluate, export) that made ``run_dir``: its ``run.json``
    (``record``, when already read); for a folder from before run.json, told from its files
    (checkpoints/: train, model.json: export, evaluate.py's thresholded model, index or
    embeddings: evaluate); None when it cannot be told (a metrics.json alone)."""
    record = read_record(run_dir) if record is None else record
    if record is not None and isinstance(record.get("task"), str):
        return record["task"]
    found = set(results_in(run_dir))
    if "checkpoints" in found:
        return "train"
    if "model.json" in found:
        return "export"
    if found & {"model.ckpt", "index.faiss", "embeddings"}:
        return "evaluate"
    return None


def _inside(path: Any, run_dir: Path) -> bool:
    return Path(str(path)).expanduser().resolve().is_relative_to(run_dir.resolve())


def refusal(run_dir: Path, task: str, ckpt_path: str | None) -> str | None:
    """Why ``task`` (with ``ckpt_path``) may not write into ``run_dir``, or None if it may."""
    if not run_dir.is_dir():
        return None
    found = results_in(run_dir)
    record = read_record(run_dir)
    owner = made_by(run_dir, record)
    script = SCRIPTS.get(str((record or {}).get("task")))
    kind = f"a run of {script}" if script else "a run"  # as run.json names the job
    unchanged = "(nothing in it was changed)"
    ckpt_inside = bool(ckpt_path) and ckpt_path not in RESUME_MODES and _inside(ckpt_path, run_dir)
    if task in TRAIN_TASKS:
        own = owner is None or owner in TRAIN_TASKS
        if ckpt_path in RESUME_MODES or ckpt_inside:
            if own:
                return None
            return (
                f"hydra.run.dir={str(run_dir)!r} holds {kind}, not a training run; train.py "
                f"resumes (ckpt_path={ckpt_path}) only a folder train.py made: choose another "
                f"hydra.run.dir {unchanged}"
            )
        if not found:
            return None
        resume = ", or pass ckpt_path=last to resume that run" if own else ""
        return (
            f"hydra.run.dir={str(run_dir)!r} already holds {kind} ({', '.join(found)}); "
            f"choose another hydra.run.dir{resume} {unchanged}"
        )
    # evaluate.py and export.py have nothing to resume. export.py may replace its own
    # earlier export of a checkpoint in its folder (model.json and the file together).
    if task == "export" and ckpt_inside and owner in (None, "export"):
        return None
    if not found:
        return None
    return (
        f"hydra.run.dir={str(run_dir)!r} already holds {kind} ({', '.join(found)}); "
        f"choose another hydra.run.dir {unchanged}"
    )


def holder(run_dir: Path) -> str | None:
    """Who holds ``run_dir``'s lock (``pid N on host H since T: command``), or None when
    nobody does. Nothing is written: a folder without a lock file was never locked."""
    key = run_dir.resolve()
    lock = run_dir / LOCK
    if key in _held or not lock.is_file():
        return None
    try:
        fd = os.open(lock, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe(lock)
    finally:
        os.close(fd)  # also drops the lock this probe may have taken
    return None


def _describe(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text())
        return (
            f"pid {info['pid']} on host {info['host']} since {info['started']}: {info['command']}"
        )
    except (OSError, ValueError, KeyError, TypeError):
        # Between the other job's flock and its write: it has not said who it is yet.
        return "another process that is just starting"


def _command() -> str:
    return " ".join(shlex.quote(a) for a in ["python", *sys.argv]).replace("\n", " ")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _unwritable(run_dir: Path, exc: OSError, key: str = "hydra.run.dir") -> ConfigError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    if exc.errno == errno.ENOTDIR:
        why = "a part of that path is a file, not a folder"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = f"{reason}: make the folder writable"
    else:
        why = f"{reason}: check the path and the disk"
    return ConfigError(f"cannot write into {key}={str(run_dir)!r} ({why}), or choose another {key}")


def lock(run_dir: Path, setting: str = "hydra.run.dir") -> None:
    """Create ``run_dir`` and hold its lock until this process ends; ConfigError when
    another process holds it (naming that one) or the folder cannot be written. ``setting``:
    the setting that named the folder, for those errors (index.py's ``gallery_dir``)."""
    key = run_dir.resolve()
    if key in _held:
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise _unwritable(run_dir, exc, setting) from None
    for attempt in range(LOCK_ATTEMPTS):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # Another command's probe (holder) holds it for an instant: try again briefly.
            if attempt + 1 == LOCK_ATTEMPTS:
                os.close(fd)
                raise in_use(run_dir, _describe(run_dir / LOCK), setting) from None
            time.sleep(LOCK_RETRY_S)
    _held[key] = fd
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}
    data = json.dumps({**info, "command": _command()}).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError as exc:
        raise _unwritable(run_dir, exc, setting) from None


def unlock(run_dir: Path) -> None:
    """Drop this process's lock on ``run_dir`` (a sweep's job that ended)."""
    fd = _held.pop(run_dir.resolve(), None)
    if fd is not None:
        os.close(fd)


def in_use(run_dir: Path, who: str, key: str = "hydra.run.dir") -> ConfigError:
    return ConfigError(
        f"{key}={str(run_dir)!r} is in use by a running job ({who}); wait for it to "
        f"end, or choose another {key} (nothing in it was changed)"
    )


def write_record(run_dir: Path, task: str) -> None:
    """Write ``run_dir/run.json`` naming ``task`` as the folder's job. A folder that holds
    results keeps its record (a resumed run, an export replacing its own): ``refusal``
    let only the job that made it back in."""
    if read_record(run_dir) is not None and results_in(run_dir):
        return
    body = {"task": task, "created": _now(), "command": _command(), "host": socket.gethostname()}
    with atomic_write(run_dir / RECORD, what="run record", then="run the command again") as f:
        f.write((json.dumps(body, indent=2) + "\n").encode())


def check(run_dir_value: Any, task: str, ckpt_path: str | None) -> Path:
    """``claim``'s checks alone, for the processes besides rank 0 (torchrun's or srun's,
    other nodes' too): they refuse what rank 0 refuses, so that none is left waiting for it,
    without probing the lock rank 0 holds or writing anything. Returns the folder."""
    run_dir = check_run_dir_value(run_dir_value)
    reason = refusal(run_dir, task, ckpt_path)
    if reason is not None:
        raise ConfigError(reason)
    return run_dir


def claim(run_dir_value: Any, task: str, ckpt_path: str | None) -> Path:
    """Check that ``task`` may write into ``hydra.run.dir``, then lock it and record the job;
    every check comes before anything is written. Returns the folder."""
    run_dir = check_run_dir_value(run_dir_value)
    reason = refusal(run_dir, task, ckpt_path)
    if reason is not None:
        # A running job there is the better answer. Probed only when refusing anyway: the
        # probe holds the lock for an instant, which another job's start could run into.
        who = holder(run_dir)
        raise in_use(run_dir, who) if who is not None else ConfigError(reason)
    lock(run_dir)  # refused with the running job's name when another process holds it
    write_record(run_dir, task)  # a failed write is a one-line WriteError
    return run_dir
