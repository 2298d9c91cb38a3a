"""Evaluation inputs: a split of the data read and embedded by a checkpoint's model, or the
embeddings a previous evaluate.py run saved (``eval.from_run``)."""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from siamese.checks import check_k
from siamese.config import build
from siamese.data.datamodule import ordered_loader
from siamese.data.datasets import ConcatImages, LabelledImages
from siamese.errors import ConfigError, DataError
from siamese.evaluation.index import index_kind
from siamese.exports import load_embeddings, load_index
from siamese.models import BackboneTower
from siamese.module import SiameseModule

log = logging.getLogger(__name__)


@dataclass
class Embedded:
    """What the metrics score: query and gallery embeddings with labels, and where from."""

    query: np.ndarray
    query_labels: np.ndarray
    gallery: np.ndarray
    gallery_labels: np.ndarray
    leave_one_out: bool  # the gallery is the query split itself
    split: str  # the evaluated split's name
    data_name: str
    # The images behind the rows (for retrieval.png); None when re-scoring saved embeddings.
    query_split: LabelledImages | None = None
    gallery_split: LabelledImages | None = None
    index: faiss.Index | None = None  # a saved index to reuse
    datamodule: Any = None


def data_config(cfg: DictConfig, model: SiameseModule) -> dict[str, Any]:
    """The data chosen on the command line, or else the one the checkpoint was trained on."""
    if cfg.get("data") is not None:
        return OmegaConf.to_container(cfg.data, resolve=True)
    stored = (model.hparams.get("config") or {}).get("data")
    if not stored:
        raise ConfigError(
            "the checkpoint does not say which data it was trained on; pass data=... "
            "(e.g. data=mnist_subset or data=image_folder data.root=PATH)"
        )
    return stored


def check_model_fits(model: SiameseModule, shape: tuple[int, int, int], data: str) -> None:
    expected = tuple(model.tower.input_shape)
    if tuple(shape) != expected:
        c, h, w = expected
        raise ConfigError(
            f"the checkpoint's model takes {c}x{h}x{w} images but {data} gives "
            f"{shape[0]}x{shape[1]}x{shape[2]}; set data.image_size=[{h},{w}] and the data's "
            f"channels to {c} (data.source.channels for image_folder)"
        )


def pick_split(splits: Any, name: str) -> LabelledImages:
    if name == "all":
        return ConcatImages(list(splits.as_tuple()))
    return getattr(splits, name)


def check_eval_split(split: LabelledImages, name: str, data: str) -> None:
    """Evaluation needs two classes, and a class with two items for any positive."""
    if len(split) == 0:
        raise DataError(f"the {name} split of {data} is empty; choose another eval.split")
    classes, counts = torch.unique(split.targets, return_counts=True)
    if len(classes) < 2:
        raise DataError(
            f"the {name} split of {data} has only one class ({len(split)} items), so nothing "
            "can be told apart; evaluate a split with at least two classes"
        )
    if not bool((counts >= 2).any()):
        raise DataError(
            f"no class in the {name} split of {data} has two items, so no item has a match; "
            "add images or evaluate another split"
        )


def check_shared_classes(
    query: LabelledImages, gallery: LabelledImages, name: str, data: str
) -> None:
    """Labels only match across splits that number their classes from one list."""
    if list(query.classes) != list(gallery.classes):
        raise ConfigError(
            f"the {name} split of {data} numbers its classes differently from its train "
            "split, so labels cannot be matched across them; use eval.gallery=test "
            "(leave-one-out within the split)"
        )


