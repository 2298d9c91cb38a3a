"""export.py run as a user runs it: its run directory, and bad input in one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import one_line_error, run_scripts


@pytest.fixture(scope="module")
def ckpt(export_ckpt: Path) -> Path:
    """The checkpoint exported below: conftest's ``export_ckpt``, shared with tests/unit."""
    return export_ckpt


EXPORT_BAD_INPUT = [
    (["format=foo"], "format='foo' is unknown; choose one of: onnx, torchscript, export"),
    (["ckpt_path=/no/such.ckpt"], "ckpt_path='/no/such.ckpt' does not exist"),
]


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_export_py_writes_into_its_run_directory_and_bad_input_is_one_line(ckpt, tmp_path):
    # Independent commands side by side: one export, then each bad input.
    run_dir = tmp_path / "run"
    proc, *bad = run_scripts(
        [
            ("export.py", [f"ckpt_path={ckpt}", "format=export", f"hydra.run.dir={run_dir}"]),
            *[
                ("export.py", [f"ckpt_path={ckpt}", *args, f"hydra.run.dir={tmp_path}/bad{i}"])
                for i, (args, _) in enumerate(EXPORT_BAD_INPUT)
            ],
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "model.pt2").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert json.loads((run_dir / "model.json").read_text())["format"] == "export"
    for i, ((args, expected), failed) in enumerate(zip(EXPORT_BAD_INPUT, bad, strict=True)):
        assert expected in one_line_error(failed), args
        assert not (tmp_path / f"bad{i}" / "model.json").exists()
