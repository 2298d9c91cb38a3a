"""Image files that cannot be read: every readable mode converted, the rest refused or skipped."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import CONF, compose_train, write_folder_with_bad_files
from PIL import Image
from torch.utils.data import DataLoader

from siamese.cli import group_options
from siamese.data import SiameseDataModule
from siamese.data.datamodule import ordered_loader
from siamese.data.datasets import (
    BadFiles,
    ConcatImages,
    FileImages,
    ImageReadError,
    TensorImages,
    UndecodableImage,
    WithIndices,
    decode_image,
    finalize_bad_files,
    identity_collate,
)
from siamese.data.sources import ImageFolder
from siamese.errors import DataError
from siamese.inference import read_images

WHITE, RED, BLUE = (255, 255, 255), (255, 0, 0), (0, 0, 255)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A valid PNG header claiming ``width`` x ``height`` grayscale pixels (10 bytes of data)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + png_chunk(b"IEND", b"")
    )


def encoded(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def halves(top, bottom, mode: str) -> Image.Image:
    """An 8x8 image of ``mode``: rows 0-3 ``top``, rows 4-7 ``bottom``."""
    img = Image.new(mode, (8, 8), top)
    img.paste(bottom, (0, 4, 8, 8))
    return img


def noise(mode: str, size: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


# Readable files: name -> (how to write it, expected RGB of the top rows, of the bottom rows,
# tolerance). Images are 8x8 and read at 8x8 (no resizing blurs the halves), but for
# huge.jpg, 6000x6000 and decoded in draft mode.
def _palette_with_transparency() -> Image.Image:
    img = halves(0, 1, "P")
    img.putpalette([*RED, *BLUE] + [0] * 762)
    return img


READABLE = {
    "gray.png": (lambda: encoded(Image.new("L", (8, 8), 77), "PNG"), (77,) * 3, (77,) * 3, 0),
    "cmyk.jpg": (
        lambda: encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95),
        RED,
        RED,
        4,
    ),
    "deep16.png": (  # 16-bit: 21845 / 257 = 85, not clipped to white
        lambda: encoded(Image.fromarray(np.full((8, 8), 21845, np.uint16)), "PNG"),
        (85,) * 3,
        (85,) * 3,
        0,
    ),
    "deep32.tif": (  # 32-bit integers in 0..65535: 51400 / 257 = 200
        lambda: encoded(Image.fromarray(np.full((8, 8), 51400, np.int32)), "TIFF"),
        (200,) * 3,
        (200,) * 3,
        0,
    ),
    "float.tif": (  # floats in 0..1: 0.5 -> 128
        lambda: encoded(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF"),
        (128,) * 3,
        (128,) * 3,
        0,
    ),
    "rgba.png": (
        lambda: encoded(halves((*RED, 0), (*BLUE, 255), "RGBA"), "PNG"),
        WHITE,  # fully transparent red: the white background
        BLUE,
        0,
    ),
    "palette_alpha.png": (
        lambda: encoded(_palette_with_transparency(), "PNG", transparency=0),
        WHITE,
        BLUE,
        0,
    ),
    "la.png": (lambda: encoded(halves((0, 0), (100, 255), "LA"), "PNG"), WHITE, (100,) * 3, 0),
    "bit.png": (lambda: encoded(halves(0, 1, "1"), "PNG"), (0,) * 3, WHITE, 0),
    "palette.gif": (
        lambda: encoded(Image.new("RGB", (8, 8), (10, 200, 30)).quantize(4), "GIF"),
        (10, 200, 30),
        (10, 200, 30),
        0,
    ),
    "huge.jpg": (
        lambda: encoded(Image.new("RGB", (6000, 6000), (30, 60, 200)), "JPEG", quality=90),
        (30, 60, 200),
        (30, 60, 200),
        4,
    ),
}


# Grayscale reads of some of them (ITU-R 601 luma): red 76, blue 29.
GRAY = {"cmyk.jpg": (76, 76, 3), "deep16.png": (85, 85, 0), "rgba.png": (255, 29, 0)}


GRAY |= {"la.png": (255, 100, 0), "bit.png": (0, 255, 0), "huge.jpg": (67, 67, 4)}


UNREADABLE = {  # name -> (bytes, a word of the reason)
    "truncated.png": (encoded(noise("RGB", 32), "PNG")[:1500], ""),
    "truncated.jpg": (encoded(noise("RGB", 64), "JPEG")[:2000], ""),
    "empty.png": (b"", "empty file"),
    "random.jpg": (np.random.default_rng(1).bytes(600), "not an image format"),
    "bomb.png": (bomb_png(), "too large"),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> tuple[list[str], dict[str, Path]]:
    """Every kind of file in one folder; returns (names in item order, name -> path).

    Readable and unreadable names alternate, so the first unreadable item is item 1.
    """
    folder = tmp_path_factory.mktemp("zoo")
    paths = {}
    for name, (write, *_) in READABLE.items():
        paths[name] = folder / name
        paths[name].write_bytes(write())
    for name, (data, _) in UNREADABLE.items():
        paths[name] = folder / name
        paths[name].write_bytes(data)
    good, bad = list(READABLE), list(UNREADABLE)
    order = [n for pair in zip(good, bad + [None] * len(good), strict=False) for n in pair if n]
    return order, paths


def zoo_images(zoo, channels: int = 3, bad_files: BadFiles | None = None) -> FileImages:
    order, paths = zoo
    return FileImages(
        [paths[n] for n in order], [0] * len(order), ["all"], (8, 8), channels, bad_files
    )


def rows(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel 0..255 values of an image's top half and bottom half (each uniform)."""
    pixels = (image * 255).round()
    top, bottom = pixels[:, :4], pixels[:, 4:]
    for half in (top, bottom):
        assert (half.amax(dim=(1, 2)) - half.amin(dim=(1, 2))).max() <= 2  # uniform
    return top.mean(dim=(1, 2)), bottom.mean(dim=(1, 2))