@torch.inference_mode()
def embed_split(
    model: SiameseModule,
    split: LabelledImages,
    batch_size: int,
    name: str,
    num_workers: int = 0,
) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(N, D) float32 embeddings in the split's own order, (N,) labels, and the (N,) split
    indices they belong to: all of them, unless unreadable files were skipped
    (``data.skip_bad_files=true``). Refuses NaN embeddings."""
    loader = ordered_loader(split, batch_size, num_workers)
    chunks, kept = [], []
    for images, _, items in tqdm(
        loader, desc=f"embed {name}", unit="batch", file=sys.stderr, disable=None
    ):
        chunks.append(model(images.to(model.device)).float().cpu())
        kept.append(items)
    emb = torch.cat(chunks).numpy()
    items = torch.cat(kept)
    bad_rows = int((~np.isfinite(emb)).any(axis=1).sum())
    if bad_rows:
        raise DataError(
            f"the model gave non-finite (NaN or inf) embeddings for {bad_rows} of the "
            f"{len(emb)} {name} images; the checkpoint's weights have probably diverged, so "
            "evaluate an earlier checkpoint"
        )
    labels = split.targets[items].numpy().astype(np.int64)
    return np.ascontiguousarray(emb, dtype=np.float32), labels, items


def embedded_inputs(cfg: DictConfig, model: SiameseModule, out_dir: Path) -> Embedded:
    """The chosen split (and gallery) of the data, read and embedded by ``model``."""
    ev = cfg.eval
    data_cfg = data_config(cfg, model)
    data_name = _data_name(data_cfg)
    if "bad_files" in data_cfg:  # this run's list, not the training run's
        data_cfg["bad_files"] = str(out_dir / "bad_files.txt")
    datamodule = build(data_cfg)
    wanted = tuple(model.tower.input_shape[1:])
    if isinstance(model.tower, BackboneTower) and datamodule.image_size != wanted:
        # A backbone takes its own input size: resize the images to it (a conv tower's
        # mismatch is refused below: its size is the data's by design).
        log.info("data: images resized to %dx%d, the model's input size", *wanted)
        datamodule.image_size = wanted
    splits = datamodule.read_splits()
    check_model_fits(model, splits.image_shape, data_name)
    query_split = pick_split(splits, ev.split)
    check_eval_split(query_split, ev.split, data_name)
    gallery_split = splits.train if ev.gallery == "train" else None
    if gallery_split is not None:
        check_eval_split(gallery_split, "train", data_name)
        check_shared_classes(query_split, gallery_split, ev.split, data_name)
    retrievable = len(gallery_split) if gallery_split is not None else len(query_split) - 1
    check_k(ev.k, retrievable, "eval.k")  # before the embedding, which takes the time

    workers = int(getattr(datamodule, "num_workers", 0))
    query, query_labels, kept = embed_split(model, query_split, ev.batch_size, ev.split, workers)
    if len(kept) < len(query_split):  # unreadable files skipped: the rows that were read
        query_split = query_split.subset(kept)
        check_eval_split(query_split, ev.split, data_name)
    if gallery_split is None:
        gallery, gallery_labels = query, query_labels
    else:
        gallery, gallery_labels, kept = embed_split(
            model, gallery_split, ev.batch_size, "train", workers
        )
        if len(kept) < len(gallery_split):
            gallery_split = gallery_split.subset(kept)
    return Embedded(
        query,
        query_labels,
        gallery,
        gallery_labels,
        leave_one_out=gallery_split is None,
        split=str(ev.split),
        data_name=data_name,
        query_split=query_split,
        gallery_split=gallery_split,
        datamodule=datamodule,
    )


def saved_run(value: Any) -> Path | None:
    """``eval.from_run``: an evaluate.py run directory holding ``embeddings/``, or None."""
    if value is None or value == "":
        return None
    folder = Path(str(value)).expanduser()
    if not (folder / "embeddings").is_dir():
        what = "does not exist" if not folder.exists() else "holds no embeddings/ folder"
        raise ConfigError(
            f"eval.from_run={str(folder)!r} {what}; pass the run directory of an evaluate.py "
            "run made with eval.save_embeddings=true"
        )
    return folder


def saved_inputs(folder: Path, model: SiameseModule, kind: str) -> Embedded:
    """A previous evaluate.py run's embeddings (and its index when it is of ``kind``)."""
    index_file = folder / "index.faiss"
    saved_index = load_index(index_file) if index_file.is_file() else None
    saved = load_embeddings(folder, index=saved_index)  # one line for a damaged file
    dim = model.tower.embedding_dim
    if saved.query.shape[1] != dim:
        raise DataError(
            f"{str(folder / 'embeddings' / 'query.npy')!r} holds {saved.query.shape[1]}-"
            f"dimensional embeddings but the checkpoint's model makes {dim}-dimensional ones; "
            "pass the checkpoint that run evaluated (its model.ckpt, the default)"
        )
    leave_one_out = saved.query.shape == saved.gallery.shape and bool(
        np.array_equal(saved.query, saved.gallery)
        and np.array_equal(saved.query_labels, saved.gallery_labels)
    )
    if saved_index is not None and index_kind(saved_index) != kind:
        saved_index = None  # another kind asked for: built from the saved gallery
    before = _previous_report(folder)
    return Embedded(
        saved.query,
        saved.query_labels,
        saved.gallery,
        saved.gallery_labels,
        leave_one_out=leave_one_out,
        split=str(before.get("split", "?")),
        data_name=str(before.get("data", f"saved embeddings in {str(folder)!r}")),
        index=saved_index,
    )


def _previous_report(folder: Path) -> dict[str, Any]:
    try:
        report = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _data_name(data_cfg: dict[str, Any]) -> str:
    source = (data_cfg.get("source") or {}).get("_target_", "?").rsplit(".", 1)[-1]
    root = data_cfg.get("root")
    return f"{source}(root={root!r})" if root else source
