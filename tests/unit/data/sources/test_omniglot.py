"""Omniglot on tiny extracted trees and zips: one-shot splits, loops, offline, failures."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.error import URLError

import pytest
import torch
import torchvision.datasets
from helpers import make_omniglot_set, read_all

from siamese.data.datasets import FileImages
from siamese.data.sources import Omniglot
from siamese.errors import ConfigError, DataError

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