def test_every_readable_kind_converts_to_the_expected_pixels(zoo):
    order, _ = zoo
    for channels, expected in ((3, READABLE), (1, GRAY)):
        files = zoo_images(zoo, channels, BadFiles(skip=True))
        images, _, kept = files.read(range(len(order)))
        assert images.shape == (len(READABLE), channels, 8, 8) and images.dtype == torch.float32
        by_name = {order[i]: image for i, image in zip(kept.tolist(), images, strict=True)}
        assert set(by_name) == set(READABLE)
        for name, spec in expected.items():
            top, bottom, tol = spec[1:] if channels == 3 else ((spec[0],), (spec[1],), spec[2])
            got_top, got_bottom = rows(by_name[name])
            assert torch.allclose(got_top, torch.tensor(top, dtype=torch.float32), atol=tol), name
            assert torch.allclose(got_bottom, torch.tensor(bottom, dtype=torch.float32), atol=tol)


def test_unreadable_files_are_refused_by_default_with_the_first_path(zoo):
    order, paths = zoo
    first_bad = str(paths[order[1]])
    assert order[1] in UNREADABLE
    files = zoo_images(zoo)
    for read in (files.__getitems__, files.read, WithIndices(files).__getitems__):
        with pytest.raises(ImageReadError) as err:
            read(list(range(len(order))))
        message = str(err.value)
        assert message.startswith(f"cannot read image {first_bad!r} (") and "\n" not in message
        assert "fix or remove it, or set data.skip_bad_files=true" in message
    listed = zoo_images(zoo, bad_files=BadFiles(log_path="/run/bad_files.txt"))
    with pytest.raises(ImageReadError, match=r"images and list them in /run/bad_files.txt$"):
        listed.__getitems__([1])


