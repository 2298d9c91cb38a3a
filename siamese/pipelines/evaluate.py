"""Evaluation job: a checkpoint (+ data) -> embeddings -> retrieval, verification, one-shot.

Writes into the run directory: metrics.json, embeddings/*.npy, index.faiss, model.ckpt (the
checkpoint with the threshold calibrated here) and the plots roc.png, distances.png,
embeddings_2d.png, retrieval.png; all together or, on a full disk, none (the earlier ones stay).
``siamese.load_embeddings`` / ``siamese.load_index`` read them back, and ``eval.from_run``
scores a previous run's saved embeddings again without reading any image.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from siamese.config import build
from siamese.data.datamodule import ordered_loader
from siamese.data.datasets import ConcatImages, LabelledImages
from siamese.distances import LearnedDistance
from siamese.errors import ConfigError, DataError
from siamese.evaluation import (
    build_index,
    class_groups,
    oneshot_metrics,
    retrieval_metrics,
    scored_retrieval_metrics,
    threshold_at_far,
    verification_metrics,
)
from siamese.evaluation.oneshot import check_counts
from siamese.exports import (
    atomic_write,
    load_embeddings,
    load_index,
    save_embeddings,
    save_index,
    written_together,
)
from siamese.inference import load
from siamese.models import BackboneTower
from siamese.module import SiameseModule
from siamese.pipelines.report import print_table, write_metrics
from siamese.pipelines.train import REPORTED as TRAIN_REPORTED
from siamese.signals import stop_on_sigterm

log = logging.getLogger(__name__)

SPLITS = ("test", "val", "train", "all")
GALLERIES = ("test", "train")
RANK_BY = ("index", "head")
PROJECTIONS = ("pca", "tsne")
RECALL_KS = (1, 5, 10)
REPORTED = tuple(
    dict.fromkeys(
        (
            *TRAIN_REPORTED,
            "accuracy_at_threshold",
            "oneshot_5way_1shot",
            "oneshot_20way_1shot",
            "approx_recall_at_10",
        )
    )
)
# Counts and confidence intervals: kept in metrics.json, left out of the printed table.
NOT_PRINTED = ("num_", "_ci95", "target_far")


def check_eval_config(ev: DictConfig) -> None:
    """Fail at start, in one sentence, on eval options that cannot work."""
    if ev.split not in SPLITS:
        raise ConfigError(f"eval.split={ev.split!r} is unknown; expected one of {SPLITS}")
    if ev.gallery not in GALLERIES:
        raise ConfigError(
            f"eval.gallery={ev.gallery!r} is unknown; expected test (leave-one-out within the "
            "evaluated split) or train (search the train split)"
        )
    if ev.gallery == "train" and ev.split in ("train", "all"):
        raise ConfigError(
            f"eval.gallery=train searches the train split, so its queries cannot come from "
            f"eval.split={ev.split}; use eval.split=test or val, or eval.gallery=test"
        )
    for key in ("k", "batch_size", "pairs", "grid_queries", "projection_points"):
        value = ev.get(key)
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (2 if key == "pairs" else 1)
        ):
            raise ConfigError(f"eval.{key} must be a positive integer, got {value!r}")
    if ev.get("rank_by", "index") not in RANK_BY:
        raise ConfigError(
            f"eval.rank_by={ev.get('rank_by')!r} is unknown; expected index (the faiss index) "
            "or head (a learned distance's head, brute force)"
        )
    oneshot = ev.oneshot
    for ways in oneshot.ways if isinstance(oneshot.ways, Sequence) else [oneshot.ways]:
        try:  # now, not after the embedding (episodes=10**9 would wait for it)
            check_counts(ways, oneshot.shot, oneshot.episodes, oneshot.seed)
        except ConfigError as exc:
            raise ConfigError(f"eval.oneshot: {exc}") from None
    if ev.oneshot.get("within", "auto") != "auto":
        class_groups([], ev.oneshot.get("within"), "eval.oneshot.within")  # a known value
    if ev.projection not in PROJECTIONS:
        raise ConfigError(f"eval.projection={ev.projection!r} is unknown; expected pca or tsne")
    far = ev.get("target_far")
    if far is not None and (
        isinstance(far, bool) or not isinstance(far, float | int) or not 0 < far < 1
    ):
        raise ConfigError(f"eval.target_far must be a rate in (0, 1) such as 1e-3, got {far!r}")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"eval.device={name!r} is not a device; use auto, cpu or cuda[:N]"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"eval.device={name} but torch sees no CUDA device; use eval.device=cpu or auto"
        )
    return device


def recall_ks(k: int) -> tuple[int, ...]:
    """recall@1, 5, 10 up to ``k``, and recall@k itself."""
    return tuple(sorted({kk for kk in RECALL_KS if kk <= k} | {k}))


def load_model(
    cfg: DictConfig, device: torch.device, from_run: Path | None = None
) -> tuple[SiameseModule, Path]:
    """The checkpoint's model; with ``eval.from_run`` the one that run saved by default."""
    missing = OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path
    if missing and from_run is not None:
        return load(from_run / "model.ckpt", map_location=device), from_run / "model.ckpt"
    if missing:
        raise ConfigError(
            "ckpt_path is required: python evaluate.py "
            "ckpt_path=outputs/train/runs/<time>/checkpoints/best.ckpt"
        )
    path = Path(str(cfg.ckpt_path)).expanduser()
    return load(path, map_location=device), path


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
    check_k(ev.k, retrievable)  # before the embedding, which takes the time

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


