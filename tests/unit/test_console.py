"""The console filter: library chatter goes to the log file only; the closing lines."""

from __future__ import annotations

import io
import logging
import warnings

import pytest

from siamese.console import LIBRARY_LOGGERS, LibraryChatter, next_steps, quiet_console


@pytest.fixture
def handlers(tmp_path):
    """A console and a file handler on the root logger, as Hydra's job logging sets them."""
    # An earlier test's quiet_console may have left warnings captured while pytest restored
    # warnings.showwarning: start from the state a fresh process has.
    logging.captureWarnings(False)
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    libraries = [logging.getLogger(name) for name in LIBRARY_LOGGERS]
    saved_libraries = [(lib.handlers[:], lib.propagate) for lib in libraries]
    console, stream = None, io.StringIO()
    console = logging.StreamHandler(stream)
    logfile = logging.FileHandler(tmp_path / "train.log")
    root.handlers[:] = [console, logfile]
    root.setLevel(logging.INFO)
    yield stream, tmp_path / "train.log"
    logfile.close()
    logging.captureWarnings(False)
    root.handlers[:], root.level = saved
    for lib, (handlers, propagate) in zip(libraries, saved_libraries, strict=True):
        lib.handlers[:], lib.propagate = handlers, propagate


def test_library_chatter_is_kept_in_the_file_and_off_the_console(handlers):
    stream, logfile = handlers
    quiet_console()
    quiet_console()  # twice: still one filter per handler
    console = logging.getLogger().handlers[0]
    assert sum(isinstance(f, LibraryChatter) for f in console.filters) == 1

    lightning = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    lightning.info("💡 Tip: For seamless cloud logging and experiment tracking, try litlogger")
    lightning.info("Trainer already configured with model summary callbacks: [...]")
    lightning.warning("a real Lightning warning")
    lightning.info("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2")
    logging.getLogger("siamese.pipelines.train").info("batch plan: 16 + 16 + 8")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(
            "`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning, stacklevel=1
        )
        warnings.warn("the data has no test split", UserWarning, stacklevel=1)

    shown = stream.getvalue()
    kept = logfile.read_text()
    for line in ("Tip: For seamless", "already configured", "LeafSpec"):
        assert line not in shown
        assert line in kept
    for line in ("a real Lightning warning", "GLOBAL_RANK: 1", "batch plan: 16 + 16", "test split"):
        assert line in shown
        assert line in kept


def test_next_steps_names_the_run_folder_and_quotes_the_command(tmp_path):
    run = tmp_path / "my run"
    text = next_steps(run, ["python", "evaluate.py", f"ckpt_path={run}/checkpoints/best.ckpt"])
    assert text.splitlines() == [
        f"run folder: {run}",
        f"next: python evaluate.py 'ckpt_path={run}/checkpoints/best.ckpt'",
    ]
    assert next_steps("runs/x") == "run folder: runs/x"
