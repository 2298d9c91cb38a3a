"""ImageFolder on tiny folders: modes and sizes, split layouts, warnings, links, bad roots."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from helpers import class_counts, make_image_folder, read_all, save_image

from siamese.data.sources import ImageFolder
from siamese.errors import ConfigError, DataError


def test_image_folder_mixed_modes_and_sizes(tmp_path):
    make_image_folder(tmp_path, {"cat": 10, "dog": 10, "eel": 5})
    splits = ImageFolder(image_size=16, val_fraction=0.2, test_fraction=0.2).load(tmp_path)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 5)
    assert class_counts(splits.val.targets, 3) == [2, 2, 1]
    assert class_counts(splits.test.targets, 3) == [2, 2, 1]
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
    assert class_counts(splits.val.targets, 2) == [2, 2]
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
    assert class_counts(splits.train.targets, 3) == [1, 6, 1]
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
    assert class_counts(splits.train.targets, 3) == [4, 4, 4]
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
