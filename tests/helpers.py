"""Shared test helpers: composed configs, entry-point runs, tiny data sets, hand-made inputs."""

from __future__ import annotations

import copy
import gzip
import io
import json
import math
import os
import struct
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from siamese import run_dirs
from siamese.data import DataSplits, TensorImages
from siamese.data.datasets import LabelledImages
from siamese.hydra_callbacks import RunDirGuard
from siamese.module import SiameseModule
from siamese.task import report_errors

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

# A few batches of everything: enough to exercise every stage in seconds.
FAST_WITH_PLOTS = [
    "trainer.max_epochs=1",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.limit_train_batches=3",
    "trainer.enable_model_summary=false",
    "trainer.enable_progress_bar=false",
    "eval_pairs=500",
]
# Dashboard pictures cost ~3 s a run; tests/unit/callbacks/test_plots.py checks them with
# FAST_WITH_PLOTS.
FAST = [*FAST_WITH_PLOTS, "~callbacks.plots"]


def compose_config(name: str, overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """``conf/<name>.yaml`` with overrides, its run directory pointed at ``output_dir``."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose(name, overrides=list(overrides))
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


def compose_train(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    return compose_config("train", overrides, output_dir)


def compose_eval(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    return compose_config("evaluate", overrides, output_dir)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    """The single ``error: ...`` line of a run that failed as bad input (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def assert_fragments(text: str, *fragments: str) -> None:
    """``text`` is one line that holds each of ``fragments`` in order: an error's key parts
    (the value it names, what was expected, the fix), not its every word."""
    assert "\n" not in text, text
    start = 0
    for fragment in fragments:
        found = text.find(fragment, start)
        assert found >= 0, f"{fragment!r} is not in (or is out of order in) {text!r}"
        start = found + len(fragment)


def run_script(script: str, *args: str, cwd: Path = ROOT, timeout: int = 300):
    """Run an entry point as a user would; returns the CompletedProcess."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_scripts(
    runs: Sequence[tuple[str, Sequence[str]]], cwd: Path = ROOT, timeout: int = 300
) -> list[subprocess.CompletedProcess]:
    """Run independent entry-point commands at the same time (each as ``run_script``);
    start-up dominates short runs, so two cores finish them in about half the time."""
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / script), *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for script, args in runs
    ]
    done = []
    for (script, args), proc in zip(runs, procs, strict=True):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess([script, *args], proc.returncode, out, err))
    return done


def wandb_records(path: Path) -> list[Any]:
    """The protobuf records of a ``run-<id>.wandb`` file (a LevelDB-style log).

    A 7-byte header (``:W&B``, magic, version), then 32 KiB blocks of chunks, each with a
    7-byte header (crc32c, little-endian length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B", data[:7]
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        assert pos + 7 + length <= len(data), f"{path} ends inside a record"
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(pending))
            pending = b""
    return records


# -- Tiny data sets in their real on-disk formats, and set readers --------------------
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


def png_bytes(pixels: np.ndarray) -> bytes:
    """A uint8 array (H, W) or (H, W, 3) as the bytes of a PNG file (an upload)."""
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


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


# -- A folder with unreadable files --------------------------------------------------------
def write_folder_with_bad_files(
    root: Path, classes: dict[str, tuple[int, list[str]]]
) -> list[Path]:
    """``root/<class>/`` with good 8x8 PNGs (pixel value = class number * 20 + image number)
    and bad files; ``classes`` maps a class to (good count, bad file names). Returns the
    bad paths."""
    bad = []
    for c, (name, (good, bad_names)) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(good):
            Image.new("L", (8, 8), c * 20 + i).save(root / name / f"{i:02d}.png")
        for bad_name in bad_names:
            (root / name / bad_name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)
            bad.append(root / name / bad_name)
    return bad


# -- Pretrained weights in the caches, written by the tests --------------------------------
ARCH = "test_resnet"  # timm's tiny ResNet for tests (~0.1 M parameters)


HUB_ID = "timm/test_resnet.r160_in1k"


def put_in_hf_cache(home: Path, repo_id: str, filename: str, state: dict) -> Path:
    """``state`` where huggingface_hub's download puts ``filename`` of ``repo_id``."""
    from safetensors.torch import save_file

    folder = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(commit)
    snapshot = folder / "snapshots" / commit
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / filename))
    return snapshot / filename


