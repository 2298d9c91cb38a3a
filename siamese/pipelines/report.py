"""What a job leaves behind: metrics.json written safely, and a small table on stdout."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from siamese.exports import atomic_write


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    """Write metrics.json atomically: a crash or a full disk never leaves half a file."""
    with atomic_write(path) as f:
        f.write((json.dumps(metrics, indent=2, sort_keys=False) + "\n").encode())


def print_table(
    metrics: dict[str, float], prefix: str, order: Sequence[str] = (), title: str = "test metric"
) -> None:
    """Print ``prefix + name`` entries as ``name  value`` rows: ``order`` first, then the rest."""
    names = [n for n in dict.fromkeys(order) if prefix + n in metrics]  # each name once
    names += sorted({k[len(prefix) :] for k in metrics if k.startswith(prefix)} - set(names))
    width = max([len(n) for n in names] + [len(title)])
    lines = [f"{title:<{width}}  value", f"{'-' * width}  ------"]
    for name in names:
        value = metrics[prefix + name]
        if isinstance(value, int) and not isinstance(value, bool):  # a count
            shown = str(value)
        else:
            shown = f"{value:.4f}" if math.isfinite(value) else "nan"
        lines.append(f"{name:<{width}}  {shown}")
    print("\n".join(lines), flush=True)
