"""Two torchrun launchers train as two nodes on this machine, and stop together on refusal."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from siamese import run_dirs

# As tests/runs/test_ddp_runs.py's DDP_CPU_FAST, with 3 training batches. The default
# data.batch_size=160 per process makes global batches of 320 = 10 classes x 32 images.
SHORT = [
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "debug=fast",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.limit_train_batches=3",
    "~callbacks.plots",
    "eval_pairs=500",
]


TWO_NODES = ["trainer.num_nodes=2", "trainer.devices=1"]


ONE_MACHINE = ["trainer.devices=2"]


TIMEOUT_S = 300


# Throughput: the only column of metrics.csv that differs between two equal runs.
TIMING = ("train/images_per_sec",)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(node_rank: int, port: int) -> list[str]:
    """What a user types on machine ``node_rank`` (``torchrun`` is this module)."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        f"--node-rank={node_rank}",
        "--nproc-per-node=1",
        "--master-addr=127.0.0.1",
        f"--master-port={port}",
        str(ROOT / "train.py"),
    ]


def start(cmd: list[str], cwd: Path, log: Path) -> subprocess.Popen:
    with log.open("w") as out:  # a file, not a pipe: nobody has to drain it meanwhile
        return subprocess.Popen(
            cmd,
            cwd=cwd,
            # One thread per process everywhere: float sums then add up in the same order
            # on both set-ups (torchrun and Lightning's launcher pick thread counts apart).
            env={
                **os.environ,
                "WANDB_MODE": "offline",
                "PYTHONWARNINGS": "ignore",
                "OMP_NUM_THREADS": "1",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: killed with its workers
        )


def wait_all(
    procs: dict[str, subprocess.Popen], logs: dict[str, Path], succeed: bool = True
) -> dict[str, int]:
    """Wait for every command, at most ``TIMEOUT_S``; kill them all and show their output
    at the timeout or, when they should ``succeed``, at the first that fails."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            assert not (succeed and failed), f"{failed} failed"
            assert time.monotonic() < deadline, f"still running after {TIMEOUT_S} s"
            time.sleep(0.2)
        assert not succeed or all(p.returncode == 0 for p in procs.values()), "one failed"
    except AssertionError as exc:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        codes = {n: p.returncode for n, p in procs.items()}
        tails = "".join(f"\n--- {n}\n{logs[n].read_text()[-2000:]}" for n in procs)
        raise AssertionError(f"{exc}; exit codes {codes}{tails}") from None
    return {n: p.returncode for n, p in procs.items()}


def csv_rows(run: Path) -> list[dict[str, str]]:
    with (run / "csv" / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


@pytest.mark.slow  # two 2-process trainings at once: ~90 s on 2 busy cores
def test_two_nodes_train_like_two_processes_on_one_machine(tmp_path: Path):
    shared = tmp_path / "shared"  # the cluster's shared filesystem
    run, single = shared / "run", tmp_path / "one_machine"
    node1_cwd = tmp_path / "node1"  # the other machine's working directory
    node1_cwd.mkdir()
    port = free_port()
    logs = {name: tmp_path / f"{name}.log" for name in ("node0", "node1", "one_machine")}
    procs: dict[str, subprocess.Popen] = {}
    # Both launchers at the same moment, as two job scripts would; and the reference.
    for rank in (0, 1):
        cmd = [*torchrun(rank, port), *SHORT, *TWO_NODES, f"hydra.run.dir={run}"]
        procs[f"node{rank}"] = start(cmd, ROOT if rank == 0 else node1_cwd, logs[f"node{rank}"])
    cmd = [sys.executable, str(ROOT / "train.py"), *SHORT, *ONE_MACHINE, f"hydra.run.dir={single}"]
    procs["one_machine"] = start(cmd, ROOT, logs["one_machine"])
    wait_all(procs, logs)

    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in logs["node1"].read_text()  # it trained with node 0
    # Rank 0 alone wrote the shared folder: one run there, its record and Hydra's own
    # (node 1 runs in another directory: a .hydra/ of its would name that one).
    assert [p.name for p in shared.iterdir()] == ["run"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert run_dirs.read_record(run)["task"] == "debug"
    assert f"cwd: {ROOT}\n" in (run / ".hydra" / "hydra.yaml").read_text()
    assert list(node1_cwd.iterdir()) == []  # nor anything where node 1 ran

    two, one = (json.loads((r / "metrics.json").read_text()) for r in (run, single))
    assert two.pop("checkpoint") == str(run / "checkpoints" / "best.ckpt")
    assert one.pop("checkpoint") == str(single / "checkpoints" / "best.ckpt")
    assert len(two) == 20 and "test/precision_at_1" in two
    assert two == one  # every key, exactly: the same gloo collectives on the same ranks
    # Every step's logged values and the trained weights are equal too.
    assert csv_rows(run) == csv_rows(single)
    weights = [
        torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)[
            "state_dict"
        ]
        for r in (run, single)
    ]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.slow  # two launchers that stop at start, ~15 s
def test_a_folder_rank_0_refuses_stops_both_nodes_without_a_wait(tmp_path: Path):
    """Rank 0 refuses a folder that holds another run; node 1 must not wait for it (until
    the process group's 30-minute timeout): it refuses the same folder itself."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    port = free_port()
    logs = {f"node{rank}": tmp_path / f"node{rank}.log" for rank in (0, 1)}
    procs = {
        f"node{rank}": start(
            [*torchrun(rank, port), *SHORT, *TWO_NODES, f"hydra.run.dir={run}"],
            ROOT,
            logs[f"node{rank}"],
        )
        for rank in (0, 1)
    }
    codes = wait_all(procs, logs, succeed=False)
    assert all(code != 0 for code in codes.values()), codes
    for log in logs.values():  # each node's own worker says why
        assert f"error: hydra.run.dir={str(run)!r} already holds a run (metrics.json)" in (
            log.read_text()
        )
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json"]