def oneshot_groups(
    ev: DictConfig, model: SiameseModule, inputs: Embedded
) -> tuple[str | None, np.ndarray | None]:
    """``eval.oneshot.within`` and the one-shot group (alphabet) of each evaluated item
    (None: episodes across the split).

    ``auto`` takes the checkpoint's own ``oneshot_within`` (train.py's test metrics), and
    falls back to episodes across the split, with a warning, where the evaluated classes
    have no alphabet in their names or only saved embeddings are read (``eval.from_run``);
    a value given on the command line is refused there instead."""
    asked = ev.oneshot.get("within", "auto")
    explicit = asked != "auto"
    within = asked if explicit else (model.hparams.get("config") or {}).get("oneshot_within")
    if within is None:
        return None, None
    if inputs.query_split is None:  # eval.from_run: no class names
        why = "the embeddings saved by eval.from_run hold no class names"
        if explicit:
            raise ConfigError(
                f"eval.oneshot.within={within} needs the split's class names, which {why}; "
                "evaluate from the images (no eval.from_run) or use eval.oneshot.within=null"
            )
        log.warning("one-shot episodes across the split, not within=%s: %s", within, why)
        return None, None
    try:
        groups = class_groups(inputs.query_split.classes, within, "eval.oneshot.within")
    except ConfigError as exc:
        if explicit:
            raise
        log.warning("one-shot episodes across the split, not the checkpoint's: %s", exc)
        return None, None
    return within, groups[inputs.query_labels]


def index_kind(index: faiss.Index) -> str:
    """flat, ivf or hnsw: the ``index=`` option that builds an index of this type."""
    name = type(faiss.downcast_index(index)).__name__
    if "HNSW" in name:
        return "hnsw"
    if "IVF" in name:
        return "ivf"
    return "flat"