def test_skipped_files_are_listed_once_sorted_also_from_worker_processes(zoo, tmp_path, caplog):
    order, paths = zoo
    log_path = tmp_path / "run" / "bad_files.txt"
    files = zoo_images(zoo, bad_files=BadFiles(skip=True, log_path=str(log_path)))
    every = list(range(len(order)))
    for _ in range(2):  # the second pass meets each file again: no second warning or line
        _, _, kept = files.read(every)
        assert [order[i] for i in kept] == [n for n in order if n in READABLE]
    warnings = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(warnings) == len(UNREADABLE)
    # Two worker processes, each with its own copy of the policy, append the same files again.
    fresh = zoo_images(zoo, bad_files=BadFiles(skip=True, log_path=str(log_path)))
    batches = list(ordered_loader(fresh, 4, num_workers=2))
    assert sum(len(items) for _, _, items in batches) == len(READABLE)
    assert len(log_path.read_text().splitlines()) > len(UNREADABLE)

    listed = finalize_bad_files(log_path)
    assert listed == sorted(str(paths[n]) for n in UNREADABLE)
    lines = log_path.read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == listed
    reasons = dict(line.split("\t") for line in lines)
    for name, (_, word) in UNREADABLE.items():
        assert word in reasons[str(paths[name])], (name, reasons[str(paths[name])])
    assert finalize_bad_files(tmp_path / "none.txt") == []


def test_workers_report_an_unreadable_file_in_one_line(zoo):
    """torch re-raises a worker's error with the worker's traceback in its message."""
    order, paths = zoo
    batches = iter(ordered_loader(zoo_images(zoo), 4, num_workers=2))
    with pytest.raises(ImageReadError) as err:
        list(batches)
    # torch's own clean-up: left to the garbage collector (the error's traceback holds the
    # iterator in a cycle), it waits 5 s for each worker.
    batches._shutdown_workers()
    assert str(err.value).startswith(f"cannot read image {str(paths[order[1]])!r} (")
    assert "\n" not in str(err.value) and "Traceback" not in str(err.value)


def value(image: torch.Tensor) -> int:
    return int((image[0, 0, 0] * 255).round())


