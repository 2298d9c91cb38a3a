"""Benchmark: run ``experiment=`` presets and compare their test metrics with their targets.

Each preset runs as the real ``python train.py experiment=NAME`` (start-up, training,
testing the best checkpoint) and its metrics.json is read back. ``--proxy`` trains the
MNIST-family recipes on the embedded 5,000-digit subset instead of their own data (which
needs the downloaded files): a check of the recipe, not of the target, which is for the
full data set.

    python benchmarks/experiments.py all --proxy
    python benchmarks/experiments.py mnist_triplet --data-root /datasets
    python benchmarks/experiments.py omniglot_koch --data-root /datasets trainer.accelerator=gpu
    python benchmarks/experiments.py mnist_contrastive --proxy trainer.max_epochs=10
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """The figure a preset should reach on its own data, and where it comes from."""

    metric: str  # a key of metrics.json
    value: float
    source: str


TARGETS = {
    "mnist_contrastive": Target(
        "test/precision_at_1", 0.99, "expected for a conv embedding on MNIST; not a paper's"
    ),
    "mnist_triplet": Target(
        "test/precision_at_1", 0.99, "expected for a conv embedding on MNIST; not a paper's"
    ),
    "fashion_mnist_triplet": Target(
        "test/precision_at_1",
        0.90,
        "expected: about what small CNN classifiers reach on Fashion-MNIST",
    ),
    "omniglot_koch": Target(
        "test/oneshot_20way_1shot", 0.92, "Koch et al. 2015, 20-way one-shot on Omniglot"
    ),
}

# The embedded subset stands in for MNIST-like data; mirrored digits are other digits, so
# the garments' horizontal flip is left out there.
PROXY = {
    "mnist_contrastive": ["data=mnist_subset"],
    "mnist_triplet": ["data=mnist_subset"],
    "fashion_mnist_triplet": ["data=mnist_subset", "data.augment.hflip=0.0"],
}

REPORTED = ("test/precision_at_1", "test/roc_auc", "test/map_at_r", "test/oneshot_20way_1shot")


def run_preset(name: str, overrides: list[str], run_dir: Path) -> tuple[dict, float]:
    """Run ``train.py experiment=name`` into ``run_dir``; return metrics.json and wall time."""
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        f"experiment={name}",
        f"hydra.run.dir={run_dir}",
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr)
        sys.exit(f"{name}: train.py exited with {proc.returncode}: {' '.join(cmd)}")
    return json.loads((run_dir / "metrics.json").read_text()), wall


def report(name: str, metrics: dict, wall: float, proxy: bool) -> str:
    target = TARGETS[name]
    values = "  ".join(
        f"{key.removeprefix('test/')} {metrics[key]:.4f}" for key in REPORTED if key in metrics
    )
    reached = metrics.get(target.metric, math.nan)
    if proxy:
        verdict = "not comparable (proxy data)"
    else:
        verdict = "met" if reached >= target.value else "NOT met"
    return (
        f"{name}{' (proxy: embedded subset)' if proxy else ''}: {wall:.0f} s  {values}\n"
        f"  target {target.metric} >= {target.value} ({target.source}): {verdict}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", choices=[*TARGETS, "all"])
    parser.add_argument("--proxy", action="store_true", help="train on the embedded subset")
    parser.add_argument("--data-root", help="data.root for the presets' own data")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_intermixed_args()
    names = list(TARGETS) if args.preset == "all" else [args.preset]
    if args.proxy:
        missing = [n for n in names if n not in PROXY]
        if args.preset != "all" and missing:
            sys.exit(f"{missing[0]} has no proxy on the embedded digits; run it on its own data")
        names = [n for n in names if n in PROXY]
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            overrides = [f"seed={args.seed}", "trainer.enable_progress_bar=false"]
            overrides += PROXY[name] if args.proxy else []
            overrides += [f"data.root={args.data_root}"] if args.data_root else []
            metrics, wall = run_preset(name, [*overrides, *args.overrides], Path(tmp) / name)
            print(report(name, metrics, wall, args.proxy), flush=True)


if __name__ == "__main__":
    main()
