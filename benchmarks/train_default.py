"""Benchmark: wall time and test metrics of the default ``python train.py`` on this machine.

Runs the real command (start-up included) for each seed and prints a table; compare the
figures with the goal of test precision@1 >= 0.98 and ROC-AUC >= 0.998 within 90 s.

    python benchmarks/train_default.py --seeds 0 1 2 [extra overrides ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            run_dir = Path(tmp) / f"seed{seed}"
            cmd = [
                sys.executable,
                str(ROOT / "train.py"),
                f"seed={seed}",
                f"hydra.run.dir={run_dir}",
                "trainer.enable_progress_bar=false",
                *args.overrides,
            ]
            start = time.perf_counter()
            proc = subprocess.run(
                cmd,
                cwd=ROOT,
                capture_output=True,
                text=True,
                env={**os.environ, "WANDB_MODE": "offline"},
            )
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                sys.exit(f"seed {seed}: train.py exited with {proc.returncode}")
            metrics = json.loads((run_dir / "metrics.json").read_text())
            rows.append(
                (
                    seed,
                    wall,
                    metrics["test/precision_at_1"],
                    metrics["test/roc_auc"],
                    metrics["test/map_at_r"],
                )
            )
            print(
                f"seed {seed}: {wall:.1f} s  p@1 {rows[-1][2]:.4f}  "
                f"roc_auc {rows[-1][3]:.5f}  map@r {rows[-1][4]:.4f}",
                flush=True,
            )
    n = len(rows)
    mean = [sum(r[i] for r in rows) / n for i in range(1, 5)]
    print(
        f"mean over {n} seeds: {mean[0]:.1f} s  p@1 {mean[1]:.4f}  roc_auc {mean[2]:.5f}  "
        f"map@r {mean[3]:.4f}"
    )
    print(
        f"min p@1 {min(r[2] for r in rows):.4f}  min roc_auc {min(r[3] for r in rows):.5f}  "
        f"max wall {max(r[1] for r in rows):.1f} s  (cpu threads: {os.cpu_count()})"
    )


if __name__ == "__main__":
    main()