def test_training_batches_replace_a_bad_image_by_one_of_its_class(tmp_path):
    # Items 0-2 are class a, 3-7 class b, 8-9 class c; the readable ones hold value 10 * item.
    paths = [
        *(tmp_path / f"a{i}.png" for i in range(3)),
        *(tmp_path / f"b{i}.png" for i in range(5)),
        *(tmp_path / f"c{i}.png" for i in range(2)),
    ]
    targets = [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    bad = {2, 4, 5, 6, 8, 9}
    for i, path in enumerate(paths):
        if i in bad:
            path.write_bytes(b"GIF89a garbage")
        else:
            Image.new("L", (8, 8), 10 * i).save(path)
    files = FileImages(paths, targets, ["a", "b", "c"], (8, 8), 1, BadFiles(skip=True))

    images, labels = files.__getitems__([2, 4, 0, 5, 6])
    assert images.shape == (5, 1, 8, 8) and labels.tolist() == [0, 1, 0, 1, 1]
    # a's last item cycles to a/0; b's next readable after 4, 5 and 6 is 7.
    assert [value(x) for x in images] == [0, 70, 0, 70, 70]
    with pytest.raises(ImageReadError, match=r"every image of class 'c' in this split"):
        files.__getitems__([8])

    # Evaluation leaves them out; a set of several parts maps its rows back.
    out, labels, kept = WithIndices(files).__getitems__([0, 2, 3, 4, 7])
    assert kept.tolist() == [0, 3, 7] and labels.tolist() == [0, 1, 1] and len(out) == 3
    memory = TensorImages(
        torch.full((2, 1, 8, 8), 200, dtype=torch.uint8), torch.tensor([0, 1]), list("abc")
    )
    both = ConcatImages([files.subset(range(8)), memory])
    out, labels, kept = both.read([9, 4, 1, 8, 2])
    assert kept.tolist() == [9, 1, 8] and [value(x) for x in out] == [200, 10, 200]
    empty, labels, kept = both.read([2, 4])
    assert empty.shape == (0, 1, 8, 8) and len(labels) == len(kept) == 0


def test_data_module_skips_and_lists_bad_files_in_every_stage(tmp_path):
    names = {"a": (5, ["bad1.png"]), "b": (5, []), "c": (5, ["bad2.jpg", "bad3.jpg"])}
    bad = write_folder_with_bad_files(tmp_path / "data", {**names, "d": (5, [])})
    log_path = tmp_path / "run" / "bad_files.txt"
    source = ImageFolder(image_size=8, channels=1, val_fraction=0.2, test_fraction=0.2)
    dm = SiameseDataModule(
        source,
        root=str(tmp_path / "data"),
        batch_size=8,
        samples_per_class=2,
        eval_batch_size=3,
        num_workers=2,
        skip_bad_files=True,
        bad_files=str(log_path),
    )
    dm.setup("fit")
    mean, _ = dm.input_stats()  # every training image, the bad ones left out
    assert 0 < mean[0] < 1
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 1, 8, 8) and labels.unique(return_counts=True)[1].tolist() == [2] * 4
    splits = dm.load_splits()
    for split, loader in ((splits.val, dm.val_dataloader()), (splits.test, dm.test_dataloader())):
        items = torch.cat([batch[2] for batch in loader])
        readable = [i for i, p in enumerate(split.paths) if "bad" not in Path(p).name]
        assert sorted(items.tolist()) == readable
    dm.teardown("fit")
    assert finalize_bad_files(log_path) == sorted(str(p) for p in bad)

    refusing = SiameseDataModule(
        source, root=str(tmp_path / "data"), batch_size=8, samples_per_class=2
    )
    assert any("bad" in p for p in refusing.load_splits().train.paths)
    with pytest.raises(ImageReadError, match=r"cannot read image '.*bad\d\.(png|jpg)'"):
        refusing.input_stats()


def test_fuzz_random_bytes_never_crash_a_loader(tmp_path):
    """Random bytes, real headers followed by garbage, cut and bit-flipped real images: each
    file is either converted or listed, through two worker processes."""
    rng = np.random.default_rng(0)
    real = {
        ".png": encoded(noise("RGB", 24, 1), "PNG"),
        ".jpg": encoded(noise("RGB", 24, 2), "JPEG"),
        ".gif": encoded(noise("P", 24, 3), "GIF"),
        ".bmp": encoded(noise("RGB", 24, 4), "BMP"),
        ".tiff": encoded(noise("L", 24, 5), "TIFF"),
        ".webp": encoded(noise("RGB", 24, 6), "WEBP"),
    }
    headers = {
        ".png": b"\x89PNG\r\n\x1a\n",
        ".jpg": b"\xff\xd8\xff\xe0",
        ".gif": b"GIF89a",
        ".bmp": b"BM",
        ".tiff": b"II*\x00",
        ".webp": b"RIFF\x00\x00\x00\x00WEBPVP8 ",
    }
    exts = sorted(real)
    classes = 4
    paths, targets = [], []
    for i in range(200):
        ext = exts[i % len(exts)]
        kind = i % 4
        if kind == 0:  # random bytes
            data = rng.bytes(int(rng.integers(0, 2000)))
        elif kind == 1:  # a real header, then garbage
            data = headers[ext] + rng.bytes(int(rng.integers(0, 2000)))
        elif kind == 2:  # a real image cut short
            data = real[ext][: int(rng.integers(1, len(real[ext])))]
        else:  # a real image with a few bytes changed
            flipped = bytearray(real[ext])
            for at in rng.integers(0, len(flipped), 4):
                flipped[at] = int(rng.integers(0, 256))
            data = bytes(flipped)
        path = tmp_path / f"fuzz{i:03d}{ext}"
        path.write_bytes(data)
        paths.append(path)
        targets.append(i % classes)
    for c in range(classes):  # enough readable images for every class
        for j in range(3):
            path = tmp_path / f"good{c}_{j}.png"
            Image.new("RGB", (10, 10), (c * 50, j * 50, 0)).save(path)
            paths.append(path)
            targets.append(c)
    log_path = tmp_path / "bad_files.txt"
    files = FileImages(paths, targets, list("wxyz"), (16, 16), 3, BadFiles(True, str(log_path)))

    kept = torch.cat([items for _, _, items in ordered_loader(files, 32, num_workers=2)])
    listed = set(finalize_bad_files(log_path))
    converted = {str(paths[i]) for i in kept.tolist()}
    assert not converted & listed and converted | listed == {str(p) for p in paths}
    assert len(listed) > 100  # most fuzz files are unreadable

    # Training batches: every row read or replaced by one of its class, labels unchanged.
    batches = [list(range(s, min(s + 24, len(paths)))) for s in range(0, len(paths), 24)]
    loader = DataLoader(files, batch_sampler=batches, collate_fn=identity_collate, num_workers=2)
    for batch, (images, labels) in zip(batches, loader, strict=True):
        assert images.shape == (len(batch), 3, 16, 16) and torch.isfinite(images).all()
        assert labels.tolist() == [targets[i] for i in batch]


