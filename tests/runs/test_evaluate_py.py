"""evaluate.py run as a user runs it: end to end, and bad input in one line."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import EVAL_FAST, compose_eval, one_line_error, run_scripts

from siamese.errors import ConfigError
from siamese.pipelines.evaluate import run_evaluation


@pytest.fixture(scope="module")
def trained(evaluate_trained: Path) -> Path:
    """The run evaluated below: conftest's ``evaluate_trained``, shared with tests/unit."""
    return evaluate_trained


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_evaluate_py_end_to_end_and_bad_input(trained, tmp_path):
    ckpt = trained / "checkpoints" / "best.ckpt"
    (tmp_path / "corrupt.ckpt").write_bytes(b"not a checkpoint")
    # The command line's own paths to one line: a missing key (Hydra) and an unknown option
    # (before Hydra); what run_evaluation refuses is checked in-process below.
    cases = [
        ([], "ckpt_path is required"),
        ([f"ckpt_path={ckpt}", "index=annoy"], "unknown index=annoy; choose one of: flat, hnsw"),
    ]
    # Independent commands side by side: the good run first, then the bad inputs.
    proc, *procs = run_scripts(
        [
            ("evaluate.py", [f"ckpt_path={ckpt}", *EVAL_FAST, f"hydra.run.dir={tmp_path / 'ok'}"]),
            *[
                ("evaluate.py", [*args, f"hydra.run.dir={tmp_path / str(i)}"])
                for i, (args, _) in enumerate(cases)
            ],
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision_at_1" in proc.stdout and "oneshot_5way_1shot" in proc.stdout
    assert (tmp_path / "ok" / ".hydra" / "config.yaml").is_file()
    assert (tmp_path / "ok" / "metrics.json").is_file()
    for (args, expected), bad in zip(cases, procs, strict=True):
        assert expected in one_line_error(bad), args
    for name, expected in [
        ("missing.ckpt", "missing.ckpt' does not exist"),
        ("corrupt.ckpt", "corrupt.ckpt' is not a readable checkpoint"),
    ]:
        with pytest.raises(ConfigError, match=expected):
            run_evaluation(compose_eval([f"ckpt_path={tmp_path / name}"], tmp_path / "x"))
