"""``DashboardPlots``: pictures of the evaluated split as PNG files and in every logger."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from torch import Tensor

from siamese.checks import is_positive_int
from siamese.data.pairs import sample_pairs
from siamese.errors import ConfigError
from siamese.evaluation import EvalReport, Evaluator
from siamese.evaluation.evaluator import MAX_TOP_K
from siamese.evaluation.plots import PROJECTIONS, pair_grid_figure, save_png

log = logging.getLogger(__name__)

# Picture names: the PNG files of each folder, and the last part of each logger key.
PICTURES = ("pairs", "distances", "roc", "embeddings_2d", "retrieval")
# TensorBoard's projector reads one sprite sheet, at most 8192 pixels a side.
_SPRITE_SIDE = 8192
_THUMBNAIL_MAX = 64
_SEED = 0  # fixed queries and pairs, so pictures of successive epochs compare


class DashboardPlots(Callback):
    """Pictures of the evaluated split for TensorBoard, W&B and the run directory.

    Drawn after validation on every ``every_n_epochs``-th epoch, after the last validation
    of ``fit`` (whatever stopped it) and after ``test``, on global rank zero only:

    - ``pairs``: sample pairs and their distances (after validation in ``fit``: pairs from
      the first training batch of the epoch, augmented, embedded in eval mode; otherwise
      balanced pairs of the evaluated split), framed green where the verification
      threshold decides them right;
    - ``distances``: histograms of same-pair and different-pair distances;
    - ``roc``: the ROC curve with the threshold's operating point;
    - ``embeddings_2d``: a 2-D projection of up to ``max_points`` embeddings by class;
    - ``retrieval``: ``max_queries`` fixed queries drawn across the classes, those whose
      top-1 is of another class in the first rows, and their ``top_k`` nearest neighbours
      (leave-one-out over the split).

    All but the pair grid are the module's evaluator's figures of its report
    (``siamese.evaluation.Evaluator.draw``), the ones evaluate.py writes; each marks the
    verification threshold the report calibrated on the evaluated split.

    Each is written to ``<save_dir>/<folder>/<name>.png``, where the folder is
    ``val_epoch<NNN>`` (NNN = epochs completed when validation ran, from 001) or ``test``,
    and logged under the key ``<stage>/plots/<name>``: TensorBoard ``add_image`` and W&B
    images at the trainer's global step. After the last validation of ``fit`` and after
    ``test`` TensorBoard also gets the embedding projector (up to ``max_points`` evenly
    spaced embeddings with their images as sprites, tag = stage), and W&B a table
    ``<stage>/plots/neighbours`` of the queries with their neighbours.

    Pictures that need the split's images are skipped (with a warning) when the split was
    evaluated in part (``limit_val_batches``/``limit_test_batches``).

    Args:
        every_n_epochs: draw after the validation of every n-th epoch.
        max_points: embeddings in the 2-D projection and in the TensorBoard projector.
        max_queries: queries in the retrieval grid and the W&B table.
        top_k: neighbours shown per query (at most ``MAX_TOP_K``, 20: more is capped, with a
            warning).
        num_pairs: pairs in the pair grid.
        projection: ``pca`` (cheap) or ``tsne`` (scikit-learn, slower).
        projector: send the embeddings to TensorBoard's projector.
        save_dir: folder of the PNG files; None: ``<trainer.default_root_dir>/plots``.
    """

    def __init__(
        self,
        every_n_epochs: int = 5,
        max_points: int = 2000,
        max_queries: int = 8,
        top_k: int = 5,
        num_pairs: int = 8,
        projection: str = "pca",
        projector: bool = True,
        save_dir: str | None = None,
    ) -> None:
        super().__init__()
        for key, value, example in (
            ("every_n_epochs", every_n_epochs, 5),
            ("max_points", max_points, 2000),
            ("max_queries", max_queries, 8),
            ("top_k", top_k, 5),
            ("num_pairs", num_pairs, 8),
        ):
            if not is_positive_int(value):
                raise ConfigError(
                    f"callbacks.plots.{key}={value!r} is not allowed; expected a positive "
                    f"integer, e.g. {example}"
                )
        if projection not in PROJECTIONS:
            raise ConfigError(
                f"callbacks.plots.projection={projection!r} is not supported; expected one "
                f"of {', '.join(PROJECTIONS)}"
            )
        self.every_n_epochs = int(every_n_epochs)
        self.max_points = int(max_points)
        self.max_queries = int(max_queries)
        self.top_k = min(int(top_k), MAX_TOP_K)
        if top_k > MAX_TOP_K and rank_zero_only.rank == 0:
            log.warning(
                "callbacks.plots.top_k=%d: showing %d neighbours per query, the most a "
                "retrieval row shows legibly (%d rows of up to %d thumbnails would take "
                "minutes to draw); set callbacks.plots.top_k=%d or less to silence this",
                top_k,
                MAX_TOP_K,
                self.max_queries,
                top_k,
                MAX_TOP_K,
            )
        self.num_pairs = int(num_pairs)
        self.projection = projection
        self.projector = bool(projector)
        self.save_dir = save_dir
        self._train_pairs: tuple[Tensor, Tensor, Tensor] | None = None
        self._val_epoch = 0  # epochs completed at the last validation
        self._drawn: Any = None  # the last EvalOutputs drawn
        self._warned: set[str] = set()

    # -- hooks -----------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_pairs, self._val_epoch, self._drawn = None, 0, None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx == 0 and trainer.is_global_zero:
            self._train_pairs = self._pick_train_pairs(batch)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        self._val_epoch = trainer.current_epoch + 1
        ev = _last_eval(pl_module, "val")
        if ev is None:
            return
        if trainer.state.fn != "fit":  # trainer.validate: that is the end
            self._draw(trainer, pl_module, ev, final=True)
        elif self._val_epoch % self.every_n_epochs == 0:
            self._draw(trainer, pl_module, ev, final=False)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ev = _last_eval(pl_module, "val")
        # The last validation, whether max_epochs, max_steps or a callback stopped fit (none
        # ran past the sanity check when _val_epoch is 0).
        if ev is not None and self._val_epoch > 0:
            self._draw(trainer, pl_module, ev, final=True)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        ev = _last_eval(pl_module, "test")
        if ev is not None:
            self._draw(trainer, pl_module, ev, final=True)

    # -- drawing ---------------------------------------------------------------------------
    def _pick_train_pairs(self, batch: Any) -> tuple[Tensor, Tensor, Tensor]:
        """``num_pairs`` pairs of a training batch, same pairs first, copied to the CPU."""
        if len(batch) == 3:
            x1, x2, same = batch
            same = same.bool().cpu()
            where_same, where_diff = same.nonzero().squeeze(1), (~same).nonzero().squeeze(1)
            # Half and half where the batch allows, topped up from the other kind.
            n_diff = min(len(where_diff), self.num_pairs // 2)
            n_same = min(len(where_same), self.num_pairs - n_diff)
            n_diff = min(len(where_diff), self.num_pairs - n_same)
            first = second = torch.cat([where_same[:n_same], where_diff[:n_diff]])
        else:
            images, labels = batch
            x1 = x2 = images
            pairs = sample_pairs(labels, self.num_pairs, _SEED)
            order = torch.argsort((~pairs.same).to(torch.uint8), stable=True)
            first, second, same = pairs.first[order], pairs.second[order], pairs.same[order]
        # Augmentation may overshoot [0, 1] by interpolation; the grid shows pixels as seen.
        return (
            x1[first.to(x1.device)].detach().float().clamp(0, 1).cpu(),
            x2[second.to(x2.device)].detach().float().clamp(0, 1).cpu(),
            same[first] if len(batch) == 3 else same,
        )

    def _draw(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ev: Any, final: bool
    ) -> None:
        stage, step = ev.stage, trainer.global_step
        split = self._split_images(trainer, ev)
        names = _class_names(ev.labels, split)
        emb = ev.embeddings.float()
        if self._drawn is not ev:
            self._drawn = ev
            folder = "test" if stage == "test" else f"val_epoch{self._val_epoch:03d}"
            out_dir = Path(self.save_dir or Path(trainer.default_root_dir) / "plots") / folder
            figures = self._figures(trainer, pl_module, ev, split, emb)
            self._publish(trainer, stage, step, out_dir, figures)
        if not final or split is None:
            return
        if self.projector:
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    self._add_projector(logger, stage, step, emb, names, split)
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            columns, rows = self._neighbour_table(ev.report, names, split)
            for logger in wandb_loggers:
                logger.log_table(f"{stage}/plots/neighbours", columns, rows, step=step)

    def _figures(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        ev: Any,
        split: Any,
        emb: Tensor,
    ) -> dict[str, Figure]:
        """The pair grid, then the evaluator's figures of the report (as evaluate.py draws
        them): each marks the threshold the report calibrated on this split."""
        report = ev.report
        threshold = report.threshold if math.isfinite(report.threshold) else None
        figures: dict[str, Figure] = {}
        pairs = self._pairs(trainer, pl_module, ev, split, emb)
        if pairs is not None:
            x1, x2, dist, same, title = pairs
            figures["pairs"] = pair_grid_figure(
                x1, x2, dist, same, threshold=threshold, max_pairs=self.num_pairs, title=title
            )
        figures.update(
            Evaluator.draw(
                report,
                images=None if split is None else _reader(split),
                class_names=getattr(split, "classes", None),
                max_queries=self.max_queries,
                top_k=self.top_k,
                projection=self.projection,
                max_points=self.max_points,
            )
        )
        return figures

    def _pairs(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, ev: Any, split: Any, emb: Tensor
    ) -> tuple[Tensor, Tensor, np.ndarray, np.ndarray, str] | None:
        """Pairs for the grid: the epoch's training pairs in fit, else pairs of the split."""
        if ev.stage == "val" and trainer.state.fn == "fit" and self._train_pairs is not None:
            x1, x2, same = self._train_pairs
            dist = pl_module.compare(x1, x2).float().cpu().numpy()
            title = f"training pairs (augmented), epoch {self._val_epoch}"
            return x1, x2, dist, same.numpy(), title
        if split is None:
            return None
        pairs = sample_pairs(ev.labels, self.num_pairs, _SEED)
        order = torch.argsort((~pairs.same).to(torch.uint8), stable=True)
        first, second, same = pairs.first[order], pairs.second[order], pairs.same[order]
        dist = pl_module.pair_distance(emb[first].numpy(), emb[second].numpy())
        x1, _ = split.__getitems__(first.tolist())
        x2, _ = split.__getitems__(second.tolist())
        title = f"{ev.stage} pairs"
        return x1.float().clamp(0, 1), x2.float().clamp(0, 1), dist, same.numpy(), title

    def _publish(
        self,
        trainer: pl.Trainer,
        stage: str,
        step: int,
        out_dir: Path,
        figures: dict[str, Figure],
    ) -> None:
        """Each figure as a PNG file, a TensorBoard image and a W&B image, then freed."""
        out_dir.mkdir(parents=True, exist_ok=True)
        media: dict[str, Any] = {}
        for name, fig in figures.items():
            path = out_dir / f"{name}.png"
            rgb = save_png(fig, path)  # (H, W, 3) uint8, rendered once, as evaluate.py writes
            fig.clear()
            key = f"{stage}/plots/{name}"
            for logger in trainer.loggers:
                if isinstance(logger, TensorBoardLogger):
                    logger.experiment.add_image(key, rgb, step, dataformats="HWC")
            media[key] = path
        figures.clear()
        wandb_loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if wandb_loggers:
            import wandb

            # One history row per stage, on Lightning's trainer/global_step axis.
            images = {key: wandb.Image(str(path)) for key, path in media.items()}
            for logger in wandb_loggers:
                logger.log_metrics(images, step=step)

    def _add_projector(
        self,
        logger: TensorBoardLogger,
        stage: str,
        step: int,
        emb: Tensor,
        names: np.ndarray,
        split: Any,
    ) -> None:
        n = len(emb)
        m = min(self.max_points, n)
        idx = np.unique(np.linspace(0, n - 1, m).round().astype(np.int64))  # evenly spaced
        images, _ = split.__getitems__(idx.tolist())
        logger.experiment.add_embedding(
            emb[torch.from_numpy(idx)],
            metadata=[str(v) for v in names[idx]],
            label_img=_thumbnails(images.float().clamp(0, 1), len(idx)),
            global_step=step,
            tag=stage,
        )

    def _neighbour_table(
        self, report: EvalReport, names: np.ndarray, split: Any
    ) -> tuple[list[str], list[list[Any]]]:
        """W&B table: the retrieval grid's queries (failures first) with each neighbour's
        image, label, distance and hit."""
        import wandb

        nb = report.neighbours
        if nb is None:
            return ["query", "query_label", "hits"], []
        rows = nb.pick(report.labels, self.max_queries)
        k = min(self.top_k, nb.ids.shape[1])
        queries, ids, dist = nb.queries[rows], nb.ids[rows, :k], nb.distances[rows, :k]
        columns = ["query", "query_label", "hits"]
        for r in range(1, k + 1):
            columns += [f"neighbour_{r}", f"label_{r}", f"distance_{r}", f"hit_{r}"]
        q_images, _ = split.__getitems__(queries.tolist())
        shown, slot = np.unique(ids, return_inverse=True)
        g_images, _ = split.__getitems__(shown.tolist())
        g_pixels = [wandb.Image(_uint8(img)) for img in g_images]
        slot = slot.reshape(ids.shape)
        table = []
        for row, q in enumerate(queries):
            hits = [bool(names[g] == names[q]) for g in ids[row]]
            cells: list[Any] = [wandb.Image(_uint8(q_images[row])), str(names[q]), sum(hits)]
            for j, g in enumerate(ids[row]):
                cells += [g_pixels[slot[row, j]], str(names[g]), float(dist[row, j]), hits[j]]
            table.append(cells)
        return columns, table

    def _split_images(self, trainer: pl.Trainer, ev: Any) -> Any:
        """The images of the evaluated rows (row i's image at i), else None."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None or not hasattr(datamodule, "load_splits"):
            return None
        split = getattr(datamodule.load_splits(), ev.stage)
        if ev.items is not None and len(ev.items) == len(ev.embeddings):
            # Part of a split (trainer.limit_*_batches) is still matched to its own images.
            return split if len(ev.items) == len(split) else split.subset(ev.items)
        if ev.stage not in self._warned:
            self._warned.add(ev.stage)
            log.warning(
                "callbacks.plots: the %s loader gave no item indices, so pictures that need "
                "the %s images are skipped",
                ev.stage,
                ev.stage,
            )
        return None


def _last_eval(pl_module: pl.LightningModule, stage: str) -> Any:
    ev = getattr(pl_module, "last_eval", None)
    return ev if ev is not None and ev.stage == stage and len(ev.embeddings) > 0 else None


def _reader(split: Any) -> Any:
    """The images of a split's rows, for the evaluator's retrieval grid."""
    return lambda rows: split.__getitems__(rows.tolist())[0]


def _class_names(labels: Tensor, split: Any) -> np.ndarray:
    """Class names of the labels where the split names its classes, else the labels."""
    y = labels.cpu().numpy()
    classes = getattr(split, "classes", None)
    if classes is not None and len(y) and 0 <= y.min() and y.max() < len(classes):
        return np.asarray([str(c) for c in classes], dtype=object)[y]
    return y


def _thumbnails(images: Tensor, n: int) -> Tensor:
    """Images shrunk so that ``n`` of them fit one sprite sheet (and at most 64 pixels)."""
    per_side = math.ceil(math.sqrt(n))
    side = min(_THUMBNAIL_MAX, _SPRITE_SIDE // per_side)
    h, w = images.shape[-2:]
    if max(h, w) <= side:
        return images
    scale = side / max(h, w)
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(images, size=size, mode="area")


def _uint8(image: Tensor) -> np.ndarray:
    """A (C, H, W) image in [0, 1] as (H, W) or (H, W, 3) uint8 pixels for wandb.Image."""
    x = (image.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    return x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0)