def test_indexing_opens_no_image(tmp_path, monkeypatch):
    for c in range(50):
        folder = tmp_path / f"class{c:02d}"
        folder.mkdir()
        for i in range(100):  # empty: opening any of them would fail
            (folder / f"{i:03d}.jpg").touch()
    opened = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    splits = ImageFolder().load(tmp_path)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 5000
    assert opened == []
    with pytest.raises(ImageReadError, match="empty file"):
        splits.train[0]
    assert len(opened) == 1  # the counter sees the reads


def test_every_data_config_refuses_bad_files_by_default_and_lists_them_in_the_run_dir(tmp_path):
    for data in group_options("data", CONF):
        cfg = compose_train([f"data={data}"], tmp_path)
        assert cfg.data.skip_bad_files is False, data
        assert cfg.data.bad_files == f"{tmp_path}/bad_files.txt", data


def finishes(fn, fifos: Sequence[Path], seconds: float = 60.0):
    """``fn()``, run in a thread so that a reader blocked on a FIFO fails the test instead
    of hanging the suite (the FIFOs are then opened for writing, which frees the reader)."""
    result: dict[str, object] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # re-raised in the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(5)
        pytest.fail(f"still reading after {seconds} s: blocked on a FIFO among {fifos}")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


def test_a_fifo_named_like_an_image_is_refused_or_skipped_never_read(tmp_path, caplog):
    write_folder_with_bad_files(tmp_path / "data", {"a": (8, []), "b": (8, [])})
    fifo = tmp_path / "data" / "a" / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(UndecodableImage, match=r"not a regular file but a named pipe \(FIFO\)"):
        finishes(lambda: decode_image(str(fifo), (8, 8), 1), [fifo])

    # Listing opens nothing: the FIFO is listed, and reading it follows data.skip_bad_files.
    source = ImageFolder(image_size=8, channels=1, val_fraction=0.25, test_fraction=0.25)
    refusing = SiameseDataModule(source, root=str(tmp_path / "data"), batch_size=4)
    splits = finishes(refusing.load_splits, [fifo])
    (holder,) = [s for s in splits.as_tuple() if str(fifo) in s.paths]
    with pytest.raises(ImageReadError) as err:
        finishes(lambda: list(ordered_loader(holder, 3)), [fifo])
    assert str(err.value).startswith(
        f"cannot read image {str(fifo)!r} (not a regular file but a named pipe (FIFO))"
    )
    assert "\n" not in str(err.value) and "data.skip_bad_files=true" in str(err.value)

    log_path = tmp_path / "run" / "bad_files.txt"
    skipping = SiameseDataModule(
        source,
        root=str(tmp_path / "data"),
        batch_size=4,
        skip_bad_files=True,
        bad_files=str(log_path),
    )
    with caplog.at_level(logging.WARNING, logger="siamese.data.datasets"):
        splits = finishes(skipping.load_splits, [fifo])
        for split in splits.as_tuple():
            batches = finishes(lambda split=split: list(ordered_loader(split, 3)), [fifo])
            kept = sum(len(items) for _, _, items in batches)
            assert kept == len(split) - (str(fifo) in split.paths)
    assert any("x.png" in r.getMessage() and "FIFO" in r.getMessage() for r in caplog.records)
    assert finalize_bad_files(log_path) == [str(fifo)]

    # strict refuses it when indexing, naming it.
    with pytest.raises(DataError) as err:
        finishes(lambda: ImageFolder(strict=True).load(tmp_path / "data"), [fifo])
    assert str(err.value).startswith(f"{str(fifo)!r} (a named pipe (FIFO)) in ")
    assert "strict=false" in str(err.value)