def _previous_report(folder: Path) -> dict[str, Any]:
    try:
        report = json.loads((folder / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def check_k(k: int, retrievable: int) -> None:
    """Refuse ``eval.k`` beyond the ``retrievable`` items each query can retrieve."""
    if k > retrievable:
        raise ConfigError(
            f"eval.k={k} is larger than the {retrievable} items each query can retrieve; "
            f"use eval.k={min(10, retrievable)} or a larger gallery"
        )


def save_model_with_threshold(src: Path, dst: Path, threshold: float, note: dict) -> None:
    """A copy of the checkpoint whose model carries this threshold (``siamese.load(dst).same``)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["threshold"] = torch.tensor(float(threshold))
    ckpt["siamese_calibration"] = note
    with atomic_write(dst, what="checkpoint") as f:
        torch.save(ckpt, f)


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


def run_evaluation(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a checkpoint, write everything to the run directory; return metrics.json.

    With ``eval.from_run=DIR`` the embeddings (and index) a previous evaluate.py run saved
    in DIR are re-scored with this run's settings, and no image is read. A SIGTERM ends it
    with one ``stopped:`` line and exit 143, leaving no temporary file behind.
    """
    with stop_on_sigterm(Path(cfg.paths.output_dir), "evaluating", "evaluate.py"):
        return _evaluate(cfg)


def _evaluate(cfg: DictConfig) -> dict[str, Any]:
    ev = cfg.eval
    check_eval_config(ev)
    index_params = OmegaConf.to_container(cfg.index, resolve=True)
    kind = index_params.pop("kind", "flat")
    device = resolve_device(str(ev.device))
    from_run = saved_run(ev.get("from_run"))
    model, ckpt_path = load_model(cfg, device, from_run)
    metric = model.distance.faiss_metric
    rank_by = ev.get("rank_by", "index")
    if rank_by == "head" and not isinstance(model.distance, LearnedDistance):
        raise ConfigError(
            f"eval.rank_by=head needs a checkpoint trained with distance=learned, but "
            f"{str(ckpt_path)!r} uses {model.distance.name}, which the index already ranks "
            "by; drop eval.rank_by"
        )
    out_dir = Path(cfg.paths.output_dir)
    if from_run is not None:
        inputs = saved_inputs(from_run, model, kind)
    else:
        inputs = embedded_inputs(cfg, model, out_dir)
    query, query_labels = inputs.query, inputs.query_labels
    gallery, gallery_labels = inputs.gallery, inputs.gallery_labels
    leave_one_out = inputs.leave_one_out
    retrievable = len(gallery) - 1 if leave_one_out else len(gallery)
    check_k(ev.k, retrievable)

    # Retrieval: faiss over the gallery (leave-one-out when the gallery is the split itself).
    index = inputs.index
    if index is None:
        index = build_index(gallery, metric=metric, kind=kind, **index_params)
    searched = (
        query,
        query_labels,
        None if leave_one_out else gallery,
        None if leave_one_out else gallery_labels,
    )
    if rank_by == "head":  # the learned head ranks every gallery item: brute force
        retrieval = scored_retrieval_metrics(
            *searched, scorer=model.retrieval_scorer(), ks=recall_ks(ev.k)
        )
    else:
        retrieval = retrieval_metrics(*searched, metric=metric, ks=recall_ks(ev.k), index=index)

    # Verification on fixed-seed balanced pairs of the evaluated split.
    distances, same = model.pair_distances(
        torch.from_numpy(query).to(device), torch.from_numpy(query_labels), ev.pairs, ev.pairs_seed
    )
    verification = verification_metrics(distances, same)
    threshold = verification["threshold"]
    if ev.target_far is not None:
        threshold = threshold_at_far(distances, same, float(ev.target_far))
        verification["threshold"] = threshold
        verification["threshold_target_far"] = float(ev.target_far)
        at = verification_metrics(distances, same, threshold=threshold)
        verification["accuracy_at_threshold"] = at["accuracy_at_threshold"]

    within, groups = oneshot_groups(ev, model, inputs)
    oneshot = oneshot_metrics(
        query,
        query_labels,
        ways=tuple(ev.oneshot.ways),
        k_shot=ev.oneshot.shot,
        episodes=ev.oneshot.episodes,
        seed=ev.oneshot.seed,
        metric=metric,
        scorer=model.episode_scorer(),  # a learned head scores its own episodes
        groups=groups,
    )

    protocol = (
        f"leave-one-out over the {inputs.split} split"
        if leave_one_out
        else f"{inputs.split} split queries against the train split"
    )
    numbers = {**retrieval, **verification, **oneshot}
    report: dict[str, Any] = {
        "protocol": protocol,
        "checkpoint": str(ckpt_path),
        "data": inputs.data_name,
        "split": inputs.split,
        "index": kind,
        "rank_by": rank_by,
        "distance": model.distance.name,
        "oneshot_within": within,
        **({"from_run": str(from_run)} if from_run is not None else {}),
        **{k: float(v) for k, v in numbers.items()},
    }

    # Every file goes to a temporary first and replaces its predecessor only once all are
    # written: a full disk leaves the run directory as it was, and says so in one line.
    with written_together(then="run evaluate.py again"):
        if ev.save_embeddings:
            save_embeddings(out_dir / "embeddings", query, query_labels, gallery, gallery_labels)
        if ev.save_index:
            save_index(index, out_dir / "index.faiss")
        note = {"split": inputs.split, "data": inputs.data_name, "target_far": ev.target_far}
        save_model_with_threshold(ckpt_path, out_dir / "model.ckpt", threshold, note)
        if ev.plots:
            write_plots(
                out_dir,
                ev,
                distances=distances,
                same=same,
                threshold=threshold,
                query=(query, query_labels, inputs.query_split),
                gallery=(gallery, gallery_labels, inputs.gallery_split or inputs.query_split),
                index=index,
                leave_one_out=leave_one_out,
            )
        write_metrics(out_dir / "metrics.json", report)
    printed = {k: v for k, v in numbers.items() if not any(t in k for t in NOT_PRINTED)}
    print_table(printed, prefix="", order=REPORTED, title="metric")
    if inputs.datamodule is not None:  # sorts bad_files.txt and says how many were skipped
        inputs.datamodule.teardown("test")
    log.info("evaluation written to %s", out_dir)
    return report


def write_plots(
    out_dir: Path,
    ev: DictConfig,
    *,
    distances: np.ndarray,
    same: np.ndarray,
    threshold: float,
    query: tuple[np.ndarray, np.ndarray, LabelledImages | None],
    gallery: tuple[np.ndarray, np.ndarray, LabelledImages | None],
    index: faiss.Index,
    leave_one_out: bool,
) -> None:
    from siamese.evaluation.plots import (
        plot_distance_histograms,
        plot_embeddings_2d,
        plot_retrieval_grid,
        plot_roc,
    )

    plot_roc(distances, same, out_dir / "roc.png", threshold=threshold)
    plot_distance_histograms(distances, same, out_dir / "distances.png", threshold=threshold)
    q_emb, q_labels, q_split = query
    _, g_labels, g_split = gallery
    plot_embeddings_2d(
        q_emb,
        q_labels,
        out_dir / "embeddings_2d.png",
        method=ev.projection,
        max_points=ev.projection_points,
        seed=0,
    )
    if q_split is None or g_split is None:  # re-scored embeddings: no images to show
        log.info("retrieval.png left out: eval.from_run re-scores embeddings without images")
        return
    # A few fixed-seed queries and their top k, read back from the split's images.
    rng = np.random.default_rng(0)
    shown = np.sort(rng.choice(len(q_emb), size=min(ev.grid_queries, len(q_emb)), replace=False))
    k = min(ev.k, 8)
    _, found = index.search(q_emb[shown], k + leave_one_out)
    neighbours = np.empty((len(shown), k), dtype=np.int64)
    for row, (own, ids) in enumerate(zip(shown, found, strict=True)):
        ids = ids[ids >= 0]
        if leave_one_out:
            ids = ids[ids != own]
        neighbours[row] = ids[:k] if len(ids) >= k else np.resize(ids, k)
    used, remapped = np.unique(neighbours, return_inverse=True)
    q_images, _ = q_split.__getitems__(shown.tolist())
    g_images, _ = g_split.__getitems__(used.tolist())
    plot_retrieval_grid(
        q_images.numpy(),
        q_labels[shown],
        g_images.numpy(),
        g_labels[used],
        remapped.reshape(neighbours.shape),
        out_dir / "retrieval.png",
        max_queries=len(shown),
    )


def _data_name(data_cfg: dict[str, Any]) -> str:
    source = (data_cfg.get("source") or {}).get("_target_", "?").rsplit(".", 1)[-1]
    root = data_cfg.get("root")
    return f"{source}(root={root!r})" if root else source
