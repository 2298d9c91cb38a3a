"""Evaluation job: a checkpoint (+ data) -> embeddings -> the evaluator's report -> files.

Writes into the run directory: metrics.json, embeddings/*.npy, index.faiss, model.ckpt (the
checkpoint with the threshold calibrated here) and the plots roc.png, distances.png,
embeddings_2d.png, retrieval.png; all together or, on a full disk, none (the earlier ones stay).
``siamese.load_embeddings`` / ``siamese.load_index`` read them back, and ``eval.from_run``
scores a previous run's saved embeddings again without reading any image.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from siamese.checks import check_int_setting, check_k, is_number
from siamese.console import next_steps, say, shown_path
from siamese.data.datasets import LabelledImages
from siamese.distances import LearnedDistance
from siamese.errors import ConfigError
from siamese.evaluation import EvalReport, Evaluator, build_index, class_groups
from siamese.evaluation.grids import save_png
from siamese.evaluation.oneshot import check_counts
from siamese.exports import atomic_write, save_embeddings, save_index, written_together
from siamese.inference import load, resolve_device
from siamese.module import SiameseModule
from siamese.pipelines.eval_inputs import (
    Embedded,
    embedded_inputs,
    saved_inputs,
    saved_run,
)
from siamese.pipelines.eval_inputs import check_eval_split as check_eval_split
from siamese.pipelines.eval_inputs import check_shared_classes as check_shared_classes
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
# Logged by training (val/, test/), not written by evaluate.py.
TRAINING_CURVES = ("pos_distance", "neg_distance")


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
        check_int_setting(f"eval.{key}", ev.get(key), 2 if key == "pairs" else 1)
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
    if far is not None and (not is_number(far) or not 0 < far < 1):
        raise ConfigError(f"eval.target_far must be a rate in (0, 1) such as 1e-3, got {far!r}")


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


def save_model_with_threshold(src: Path, dst: Path, threshold: float, note: dict) -> None:
    """A copy of the checkpoint whose model carries this threshold (``siamese.load(dst).same``)."""
    ckpt = torch.load(src, map_location="cpu", weights_only=True)
    ckpt["state_dict"]["threshold"] = torch.tensor(float(threshold))
    ckpt["siamese_calibration"] = note
    with atomic_write(dst, what="checkpoint") as f:
        torch.save(ckpt, f)


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
    device = resolve_device(str(ev.device), "eval.device")
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
    check_k(ev.k, retrievable, "eval.k")

    index = inputs.index
    if index is None:
        index = build_index(gallery, metric=metric, kind=kind, **index_params)
    within, groups = oneshot_groups(ev, model, inputs)
    evaluator = make_evaluator(ev, model, rank_by)
    scored = evaluator.evaluate(
        query,
        query_labels,
        None if leave_one_out else gallery,
        None if leave_one_out else gallery_labels,
        groups=groups,
        index=index,
    )
    threshold = scored.threshold

    protocol = (
        f"leave-one-out over the {inputs.split} split"
        if leave_one_out
        else f"{inputs.split} split queries against the train split"
    )
    # The training curves' mean pair distances stay out of evaluate.py's file, as before.
    numbers = {k: v for k, v in scored.metrics.items() if k not in TRAINING_CURVES}
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
        **numbers,
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
            write_plots(out_dir, ev, evaluator, scored, inputs)
        write_metrics(out_dir / "metrics.json", report)
    printed = {k: v for k, v in numbers.items() if not any(t in k for t in NOT_PRINTED)}
    print_table(printed, prefix="", order=REPORTED, title="metric")
    if inputs.datamodule is not None:  # sorts bad_files.txt and says how many were skipped
        inputs.datamodule.teardown("test")
    log.info("evaluation written to %s", out_dir)
    model_ckpt = shown_path(out_dir / "model.ckpt")
    export = shlex.join(["python", "export.py", f"ckpt_path={model_ckpt}", "format=onnx"])
    index = ["python", "index.py", f"ckpt_path={model_ckpt}", "gallery=PATH/TO/IMAGES"]
    say(next_steps(out_dir, index, note=f"  or: {export}"))
    return report


def make_evaluator(ev: DictConfig, model: SiameseModule, rank_by: str) -> Evaluator:
    """The model's evaluator with the ``eval.*`` settings (train.py's own settings give the
    same numbers: the same evaluator scores its test split)."""
    return model.evaluator(
        ks=recall_ks(ev.k),
        pairs=ev.pairs,
        pairs_seed=ev.pairs_seed,
        target_far=ev.target_far,
        oneshot_ways=tuple(ev.oneshot.ways),
        oneshot_shot=ev.oneshot.shot,
        oneshot_episodes=ev.oneshot.episodes,
        oneshot_seed=ev.oneshot.seed,
        # The learned head ranks every gallery item (brute force); else the faiss index.
        retrieval_scorer=model.retrieval_scorer() if rank_by == "head" else None,
    )


def write_plots(
    out_dir: Path, ev: DictConfig, evaluator: Evaluator, report: EvalReport, inputs: Embedded
) -> None:
    """roc.png, distances.png, embeddings_2d.png and (with the split's images)
    retrieval.png: the evaluator's figures, as the dashboard callback draws them."""
    query_split = inputs.query_split
    gallery_split = inputs.gallery_split
    figures = evaluator.draw(
        report,
        images=None if query_split is None else _reader(query_split),
        gallery_images=None if gallery_split is None else _reader(gallery_split),
        class_names=None if query_split is None else query_split.classes,
        max_queries=ev.grid_queries,
        top_k=min(ev.k, 8),
        projection=ev.projection,
        max_points=ev.projection_points,
    )
    if query_split is None:  # re-scored embeddings: no images to show
        log.info("retrieval.png left out: eval.from_run re-scores embeddings without images")
    for name, fig in figures.items():
        save_png(fig, out_dir / f"{name}.png")


def _reader(split: LabelledImages) -> Any:
    """The images of a split's rows, for the retrieval grid."""
    return lambda rows: split.__getitems__(rows.tolist())[0]
