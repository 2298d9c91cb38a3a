"""train.py under DDP on two CPU processes: batches, frozen backbones, sweeps and stop signals."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import (
    ARCH,
    FOLDER_SHORT,
    HUB_ID,
    SHORT,
    put_in_hf_cache,
    run_script,
    run_scripts,
    timm_state,
    write_class_folders,
)

import siamese
from siamese.metric_names import EVAL_METRICS


@pytest.mark.slow  # train.py on 2 CPU processes: ~40 s
def test_under_ddp_a_frozen_backbone_stays_exactly_the_cached_weights(tmp_path):
    """DDP keeps the frozen backbone's requires_grad (it fixes what it synchronises when it
    wraps the model) and BackboneFreeze drops its gradients: after an epoch frozen, every
    backbone tensor is still the cached one and metrics.json exists."""
    hf = tmp_path / "hf"
    state = timm_state(seed=7)
    put_in_hf_cache(hf, HUB_ID, "model.safetensors", state)
    run = tmp_path / "run"
    env = {"HF_HOME": str(hf), "HF_HUB_OFFLINE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        proc = run_scripts(
            [
                (
                    "train.py",
                    [
                        "trainer=ddp",
                        "trainer.accelerator=cpu",
                        "trainer.devices=2",
                        "debug=fast",
                        "trainer.enable_progress_bar=false",
                        "~callbacks.plots",
                        "model=timm",
                        f"model.name={ARCH}",
                        "model.pretrained=true",
                        "model.image_size=[32,32]",
                        "callbacks.backbone_freeze.unfreeze_at_epoch=1",
                        "callbacks.backbone_freeze.train_bn=false",
                        f"hydra.run.dir={run}",
                    ],
                )
            ],
            timeout=600,
        )[0]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run / "metrics.json").is_file()
    trained = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
        "state_dict"
    ]
    backbone = {
        k[len("tower.backbone.") :]: v
        for k, v in trained.items()
        if k.startswith("tower.backbone.")
    }
    stem = "conv1.0.weight"
    assert torch.equal(backbone[stem], state[stem].sum(1, keepdim=True))
    frozen = [k for k, v in backbone.items() if k != stem and not torch.equal(v, state[k])]
    assert frozen == []  # BatchNorm too: train_bn=false keeps its statistics and parameters
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] > 0  # it trained (the head), one epoch


# A quick train.py run on 2 CPU processes (10 digit classes: 2 x 80 = 10 classes x 16).
DDP_CPU_FAST = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "debug=fast",
    "trainer.enable_progress_bar=false",
    "~callbacks.plots",
    "data.batch_size=80",
]


@pytest.mark.slow  # train.py on 2 processes, ~20 s; in-process 2-process tests stay
def test_train_py_runs_on_two_cpu_processes(tmp_path: Path):
    """``trainer=ddp`` end to end: rank 0 alone writes checkpoints, metrics.json and logs."""
    run = tmp_path / "run"
    proc = run_script(
        "train.py",
        *DDP_CPU_FAST,
        "trainer.limit_train_batches=3",
        "trainer.enable_model_summary=false",
        "eval_pairs=500",
        f"hydra.run.dir={run}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    report = json.loads((run / "metrics.json").read_text())
    # The same keys as one process writes (the digits have 10 classes: no 20-way one-shot).
    tested = {f"test/{n}" for n in (*EVAL_METRICS, "oneshot_5way_1shot")}
    assert {k for k in report if k.startswith("test/")} == tested
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3 and ckpt["epoch"] == 0
    # The synchronised batch norms were turned back: the checkpoint loads as a plain model.
    model = siamese.load(run / "checkpoints" / "best.ckpt")
    assert not any(type(m).__name__ == "CPUSyncBatchNorm" for m in model.modules())
    lines = (run / "csv" / "metrics.csv").read_text().splitlines()
    header = set(lines[0].split(","))
    assert {f"val/{n}" for n in EVAL_METRICS} <= header
    assert {"train/loss_step", "train/loss_epoch", "train/active_fraction"} <= header
    assert sum("train/loss_step" in line for line in lines) == 1  # one writer: rank 0


@pytest.mark.slow
def test_a_local_sweep_of_ddp_runs_keeps_one_sweep_dir_and_one_summary(tmp_path: Path):
    """The DDP processes Lightning starts replay the sweep in step, in the same directory."""
    proc = run_script(
        "train.py",
        "-m",
        *DDP_CPU_FAST,
        "seed=1,2",
        f"paths.log_dir={tmp_path}",
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep,) = (tmp_path / "debug" / "multiruns").iterdir()
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    assert all((sweep / job / "metrics.json").is_file() for job in ("0", "1"))
    assert proc.stdout.count("sweep summary") == 1


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_to_every_process_saves_and_stops_them_all_without_a_hang(
    tmp_path: Path, name: str
):
    """SLURM, ``timeout`` and container runtimes signal every task at once, as a terminal's
    Ctrl-C does. Lightning 2.6's own SIGTERM handler broadcasts from inside the handler and
    can meet the other rank's gradient all-reduce (a hang until the 30-minute gloo/NCCL
    timeout); with LastCheckpoint's handlers the ranks agree at a batch's end, save and exit
    143 (130 for Ctrl-C)."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *DDP_CPU_FAST,
            "trainer.max_epochs=50",
            "trainer.enable_model_summary=false",
            "eval_pairs=500",
            f"hydra.run.dir={run}",
        ],
        cwd=ROOT,
        env={**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a SLURM job step
        # Python's Ctrl-C handler, even when pytest runs where SIGINT is ignored (a & job).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        last = run / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 240
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(1.0)  # into the next epoch's training
        os.killpg(proc.pid, signal.Signals[name])
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.Signals[name], stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1, stderr[-3000:]  # rank 0 alone says it
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    where = f"epoch {ckpt['epoch']}, step {ckpt['global_step']}"
    assert f"at {where}; checkpoints/last.ckpt holds {where}: resume with" in stopped[0]
    if name == "SIGINT":  # the Ctrl-C line, from rank 0 alone
        assert sum(line.startswith("Ctrl-C: ") for line in stderr.splitlines()) == 1
    assert ckpt["global_step"] > 0 and not (run / "metrics.json").exists()


@pytest.mark.slow
def test_sigterm_while_testing_under_ddp_stops_every_process_without_a_hang(tmp_path: Path):
    """The test after fit: rank 1 is slow on its first test batch while rank 0 would run
    ahead to the embeddings' gather. With Lightning's handler, rank 1's broadcast inside it
    meets rank 0's gather; with LastCheckpoint's the ranks agree at a test batch's end and
    both exit 143 with one line."""
    import signal
    import subprocess
    import sys
    import time

    from helpers import ROOT

    run, marker = tmp_path / "run", tmp_path / "testing"
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *DDP_CPU_FAST,
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.enable_model_summary=false",
            "eval_pairs=500",
            f"hydra.run.dir={run}",
            "+callbacks.slow._target_=fault_callbacks.SlowTestOnRank",
            "+callbacks.slow.rank=1",
            "+callbacks.slow.seconds=4",
            f"+callbacks.slow.marker={marker}",
        ],
        cwd=ROOT,
        env={
            **os.environ,
            "WANDB_MODE": "offline",
            "PYTHONWARNINGS": "ignore",
            "PYTHONPATH": str(ROOT / "tests"),
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.5)  # rank 0 is past its first test batch
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    stopped = [line for line in stderr.splitlines() if line.startswith("stopped: ")]
    assert len(stopped) == 1, stderr[-3000:]
    assert stopped[0].startswith("stopped: SIGTERM while testing (training had finished)")
    assert not (run / "metrics.json").exists()


