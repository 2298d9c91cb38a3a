"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=PATH`` (coming with the evaluation issue).

Until then, ``python train.py`` tests the best checkpoint itself and writes metrics.json,
and ``siamese.load(ckpt_path)`` gives a model with ``.embed`` and ``.compare``.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":
    print(
        "error: evaluate.py is not implemented yet; train.py writes test metrics to the run's "
        "metrics.json, and siamese.load(ckpt_path) embeds and compares images",
        file=sys.stderr,
    )
    sys.exit(2)
