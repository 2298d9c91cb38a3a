"""Run-directory files under damage: a truncated, corrupt, pickled or mismatched index or
embeddings file is one line naming it, and a disk that fills up while evaluate.py or
export.py writes leaves the previous run's files byte-identical, with no temporaries."""

from __future__ import annotations

import builtins
import errno
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pytest
from helpers import FAST, ROOT, assert_fragments, compose_config, compose_eval, compose_train

import siamese
from siamese import exports
from siamese.cli import report_errors
from siamese.errors import DataError
from siamese.exports import WriteError
from siamese.pipelines import export as export_mod
from siamese.pipelines.evaluate import run_evaluation
from siamese.pipelines.export import run_export
from siamese.pipelines.train import run_training

# The val split (500 items), few pairs and episodes, small pictures: about a second a run.
EVAL_FAST = [
    "eval.split=val",
    "eval.pairs=500",
    "eval.oneshot.episodes=100",
    "eval.projection_points=200",
    "eval.grid_queries=2",
]


def one_line(err: pytest.ExceptionInfo, path: Path) -> str:
    message = str(err.value)
    assert "\n" not in message and str(path) in message, message
    return message


def write_run(folder: Path, nq: int = 6, ng: int = 9, dim: int = 4) -> Path:
    """What evaluate.py leaves: embeddings/*.npy and index.faiss over the gallery."""
    rng = np.random.default_rng(0)
    emb = folder / "embeddings"
    emb.mkdir(parents=True)
    gallery = rng.standard_normal((ng, dim)).astype(np.float32)
    np.save(emb / "query.npy", rng.standard_normal((nq, dim)).astype(np.float32))
    np.save(emb / "query_labels.npy", np.arange(nq) % 3)
    np.save(emb / "gallery.npy", gallery)
    np.save(emb / "gallery_labels.npy", np.arange(ng) % 3)
    index = faiss.IndexFlatL2(dim)
    index.add(gallery)
    faiss.write_index(index, str(folder / "index.faiss"))
    return folder


def test_hand_made_files_load(tmp_path):
    run = write_run(tmp_path)
    index = siamese.load_index(run / "index.faiss")
    assert index.ntotal == 9 and index.d == 4
    for folder in (run, run / "embeddings"):  # the run directory or its embeddings/
        got = siamese.load_embeddings(folder, index=run / "index.faiss")
        assert got.query.shape == (6, 4) and got.query.dtype == np.float32
        assert got.gallery_labels.dtype == np.int64 and list(got.query_labels) == [0, 1, 2] * 2
        np.testing.assert_array_equal(got.gallery, np.load(run / "embeddings" / "gallery.npy"))
    assert siamese.load_embeddings(run, index=index).gallery.shape == (9, 4)