def timm_state(arch: str = ARCH, seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded, randomly initialised timm ``arch``'s weights, classifier included."""
    import timm

    torch.manual_seed(seed)
    return timm.create_model(arch, pretrained=False).state_dict()  # with its classifier


def tv_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded, randomly initialised torchvision resnet18's weights."""
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    return resnet18(weights=None).state_dict()


# -- Short runs on image folders of chosen class sizes -------------------------------------
# Shortening only: one epoch of 2 batches, one validation and test batch, tiny images.
SHORT = [
    *FAST,
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
]


FOLDER_SHORT = ["data.image_size=16", "data.num_workers=0"]


def write_class_folders(root: Path, counts: dict[str, int], size: int = 8) -> Path:
    """``root/<class>/<i>.png``: random ``size`` x ``size`` grey images."""
    rng = np.random.default_rng(0)
    for name, count in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            image = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(image).save(root / name / f"{i:03d}.png")
    return root


# -- evaluate.py's quick settings ----------------------------------------------------------
EVAL_FAST = ["eval.pairs=500", "eval.oneshot.episodes=200", "eval.projection_points=300"]


# The dashboard's test pictures drawn with evaluate.py's settings below (EVAL_FAST, eval.k=10
# shows min(k, 8) neighbours), so both draw the same figures of the same report.
PLOTS_LIKE_EVAL = ["callbacks.plots.top_k=8", "callbacks.plots.max_points=300"]


# -- A short deterministic train.py run ----------------------------------------------------
RUN = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.deterministic=true",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "checkpoints.every_n_train_steps=2",
    "~callbacks.plots",
    "eval_pairs=500",
]


