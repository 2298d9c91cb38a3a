"""evaluate.py, export.py and a resumed train.py refuse a checkpoint or sweep that names code."""

from __future__ import annotations

import pytest
import torch
from helpers import FAST, TRAINED, Payload, one_line_error, put_at, resumable_run, run_script


@pytest.mark.slow  # three evaluate.py/export.py processes, ~15 s: in-process above
def test_evaluate_py_and_export_py_say_it_in_one_line_and_exit_2(attack, tmp_path):
    evil = attack(put_at("config.data.augment"))
    proc = run_script(
        "evaluate.py", f"ckpt_path={evil}", f"hydra.run.dir={tmp_path / 'eval'}", cwd=tmp_path
    )
    line = one_line_error(proc)
    assert "hyper_parameters.config.data.augment._target_='torch.load'" in line
    assert not attack.marker.exists()
    text = tmp_path / "config.yaml"
    text.write_text("a: 1\n")
    for script in ("evaluate.py", "export.py"):
        proc = run_script(
            script, f"ckpt_path={text}", f"hydra.run.dir={tmp_path / script}", cwd=tmp_path
        )
        assert "is not a readable checkpoint" in one_line_error(proc)


@pytest.mark.slow  # a train.py resume, ~10 s: with_saved_overrides is tested in-process
def test_train_py_resume_does_not_run_a_saved_target(tmp_path, real_ckpt):
    marker = tmp_path / "PWNED"
    payload = tmp_path / "payload.pt"
    torch.save({"x": Payload(marker)}, payload)
    overrides = [
        *TRAINED,
        "+callbacks.x._target_=torch.load",
        f"+callbacks.x.f={payload}",
        "+callbacks.x.weights_only=false",
    ]
    run = resumable_run(tmp_path, real_ckpt, overrides)
    # The epoch is over in last.ckpt (max_epochs=1): the resume only tests, quickly.
    proc = run_script(
        "train.py", f"hydra.run.dir={run}", "ckpt_path=last", "test=false", cwd=tmp_path
    )
    assert "left out 3 of the overrides" in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists()
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_sweep_run_again_into_its_folder_is_refused_before_hydra_writes(tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "metrics.json").write_text("{}")
    before = sorted(p.relative_to(sweep) for p in sweep.rglob("*"))
    proc = run_script("train.py", "-m", "seed=1,2", f"hydra.sweep.dir={sweep}", *FAST, cwd=tmp_path)
    assert "already holds the runs of an earlier sweep (0)" in one_line_error(proc)
    assert sorted(p.relative_to(sweep) for p in sweep.rglob("*")) == before