def test_what_the_writers_write_reads_back(tmp_path):
    rng = np.random.default_rng(1)
    q, g = rng.random((5, 3), dtype=np.float32), rng.random((7, 3), dtype=np.float32)
    exports.save_embeddings(tmp_path / "embeddings", q, np.arange(5), g, np.arange(7))
    index = faiss.IndexFlatIP(3)
    index.add(g)
    exports.save_index(index, tmp_path / "index.faiss")
    assert (tmp_path / "index.faiss").read_bytes() == faiss.serialize_index(index).tobytes()
    got = siamese.load_embeddings(tmp_path, index=tmp_path / "index.faiss")
    np.testing.assert_array_equal(got.query, q)
    np.testing.assert_array_equal(got.gallery_labels, np.arange(7))
    assert sorted(p.name for p in tmp_path.rglob("*")) == [
        "embeddings",
        "gallery.npy",
        "gallery_labels.npy",
        "index.faiss",
        "query.npy",
        "query_labels.npy",
    ]


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "truncated": (cut_in_half, "ends early"),
    "random bytes": (lambda p: p.write_bytes(np.random.default_rng(2).bytes(1000)), "type"),
    "empty": (lambda p: p.write_bytes(b""), "empty"),
    "a .npy file": (lambda p: p.write_bytes(npy_bytes(np.zeros(3))), "not a faiss index"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_index_is_one_line_naming_it(tmp_path, damage):
    path = write_run(tmp_path) / "index.faiss"
    spoil, says = DAMAGE[damage]
    spoil(path)
    with pytest.raises(DataError) as err:
        siamese.load_index(path)
    message = one_line(err, path)
    assert "is not a readable faiss index" in message and says in message
    assert "Error in" not in message and "index_read.cpp" not in message  # no C++ text
    with pytest.raises(DataError) as err:  # and where the embeddings are checked against it
        siamese.load_embeddings(tmp_path, index=path)
    one_line(err, path)


def test_a_missing_index_or_embeddings_file_is_one_line(tmp_path):
    with pytest.raises(DataError) as err:
        siamese.load_index(tmp_path / "index.faiss")
    assert "does not exist" in one_line(err, tmp_path / "index.faiss")
    with pytest.raises(DataError) as err:
        siamese.load_embeddings(tmp_path / "nowhere")
    assert "does not exist" in one_line(err, tmp_path / "nowhere")
    run = write_run(tmp_path / "run")
    (run / "embeddings" / "gallery_labels.npy").unlink()
    with pytest.raises(DataError) as err:
        siamese.load_embeddings(run)
    assert "is missing" in one_line(err, run / "embeddings" / "gallery_labels.npy")


NPY_DAMAGE = {
    "truncated": (cut_in_half, "cut off inside its header"),
    "last row cut": (lambda p: p.write_bytes(p.read_bytes()[:-4]), "it is cut off: its header"),
    "random bytes": (lambda p: p.write_bytes(b"\x00" + np.random.default_rng(3).bytes(99)), "npy"),
    "empty": (lambda p: p.write_bytes(b""), "empty"),
    "header only": (lambda p: p.write_bytes(p.read_bytes()[:9]), "not a readable .npy"),
}


@pytest.mark.parametrize("damage", NPY_DAMAGE, ids=list(NPY_DAMAGE))
@pytest.mark.parametrize("name", ["query", "gallery_labels"])
def test_a_damaged_npy_is_one_line_naming_it(tmp_path, damage, name):
    path = write_run(tmp_path) / "embeddings" / f"{name}.npy"
    spoil, says = NPY_DAMAGE[damage]
    spoil(path)
    with pytest.raises(DataError) as err:
        siamese.load_embeddings(tmp_path)
    message = one_line(err, path)
    assert "is not a readable .npy array" in message and says in message


class _RunsCode:
    """What an attacker puts in an object array: unpickling it would call os.system."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickled_object_array_is_refused_and_runs_nothing(tmp_path):
    run = write_run(tmp_path / "run")
    marker = tmp_path / "pwned"
    path = run / "embeddings" / "query.npy"
    np.save(path, np.array([_RunsCode(marker)] * 6, dtype=object), allow_pickle=True)
    with pytest.raises(DataError) as err:
        siamese.load_embeddings(run)
    message = one_line(err, path)
    assert "pickled Python objects" in message and "nothing was run" in message
    assert not marker.exists()


def replace(name: str, array: np.ndarray):
    return lambda run: np.save(run / "embeddings" / f"{name}.npy", array)


MISMATCH = {
    "fewer labels than rows": (replace("query_labels", np.arange(5)), "query_labels", "5 labels"),
    "query and gallery dims": (
        replace("query", np.zeros((6, 3), np.float32)),
        "gallery",
        "3-dimensional",
    ),
    "float labels": (replace("gallery_labels", np.zeros(9)), "gallery_labels", "integer labels"),
    "1-D embeddings": (replace("gallery", np.zeros(9, np.float32)), "gallery", "(N, D)"),
    "integer embeddings": (replace("query", np.zeros((6, 4), np.int32)), "query", "int32"),
    "NaN": (
        replace("gallery", np.where(np.eye(9, 4) > 0, np.nan, 1).astype(np.float32)),
        "gallery",
        "non-finite values",
    ),
}


@pytest.mark.parametrize("case", MISMATCH, ids=list(MISMATCH))
def test_mismatched_embeddings_are_one_line_naming_the_file(tmp_path, case):
    run = write_run(tmp_path)
    spoil, name, says = MISMATCH[case]
    spoil(run)
    with pytest.raises(DataError) as err:
        siamese.load_embeddings(run)
    assert says in one_line(err, run / "embeddings" / f"{name}.npy")


def test_an_index_from_another_run_is_one_line(tmp_path):
    run = write_run(tmp_path / "a")
    other = write_run(tmp_path / "b", ng=8)
    with pytest.raises(DataError) as err:
        siamese.load_embeddings(run, index=other / "index.faiss")
    message = one_line(err, other / "index.faiss")
    assert "holds 8 vectors" in message and "9 rows" in message
    with pytest.raises(DataError) as err:
        siamese.load_embeddings(run, index=faiss.IndexFlatL2(5))
    assert "5-dimensional" in one_line(err, run / "embeddings" / "gallery.npy")


class _FullDisk:
    """A file whose disk fills up after ``room`` more bytes (the rest of a write is lost)."""

    def __init__(self, f, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data) -> int:
        data = memoryview(data).cast("B")
        if len(data) > self._room:
            self._f.write(data[: self._room])
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def fill_disk_at(monkeypatch, name: str, room: int = 100) -> None:
    """The disk fills up ``room`` bytes into writing ``name`` (through ``atomic_write``)."""

    def open_(file, mode="r", *args, **kwargs):
        f = builtins.open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by its user)
        return _FullDisk(f, room) if "w" in mode and Path(file).name == f".{name}.tmp" else f

    monkeypatch.setattr(exports, "open", open_, raising=False)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int, int]]:
    """Every file's bytes, inode and mtime: a replaced file has a new inode."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def fails_in_one_line(run, path: Path, capsys) -> str:
    """``run`` through the entry points' error handler: exit 2 and one ``error:`` line."""
    with pytest.raises(SystemExit) as exit_:
        report_errors(run)()
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(path) in err, err
    return err


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    quick = ["test=false", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]
    run_training(compose_train([*FAST, *quick], out))
    return out / "checkpoints" / "best.ckpt"


@pytest.fixture(scope="module")
def evaluated(ckpt, tmp_path_factory):
    """A finished evaluation; the runs below pick other pairs (a new threshold and metrics)."""
    out = tmp_path_factory.mktemp("eval")
    run_evaluation(compose_eval([f"ckpt_path={ckpt}", *EVAL_FAST], out))
    return out


@pytest.mark.parametrize(
    "name", ["gallery.npy", "index.faiss", "model.ckpt", "metrics.json"], ids=str
)
def test_a_full_disk_while_evaluating_keeps_the_previous_run(
    ckpt, evaluated, monkeypatch, capsys, name
):
    before = snapshot(evaluated)
    assert "embeddings/gallery.npy" in before and "retrieval.png" in before
    cfg = compose_eval([f"ckpt_path={ckpt}", "eval.pairs_seed=1", *EVAL_FAST], evaluated)
    fill_disk_at(monkeypatch, name)
    target = next(evaluated.rglob(name))
    message = fails_in_one_line(lambda: run_evaluation(cfg), target, capsys)
    assert "No space left on device" in message and "no earlier file was replaced" in message
    assert message.endswith("free some space, then run evaluate.py again")
    assert snapshot(evaluated) == before  # byte-identical, and not even replaced by a copy


def test_after_the_disk_is_freed_evaluate_replaces_everything(ckpt, evaluated):
    before = snapshot(evaluated)
    overrides = [f"ckpt_path={ckpt}", "eval.pairs_seed=1", "eval.plots=false", *EVAL_FAST]
    run_evaluation(compose_eval(overrides, evaluated))
    after = snapshot(evaluated)
    assert after.keys() == before.keys()  # no temporaries left
    for name in after:  # each file replaced; the pictures were not drawn this time
        assert (after[name][1] == before[name][1]) == name.endswith(".png"), name
    assert after["metrics.json"][0] != before["metrics.json"][0]
    siamese.load_embeddings(evaluated, index=evaluated / "index.faiss")


# evaluate.py's process with SIGTERM sent from inside faiss's first write of index.faiss:
# the embeddings are written to their temporaries by then, index.faiss half, nothing renamed.
SIGTERM_WHILE_WRITING = """
import os, signal, sys
from pathlib import Path

import faiss
from helpers import compose_eval
from siamese.cli import report_errors
from siamese.pipelines.evaluate import run_evaluation

writer = faiss.PyCallbackIOWriter


def signalled_writer(write, *args):
    def write_after_sigterm(data):
        os.kill(os.getpid(), signal.SIGTERM)
        return write(data)

    return writer(write_after_sigterm, *args)


faiss.PyCallbackIOWriter = signalled_writer
cfg = compose_eval(sys.argv[2:], Path(sys.argv[1]))
report_errors(lambda: run_evaluation(cfg))()
"""


@pytest.mark.slow  # a subprocess, ~10 s; export.py's in-process twin stays
def test_sigterm_while_evaluating_writes_leaves_no_temporaries(ckpt, evaluated):
    """Python's default SIGTERM ended the process mid-write and left the hidden ``.*.tmp``
    files (megabytes of embeddings); now it unwinds: exit 143, one ``stopped:`` line, the
    previous run's files untouched and no temporary left. The SIGTERM lands inside faiss's
    write callback, which turns the exit into its own RuntimeError on the way out."""
    before = snapshot(evaluated)
    overrides = [f"ckpt_path={ckpt}", "eval.pairs_seed=1", "eval.plots=false", *EVAL_FAST]
    proc = subprocess.run(
        [sys.executable, "-c", SIGTERM_WHILE_WRITING, str(evaluated), *overrides],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT / "tests"), "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        f"stopped: SIGTERM while evaluating; no half-written or temporary file was left in "
        f"{evaluated}: run evaluate.py again"
    ]
    assert snapshot(evaluated) == before  # no .*.tmp, and nothing replaced


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """A finished TorchScript export (unchecked, so its model.json differs from a checked one)."""
    out = tmp_path_factory.mktemp("export")
    overrides = [f"ckpt_path={ckpt}", "format=torchscript", "export.check=false"]
    run_export(compose_config("export", overrides, out))
    return out


