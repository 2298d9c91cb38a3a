"""TorchvisionMNIST on tiny IDX files: three sets, .gz files, offline, failed downloads."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision.datasets
from helpers import IDX_NAMES, class_counts, make_mnist_family, write_idx

from siamese.data.sources import TorchvisionMNIST
from siamese.errors import ConfigError, DataError

FAMILY = [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST"), ("kmnist", "KMNIST")]


@pytest.mark.parametrize(("name", "folder"), FAMILY)
def test_torchvision_mnist_family_from_idx_files(tmp_path, monkeypatch, name, folder):
    def no_network(url, *args, **kwargs):  # download=True below finds the files: no fetch
        raise AssertionError(f"{folder}: tried to fetch {url}")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_network)
    written = make_mnist_family(tmp_path, folder, per_class=4, n_test=20)
    splits = TorchvisionMNIST(name=name, download=False, val_size=10).load(str(tmp_path))
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)
    assert class_counts(splits.train.targets, 10) == [3] * 10
    assert class_counts(splits.val.targets, 10) == [1] * 10
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
