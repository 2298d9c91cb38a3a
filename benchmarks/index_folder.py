"""Benchmark: indexing a large image folder (no image opened) and reading the first batch.

Writes ``--files`` tiny PNGs (the same 16x16 bytes each) into ``--classes`` class folders of
a temporary directory, then times

- ``ImageFolder(...).load(root)``: scanning the folders and splitting them (nothing is
  decoded; the figure should stay at seconds for 100,000 files);
- the first class-balanced training batch of a ``SiameseDataModule`` over those splits
  (``setup`` plus the first batch, with ``--workers`` loader processes);
- the input statistics train.py computes at start-up (4,096 images decoded).

    python benchmarks/index_folder.py
    python benchmarks/index_folder.py --files 1000000 --classes 1000 --workers 4
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from siamese.data.datamodule import SiameseDataModule  # noqa: E402
from siamese.data.sources import ImageFolder  # noqa: E402


def tiny_png() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_folder(root: Path, files: int, classes: int) -> None:
    data = tiny_png()
    for c in range(classes):
        folder = root / f"class{c:04d}"
        folder.mkdir()
        for i in range(c, files, classes):
            (folder / f"{i:07d}.png").write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2, help="loader processes")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--samples-per-class", type=int, default=4)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="index-folder-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_folder(root, args.files, args.classes)
        written = time.perf_counter() - start
        print(f"wrote {args.files:,} files in {args.classes} classes in {written:.1f} s")

        start = time.perf_counter()
        splits = ImageFolder(image_size=16).load(root)
        indexed = time.perf_counter() - start
        count = len(splits.train) + len(splits.val) + len(splits.test)
        assert count == args.files, count
        print(
            f"index: {count:,} files in {indexed:.2f} s ({count / indexed:,.0f} files/s), "
            f"train/val/test {len(splits.train):,}/{len(splits.val):,}/{len(splits.test):,}"
        )

        start = time.perf_counter()
        dm = SiameseDataModule(
            ImageFolder(image_size=16),
            root=str(root),
            batch_size=args.batch_size,
            samples_per_class=args.samples_per_class,
            num_workers=args.workers,
        )
        dm.setup("fit")
        ready = time.perf_counter() - start
        images, labels = next(iter(dm.train_dataloader()))
        first = time.perf_counter() - start
        print(
            f"first training batch {tuple(images.shape)} ({len(labels.unique())} classes): "
            f"{first:.2f} s after start-up began (setup, which indexes again: {ready:.2f} s; "
            f"{args.workers} worker processes, {os.cpu_count()} CPUs)"
        )
        # train.py also reads up to 4,096 training images for the model's input statistics
        # (unless model.input_mean and model.input_std are set).
        start = time.perf_counter()
        dm.input_stats()
        stats = time.perf_counter() - start
        print(f"input statistics (up to 4,096 training images decoded): {stats:.2f} s")


if __name__ == "__main__":
    main()