@pytest.mark.parametrize("name", ["model.ts", "model.json"])
def test_a_full_disk_while_exporting_keeps_the_previous_export(
    ckpt, exported, monkeypatch, capsys, name
):
    before = snapshot(exported)
    assert set(before) == {"model.ts", "model.json"}
    cfg = compose_config("export", [f"ckpt_path={ckpt}", "format=torchscript"], exported)
    fill_disk_at(monkeypatch, name)
    message = fails_in_one_line(lambda: run_export(cfg), exported / name, capsys)
    assert "No space left on device" in message and message.endswith("then run export.py again")
    assert snapshot(exported) == before


def test_an_export_that_fails_its_check_keeps_the_previous_export(ckpt, exported, monkeypatch):
    before = snapshot(exported)
    monkeypatch.setattr(export_mod, "CHECK_ATOL", -1.0)  # any difference at all fails
    cfg = compose_config("export", [f"ckpt_path={ckpt}", "format=torchscript"], exported)
    with pytest.raises(RuntimeError, match="the exported model.ts differs from PyTorch"):
        run_export(cfg)
    assert snapshot(exported) == before


def test_a_single_write_names_what_was_kept(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    path.write_bytes(b"old")
    fill_disk_at(monkeypatch, "metrics.json", room=2)
    with pytest.raises(WriteError) as err, exports.atomic_write(path) as f:
        f.write(b"new contents")
    message = one_line(err, path)
    assert "the previous file there is intact; free some space, then try again" in message
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_sigterm_while_exporting_leaves_no_temporaries(ckpt, exported, monkeypatch, capsys):
    """export.py unwinds on SIGTERM as evaluate.py does: exit 143, one ``stopped:`` line,
    the previous export untouched and no ``.*.tmp`` left (in-process: the signal is sent
    to this process once the new model file is written, before model.json)."""
    before = snapshot(exported)
    write = export_mod.export_torchscript

    def write_then_sigterm(*args, **kwargs):
        write(*args, **kwargs)
        # Only where run_export's handler would catch it: the default would end pytest.
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(export_mod, "export_torchscript", write_then_sigterm)
    cfg = compose_config("export", [f"ckpt_path={ckpt}", "format=torchscript"], exported)
    with pytest.raises(SystemExit) as stop:
        run_export(cfg)
    assert stop.value.code == 128 + signal.SIGTERM
    assert_fragments(
        capsys.readouterr().err.strip(),
        "stopped: SIGTERM while exporting",
        f"no half-written or temporary file was left in {exported}",
        "run export.py again",
    )
    assert snapshot(exported) == before
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # put back