def tiny_model(channels: int, height: int, width: int) -> SimpleNamespace:
    """What read_images asks of a model: its tower's input shape."""
    return SimpleNamespace(tower=SimpleNamespace(input_shape=(channels, height, width)))


def test_read_images_refuses_a_fifo_and_skips_link_loops(tmp_path, caplog):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/b.png"]):
        Image.new("L", (8, 8), 50 * (i + 1)).save(folder / name)
    (folder / "sub" / "self").symlink_to(".")
    (folder / "up").symlink_to("..")
    (folder / "knot.png").symlink_to("knot.png")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    Image.new("L", (8, 8), 200).save(elsewhere / "c.png")
    (folder / "linked").symlink_to(elsewhere)  # a linked folder is followed once

    with caplog.at_level(logging.WARNING, logger="siamese.data.sources"):
        images, paths = finishes(lambda: read_images(folder, tiny_model(1, 8, 8)), [])
    assert paths == [str(folder / n) for n in ("a.png", "linked/c.png", "sub/b.png")]
    assert [value(x) for x in images] == [50, 200, 100]
    loops = sorted(r.getMessage() for r in caplog.records if "symbolic link" in r.getMessage())
    assert len(loops) == 3 and "knot.png" in loops[0] and "self" in loops[1] and "up" in loops[2]

    fifo = folder / "sub" / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(DataError) as err:
        finishes(lambda: read_images(folder, tiny_model(1, 8, 8)), [fifo])
    assert str(err.value).startswith(f"cannot read image {str(fifo)!r} (not a regular file")
    with pytest.raises(DataError, match="named pipe"):
        finishes(lambda: read_images([fifo], tiny_model(1, 8, 8)), [fifo])


def test_exif_orientation_turns_a_phone_photo_upright(tmp_path):
    # Stored 16 wide x 8 tall, red left and blue right; tag 6 says "turn 90 degrees
    # clockwise to view", so the viewer sees 8 wide x 16 tall, red on top, blue below.
    stored = Image.new("RGB", (16, 8), BLUE)
    stored.paste(Image.new("RGB", (8, 8), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    stored.save(path, quality=95, exif=exif)
    assert Image.open(path).getexif()[0x0112] == 6

    image = decode_image(str(path), (16, 8), 3)  # (H, W): no resizing
    top, bottom = (image[:, :6] * 255).mean(dim=(1, 2)), (image[:, 10:] * 255).mean(dim=(1, 2))
    assert top[0] > 200 and top[2] < 60, top  # red
    assert bottom[0] < 60 and bottom[2] > 200, bottom  # blue

    # A large photo takes the draft (reduced-scale) path with its turned size.
    big = stored.resize((1600, 800), Image.NEAREST)
    big.save(path, quality=95, exif=exif)
    small = decode_image(str(path), (16, 8), 3)
    assert (small - image).abs().mean() < 0.05