def train(run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """train.py with ``RUN`` into ``run_dir``, as a user runs it."""
    return run_script("train.py", *RUN, f"hydra.run.dir={run_dir}", *extra)


TESTING_STOPPED = "stopped: SIGTERM while testing (training had finished), at epoch 1, step 2"


# -- Run folders made by hand, and the run-folder guard ------------------------------------
def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` and its bytes: "nothing in it was changed" exactly."""
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def fake_run(folder: Path, task: str, *files: str) -> Path:
    """A finished ``task`` run's folder: run.json, .hydra/config.yaml and ``files``."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"task_name: {task}\n")
    (folder / run_dirs.RECORD).write_text(json.dumps({"task": task, "created": "earlier"}))
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text("{}")
    return folder


def guard(run_dir: Path | str, task: str, ckpt_path: str | None = None) -> None:
    """RunDirGuard as Hydra calls it for a single run (before it writes anything)."""
    config = {"hydra": {"run": {"dir": str(run_dir)}}, "task_name": task, "ckpt_path": ckpt_path}
    RunDirGuard().on_run_start(OmegaConf.create(config))


def refused(capsys, run_dir: Path | str, task: str, ckpt_path: str | None = None) -> str:
    """The one line and exit 2 of a refused run folder."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        report_errors(guard)(run_dir, task, ckpt_path)  # as train.py's task wrapper
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# -- Checkpoints that name code ------------------------------------------------------------
# The run behind every checkpoint here: a resume replays these and finds its plan.
TRAINED = [*FAST, "trainer.limit_train_batches=2", "test=false"]


class Payload:
    """A pickle that creates ``marker`` when it is unpickled with ``weights_only=False``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def put_at(path: str):
    """An edit that puts the payload at the dotted ``path`` under hyper_parameters."""

    def edit(ckpt, evil):
        node = ckpt["hyper_parameters"]
        *parents, last = path.split(".")
        for name in parents:
            node = node[int(name)] if isinstance(node, list) else node[name]
        if isinstance(node, list):
            node[int(last)] = evil
        else:
            node[last] = evil

    return edit


def resumable_run(tmp_path: Path, real_ckpt: dict, overrides: list[str]) -> Path:
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    ckpt = copy.deepcopy(real_ckpt["ckpt"])
    ckpt["run_overrides"] = overrides
    torch.save(ckpt, run / "checkpoints" / "last.ckpt")
    return run


# -- Hand-placed embeddings ----------------------------------------------------------------
def circle(angles_deg: list[float]) -> torch.Tensor:
    a = torch.tensor(angles_deg, dtype=torch.float64) * math.pi / 180
    return torch.stack([torch.cos(a), torch.sin(a)], 1)


# -- A layer list for the conv tower -------------------------------------------------------
LAYERS = [
    {"type": "conv", "out_channels": 8, "kernel_size": 5, "stride": 2, "padding": 1},
    {"type": "batchnorm"},
    {"type": "relu"},
    {"type": "maxpool", "kernel_size": 3, "stride": 2},
    {"type": "conv", "out_channels": 16, "kernel_size": 3, "dilation": 2, "padding": 2},
    {"type": "avgpool", "kernel_size": 2},
]


# -- An untrained model for the API's checks -----------------------------------------------
def tiny_model() -> SiameseModule:
    """A randomly initialised model taking (1, 6, 6) images: the API's checks need no training."""
    torch.manual_seed(0)
    return SiameseModule(
        tower={
            "_target_": "siamese.models.ConvTower",
            "layers": [],
            "embedding_dim": 4,
            "in_channels": 1,
            "image_size": [6, 6],
        },
        distance={"_target_": "siamese.distances.EuclideanDistance"},
        loss={"_target_": "siamese.losses.ContrastiveLoss"},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
    ).eval()


def tiny_checkpoint(path: Path, threshold: float | None = 0.5, **tower: Any) -> Path:
    """``tiny_model()`` (``tower`` keys replace its tower's) saved as a checkpoint that
    ``siamese.load`` accepts, with ``threshold`` as its calibrated threshold (None: none)."""
    model = tiny_model()
    if tower:
        torch.manual_seed(0)
        model = SiameseModule(**{**model.hparams, "tower": {**model.hparams.tower, **tower}})
    model.threshold.fill_(math.nan if threshold is None else threshold)
    ckpt = {
        "state_dict": model.state_dict(),
        "hyper_parameters": dict(model.hparams),
        "pytorch-lightning_version": "2.6.6",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, path)
    return path


# -- A small model's parts and in-memory splits -------------------------------------------
LOSSES = {
    "multi_similarity": {"_target_": "siamese.losses.MultiSimilarityLoss"},
    "triplet_batch_hard": {"_target_": "siamese.losses.TripletLoss", "mining": "batch_hard"},
    "contrastive": {"_target_": "siamese.losses.ContrastiveLoss", "margin": 1.0},
}
TOWER = {
    "_target_": "siamese.models.ConvTower",
    "layers": [
        {"type": "conv", "out_channels": 8, "kernel_size": 3, "padding": 1, "bias": False},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
        {"type": "conv", "out_channels": 16, "kernel_size": 3, "padding": 1},
        {"type": "batchnorm"},
        {"type": "relu"},
        {"type": "maxpool", "kernel_size": 2},
    ],
    "hidden_dims": [32],
    "embedding_dim": 8,
    "dropout": 0.0,  # random masks would differ between 1 and 2 processes
    "in_channels": 1,
    "image_size": [12, 12],
    "input_mean": [0.5],
    "input_std": [0.25],
}


class TinySource:
    """In-memory splits of random 1x12x10 images: ``per_class`` images of ``classes`` each."""

    def __init__(self, classes: int = 4, per_class: int = (6, 3, 3), lonely_val: bool = False):
        self.classes, self.per_class, self.lonely_val = classes, per_class, lonely_val

    def load(self, root):
        g = torch.Generator().manual_seed(0)

        def split(n, distinct=False):
            labels = torch.arange(self.classes).repeat_interleave(n)
            if distinct:
                labels = torch.arange(len(labels))
            images = torch.randint(0, 256, (len(labels), 1, 12, 10), generator=g, dtype=torch.uint8)
            return TensorImages(images, labels, [str(c) for c in range(len(labels))])

        train, val, test = self.per_class
        return DataSplits(split(train), split(val, distinct=self.lonely_val), split(test))
