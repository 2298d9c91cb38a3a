"""Benchmark: wall time, peak memory and values of retrieval_metrics on synthetic embeddings.

Data: class centres uniform on the unit sphere, each item its class centre plus Gaussian
noise (``--noise`` per dimension), normalised; fixed seed, generated in float32 chunks so
the generator never holds more than the embeddings. Each case runs in a fresh subprocess,
so its peak memory (the RSS high-water mark, data and imports included) is its own.

Cases:
    small    leave-one-out over N x 128 items (default 50,000, 100 classes), exact, every
             metric; then pytorch-metric-learning's AccuracyCalculator(k="max_bin_count")
             on the same data, if installed (it is not a dependency: ``pip install
             pytorch-metric-learning --no-deps``), with the time ratio and the largest
             difference between the values both compute.
    exact1m  10,000 new queries (``--queries``) against a 1,000,000 x 128 gallery (1,000
             classes), exact flat search.
    ivf1m    leave-one-out over all 1,000,000 items with index="ivf" (default nlist and
             nprobe), with approx_recall_at_10.

    python benchmarks/retrieval.py --case small
    python benchmarks/retrieval.py --case all
    python benchmarks/retrieval.py --case ivf1m --n 200000 --classes 200

The 1M cases take minutes on two cores; the goal is a peak under 3 GB for each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
METRICS = (
    "precision_at_1",
    "recall_at_1",
    "recall_at_5",
    "recall_at_10",
    "r_precision",
    "map_at_r",
    "approx_recall_at_10",
)
# pytorch-metric-learning's name for each of our metrics it also computes.
PML_NAMES = {
    "precision_at_1": "precision_at_1",
    "r_precision": "r_precision",
    "map_at_r": "mean_average_precision_at_r",
}
DEFAULTS = {"small": (50_000, 100), "exact1m": (1_000_000, 1_000), "ivf1m": (1_000_000, 1_000)}


def clustered(
    n: int, classes: int, *, dim: int, noise: float, seed: int, stream: int, chunk: int = 65536
) -> tuple[np.ndarray, np.ndarray]:
    """(n, dim) float32 unit-norm embeddings around ``classes`` centres, and their labels.

    The centres depend on ``seed`` only; ``stream`` picks an independent draw of items.
    """
    centres = np.random.default_rng(seed).standard_normal((classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    rng = np.random.default_rng([seed, stream])
    labels = rng.integers(0, classes, n)
    emb = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        x = centres[labels[start:stop]]
        x += noise * rng.standard_normal((stop - start, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        emb[start:stop] = x
    return emb, labels


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def worker(spec: dict) -> dict:
    """Run one measurement in this process; return its figures."""
    data = dict(dim=spec["dim"], noise=spec["noise"], seed=spec["seed"])
    gallery, gallery_labels = clustered(spec["n"], spec["classes"], stream=0, **data)
    query = query_labels = None
    if spec["case"] == "exact1m":
        query, query_labels = clustered(spec["queries"], spec["classes"], stream=1, **data)
    before = peak_gb()

    if spec["impl"] == "pml":
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calculator = AccuracyCalculator(k="max_bin_count", include=tuple(PML_NAMES.values()))
        start = time.perf_counter()
        found = calculator.get_accuracy(gallery, gallery_labels)  # reference = query: LOO
        seconds = time.perf_counter() - start
        values = {ours: float(found[theirs]) for ours, theirs in PML_NAMES.items()}
    else:
        sys.path.insert(0, str(ROOT))
        from siamese.evaluation import retrieval_metrics

        start = time.perf_counter()
        if spec["case"] == "exact1m":
            values = retrieval_metrics(query, query_labels, gallery, gallery_labels)
        elif spec["case"] == "ivf1m":
            values = retrieval_metrics(gallery, gallery_labels, index="ivf")
        else:
            values = retrieval_metrics(gallery, gallery_labels)
        seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_gb": peak_gb(), "before_gb": before, "values": values}


def run(spec: dict) -> dict | None:
    """``worker(spec)`` in a fresh interpreter, so peak memory is this case's alone."""
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        print(f"{spec['case']}/{spec['impl']} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pml_installed() -> bool:
    cmd = [sys.executable, "-c", "import pytorch_metric_learning"]
    return subprocess.run(cmd, capture_output=True, check=False).returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["small", "exact1m", "ivf1m", "all"], default="small")
    parser.add_argument("--n", type=int, help="gallery size (default: 50,000 / 1,000,000)")
    parser.add_argument("--classes", type=int, help="classes (default: 100 / 1,000)")
    parser.add_argument("--queries", type=int, default=10_000, help="exact1m queries")
    parser.add_argument("--noise", type=float, default=0.15, help="per-dimension noise")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-pml", action="store_true", help="skip pytorch-metric-learning")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    cases = ["small", "exact1m", "ivf1m"] if args.case == "all" else [args.case]
    rows = []
    for case in cases:
        n, classes = DEFAULTS[case]
        spec = {
            "case": case,
            "n": args.n or n,
            "classes": args.classes or classes,
            "queries": args.queries,
            "noise": args.noise,
            "dim": args.dim,
            "seed": args.seed,
        }
        impls = ["ours"]
        if case == "small" and not args.no_pml:
            if pml_installed():
                impls.append("pml")
            else:
                print(
                    "pytorch-metric-learning is not installed: skipping the comparison "
                    "(pip install pytorch-metric-learning --no-deps)"
                )
        for impl in impls:
            print(f"running {case}/{impl} (n={spec['n']}, classes={spec['classes']}) ...")
            result = run({**spec, "impl": impl})
            if result is not None:
                rows.append((case, impl, spec, result))

    header = f"{'case':8} {'impl':5} {'n':>9} {'wall s':>8} {'peak GB':>8} {'data GB':>8}"
    print("\n" + header + "".join(f" {name:>19}" for name in METRICS))
    for case, impl, spec, result in rows:
        line = (
            f"{case:8} {impl:5} {spec['n']:>9} {result['seconds']:>8.2f} "
            f"{result['peak_gb']:>8.2f} {result['before_gb']:>8.2f}"
        )
        for name in METRICS:
            value = result["values"].get(name)
            line += f" {'-' if value is None else f'{value:.12f}':>19}"
        print(line)

    by_impl = {impl: result for case, impl, _, result in rows if case == "small"}
    if {"ours", "pml"} <= by_impl.keys():
        ours, pml = by_impl["ours"], by_impl["pml"]
        diff = max(abs(ours["values"][name] - pml["values"][name]) for name in PML_NAMES)
        print(
            f"\nsmall: ours / pytorch-metric-learning time = "
            f"{ours['seconds'] / pml['seconds']:.2f} (goal <= 0.5); largest difference in "
            f"{', '.join(PML_NAMES)}: {diff:.2e}"
        )
    print(f"(load average while running: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
