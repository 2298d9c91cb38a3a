"""train.py killed or signalled mid-run, then resumed: same metrics, one line, exit 143."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
import torch
from helpers import ROOT, RUN, TESTING_STOPPED, run_scripts, train


def train_epoch_logs(run_dir: Path) -> list[float]:
    """Every epoch's train/ means in the run's CSV log, in order."""
    keys = ("train/loss_epoch", "train/active_fraction", "train/pos_distance", "train/neg_distance")
    with (run_dir / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss_epoch")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    return [float(r[k]) for r in rows for k in keys]


@pytest.mark.slow  # three train.py runs, ~25 s
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

    # The resumed run composes the killed run's overrides (kept in last.ckpt) but the killer:
    # a saved override that names code (a _target_) is not replayed without the command's
    # say-so (resume.trust_overrides=true), and one line names it.
    resumed = train(tmp_path / "killed", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    left_out = next(line for line in resumed.stderr.splitlines() if "left out" in line)
    assert left_out.startswith(
        f"resuming {tmp_path / 'killed'}: left out 2 of the overrides saved in last.ckpt"
    )
    assert left_out.split(": ")[2].startswith(" ".join(kill)), left_out
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


@pytest.mark.slow  # two train.py runs, ~12 s; the in-process cases stay
def test_sigterm_while_testing_or_after_fit_in_train_py_exits_143_with_one_line(
    tmp_path: Path, monkeypatch
):
    """The runs of issue 18: SIGTERM while the split is scored (its one test batch is the
    last: Lightning logged "Received SIGTERM", tested on and exited 0), and in on_fit_end,
    after fit gave its handlers back (a bare 143, nothing said)."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT / "tests"))  # fault_callbacks, for Hydra
    quick = [
        "trainer.accelerator=cpu",
        "trainer.devices=1",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
        "~callbacks.plots",
        "eval_pairs=100",
        "+callbacks.term._target_=fault_callbacks.SignalAt",
    ]
    runs = {hook: tmp_path / hook for hook in ("test_epoch_end", "fit_end")}
    procs = run_scripts(
        [
            ("train.py", [*quick, f"+callbacks.term.hook={hook}", f"hydra.run.dir={run}"])
            for hook, run in runs.items()
        ]
    )
    testing, after_fit = runs.values()
    best = testing / "checkpoints" / "best.ckpt"
    want = {
        testing: f"{TESTING_STOPPED.replace('step 2', 'step 1')}; its checkpoints are complete: "
        f"test with python evaluate.py ckpt_path={best} (or rerun with ckpt_path=last "
        f"hydra.run.dir={testing})",
        after_fit: "stopped: SIGTERM while training, at epoch 1, step 1; checkpoints/last.ckpt "
        f"holds epoch 0, step 1: resume with ckpt_path=last hydra.run.dir={after_fit}",
    }
    for proc, run in zip(procs, runs.values(), strict=True):
        assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        stopped = [line for line in proc.stderr.splitlines() if line.startswith("stopped")]
        assert stopped == [want[run]]
        assert (run / "checkpoints" / "best.ckpt").is_file()
        assert not (run / "metrics.json").exists()