@pytest.mark.slow  # two train.py runs of 2 CPU processes side by side, ~60 s
def test_ddp_on_two_cpu_processes_trains_on_the_default_data_and_on_a_folder(tmp_path):
    root = write_class_folders(tmp_path / "data", {f"class{c}": 20 for c in range(10)})
    ddp = [*SHORT, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]
    runs = {
        "digits": [],
        "folder": ["data=image_folder", f"data.root={root}", *FOLDER_SHORT],
    }
    procs = run_scripts(
        [
            ("train.py", [*ddp, *extra, f"hydra.run.dir={tmp_path / name}"])
            for name, extra in runs.items()
        ],
        timeout=600,
    )
    lines = {
        "digits": "batches: global batches of 320 images on 2 processes (160 each) = 10 classes "
        "x 32 images (asked 2 x 160 / 16 = 20 classes; the training split has 10)",
        "folder": "batches: global batches of 128 images on 2 processes (64 each) = 8 classes x "
        "13 + 2 classes x 12 images (asked 2 x 64 / 4 = 32 classes; the training split has 10)",
    }
    for name, proc in zip(runs, procs, strict=True):
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = tmp_path / name
        assert "test/precision_at_1" in json.loads((run / "metrics.json").read_text())
        logged = [
            line.split("] - ", 1)[-1]
            for log in run.glob("*.log")
            for line in log.read_text().splitlines()
            if "batches:" in line
        ]
        assert logged == [lines[name]], (name, logged)  # once: rank 0 alone
