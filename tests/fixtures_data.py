"""Tiny data sets in their real on-disk formats (MNIST IDX, Omniglot, folders) and set readers."""

from __future__ import annotations

import gzip
import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from siamese.data.datasets import LabelledImages

IDX_NAMES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """Write a uint8 array as an IDX file: magic 0x0000080N (N dims), big-endian sizes, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    data = header + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_mnist_family(
    root: Path,
    folder: str,
    per_class: int = 4,
    n_test: int = 20,
    compress: bool = False,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Write ``root/<folder>/raw/`` IDX files (``folder`` is MNIST, FashionMNIST or KMNIST).

    Returns {"train": (images, labels), "test": (images, labels)} as written.
    """
    rng = np.random.default_rng(seed)
    train_labels = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
    test_labels = (np.arange(n_test) % 10).astype(np.uint8)
    arrays = {}
    for split, labels in (("train", train_labels), ("test", test_labels)):
        images = rng.integers(0, 256, size=(labels.size, 28, 28), dtype=np.uint8)
        image_name, label_name = IDX_NAMES[split]
        write_idx(root / folder / "raw" / image_name, images, compress)
        write_idx(root / folder / "raw" / label_name, labels, compress)
        arrays[split] = (images, labels)
    return arrays


def make_omniglot_set(
    root: Path, name: str, alphabets: dict[str, list[int]], size: int = 20, as_zip: bool = False
) -> list[str]:
    """Write ``root/omniglot-py/<name>/<alphabet>/<character>/*.png`` (1-bit, like the real set).

    ``alphabets`` maps an alphabet to its characters' image counts. With ``as_zip`` only
    ``<name>.zip`` (holding the ``<name>/`` tree) is left. Returns "alphabet/character"
    names in sorted order.
    """
    base = root / "omniglot-py"
    rng = np.random.default_rng(len(alphabets))
    names = []
    for alphabet, counts in sorted(alphabets.items()):
        for c, count in enumerate(counts):
            character = f"character{c + 1:02d}"
            folder = base / name / alphabet / character
            folder.mkdir(parents=True)
            for i in range(count):
                strokes = rng.random((size, size)) > 0.2  # white page, black strokes
                Image.fromarray(strokes).convert("1").save(folder / f"{c:04d}_{i + 1:02d}.png")
            names.append(f"{alphabet}/{character}")
    if as_zip:
        with zipfile.ZipFile(base / f"{name}.zip", "w") as zf:
            for dirpath, _, files in os.walk(base / name):
                for file in files:
                    full = Path(dirpath) / file
                    zf.write(full, full.relative_to(base))
        for dirpath, dirs, files in os.walk(base / name, topdown=False):
            for file in files:
                os.remove(Path(dirpath) / file)
            for d in dirs:
                os.rmdir(Path(dirpath) / d)
        os.rmdir(base / name)
    return sorted(names)


def save_image(path: Path, mode: str, size: tuple[int, int], seed: int = 0) -> None:
    """Save a random image of a PIL ``mode`` ("L", "RGB", "RGBA", "P", "I;16") and (w, h)."""
    rng = np.random.default_rng(seed)
    w, h = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, size=(h, w), dtype=np.uint16))
    elif mode == "L":
        img = Image.fromarray(rng.integers(0, 256, size=(h, w), dtype=np.uint8))
    else:
        rgba = rng.integers(0, 256, size=(h, w, 4), dtype=np.uint8)
        img = Image.fromarray(rgba, "RGBA")
        if mode == "RGB":
            img = img.convert("RGB")
        elif mode == "P":
            img = img.convert("RGB").quantize(16)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


MIXED = [  # (file name, PIL mode, (w, h)): every mode and size an image folder may hold
    ("gray.png", "L", (30, 20)),
    ("colour.jpg", "RGB", (17, 41)),
    ("alpha.png", "RGBA", (64, 64)),
    ("palette.gif", "P", (25, 25)),
    ("deep.png", "I;16", (12, 40)),
    ("bitmap.BMP", "RGB", (8, 8)),
    ("still.webp", "RGB", (33, 21)),
    ("scan.tiff", "L", (40, 30)),
    ("raw.pgm", "L", (16, 16)),
    ("raw.ppm", "RGB", (16, 18)),
]


def make_image_folder(root: Path, counts: dict[str, int]) -> dict[str, list[Path]]:
    """Write ``root/<class>/<image>`` with ``counts[class]`` images cycling through ``MIXED``."""
    written: dict[str, list[Path]] = {}
    k = 0
    for name, count in counts.items():
        for i in range(count):
            file, mode, size = MIXED[k % len(MIXED)]
            path = root / name / f"{i:03d}_{file}"
            save_image(path, mode, size, seed=k)
            written.setdefault(name, []).append(path)
            k += 1
    return written


def class_counts(targets: torch.Tensor, n: int) -> list[int]:
    """How many items of each of ``n`` classes ``targets`` holds."""
    return torch.bincount(targets, minlength=n).tolist()


def read_all(images: LabelledImages) -> torch.Tensor:
    """Every image of a set in one batch, checking the batch's labels are the set's targets."""
    x, y = images.__getitems__(list(range(len(images))))
    assert torch.equal(y, images.targets)
    return x
