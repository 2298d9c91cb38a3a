"""The LightningModule: one weight-shared tower, a distance Φ and a loss, trained on pairs.

Both sides of every pair go through ``self.tower`` in one forward pass over the
concatenated batch, so a single parameter set receives the gradients of both branches.
Validation and test embed their whole split and score retrieval (faiss, leave-one-out) and
verification on fixed-seed balanced pairs, with ``siamese.evaluation``.

The constructor takes plain config dicts (``_target_`` + keywords) and builds the parts
itself, so a checkpoint rebuilds its model from the file alone.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from siamese.checkpointing import restore_rng_states, rng_states
from siamese.cli import RUN_OVERRIDES_KEY
from siamese.config import build
from siamese.data.pairs import sample_pairs
from siamese.distances import LearnedDistance
from siamese.distributed import gather_uneven, gather_with_grad, is_distributed, seed_per_rank
from siamese.errors import ConfigError, DataError
from siamese.evaluation import retrieval_metrics, verification_metrics
from siamese.evaluation.oneshot import oneshot_metrics
from siamese.losses import LossOutput
from siamese.metric_names import ONESHOT_WAYS
from siamese.models.backbones import check_lr_mult

RECALL_KS = (1, 5, 10)
ONESHOT_EPISODES = 1000


# What train/ logs once an epoch: image-weighted means over the epoch's steps.
TRAIN_EPOCH_LOGS = ("loss_epoch", "active_fraction", "pos_distance", "neg_distance")


class _EpochStats:
    """Image-weighted sums of one training epoch's step statistics (``TRAIN_EPOCH_LOGS``),
    kept on the device: adding a step reads nothing back. A step of another epoch starts
    the sums again, so sums restored from a checkpoint go on only within their own epoch."""

    def __init__(self) -> None:
        self.epoch = -1
        self.sums: Tensor | None = None
        self.images = 0

    def add(self, epoch: int, out: LossOutput, images: int) -> None:
        step = torch.stack(
            [
                out.loss.detach().float(),
                out.active_fraction.float(),
                out.pos_distance.float(),
                out.neg_distance.float(),
            ]
        )
        if epoch != self.epoch or self.sums is None:
            self.epoch, self.sums, self.images = epoch, step * images, images
        else:
            self.sums = self.sums.to(step.device) + step * images
            self.images += images

    def means(self, epoch: int) -> Tensor | None:
        """The means of ``epoch``'s steps, or None when none of its steps was added."""
        if epoch != self.epoch or self.sums is None or self.images == 0:
            return None
        return self.sums / self.images

    def state_dict(self) -> dict[str, Any]:
        sums = None if self.sums is None else self.sums.detach().cpu()
        return {"epoch": self.epoch, "sums": sums, "images": self.images}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        state = state or {}
        self.epoch = int(state.get("epoch", -1))
        self.sums = state.get("sums")
        self.images = int(state.get("images", 0))


# Float pixels the inference entry points take: [0, 1], with slack for a resampler's
# overshoot; 0-255 pixels (max 255) and mean/std-normalised images (min about -2) fall outside.
IMAGE_RANGE = (-0.5, 1.5)


def check_images(
    images: Any, shape: Sequence[int], name: str = "images", values: bool = True
) -> Tensor:
    """``images`` as a tensor (B, C, H, W) of ``shape`` (C, H, W), float or uint8, or one
    DataError line saying what was wrong, the value and the fix.

    A numpy array becomes a tensor without a copy. The type, dtype and shape cost a few
    microseconds and read nothing back. With ``values``, float values are checked too, with
    one ``aminmax`` pass and one read-back (a GPU waits for it): NaN, infinity and values
    outside ``IMAGE_RANGE`` are refused. uint8 pixels (0-255) pass; ``SiameseModule``
    divides them by 255 batch by batch.
    """
    c, h, w = (int(v) for v in shape)
    wanted = f"{name} must be a float tensor (B, {c}, {h}, {w}) in [0, 1]"
    from_numpy = isinstance(images, np.ndarray)
    if from_numpy:
        if images.dtype not in (np.uint8, np.float16, np.float32, np.float64):
            raise DataError(
                f"{wanted}; got a numpy array of dtype {images.dtype} (pass floats, or 0-255 "
                "pixels as uint8)"
            )
        with warnings.catch_warnings():  # read-only arrays (np.load mmap): nothing writes to it
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            images = torch.from_numpy(np.ascontiguousarray(images))
    if not isinstance(images, Tensor):
        raise DataError(
            f"{wanted}; got {type(images).__name__} (siamese.read_images(files, like=model) "
            "reads image files)"
        )
    if images.dtype != torch.uint8 and not images.is_floating_point():
        raise DataError(
            f"{wanted}; got dtype {images.dtype} (pass floats, or 0-255 pixels as uint8)"
        )
    got = tuple(images.shape)
    if got[1:] != (c, h, w):  # also any other number of dimensions
        if got == (c, h, w):
            hint = f"; one image needs a batch dimension: pass {name}[None]"
        elif c == 1 and len(got) == 3 and got[1:] == (h, w):
            hint = f"; add the channel dimension: pass {name}[:, None]"
        elif len(got) == 4 and got[1:] == (h, w, c):
            move = "transpose" if from_numpy else "permute"
            hint = f"; the channels come last: pass {name}.{move}(0, 3, 1, 2)"
        elif len(got) == 4:
            hint = " (siamese.read_images(files, like=model) converts and resizes image files)"
        else:
            hint = ""
        raise DataError(f"{wanted}; got shape {got}{hint}")
    if not values or images.dtype == torch.uint8 or images.numel() == 0:
        return images
    lo, hi = (float(v) for v in torch.aminmax(images.detach()))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        bad = int((~torch.isfinite(images)).sum())
        raise DataError(f"{wanted}; got {bad} NaN or infinite values")
    if lo < IMAGE_RANGE[0]:
        raise DataError(
            f"{wanted}; got values from {lo:.4g} to {hi:.4g}: pass the pixels before any "
            "mean/std normalisation (the model applies its own)"
        )
    if hi > IMAGE_RANGE[1]:
        raise DataError(
            f"{wanted}; got values up to {hi:.4g}: divide 0-255 pixels by 255, or pass them "
            "as uint8"
        )
    return images


@dataclass
class EvalOutputs:
    """One evaluated split as the metrics saw it, kept for dashboards (plots, projector).

    When the loader gave item indices, rows are sorted by item and ``items[i]`` is the split
    index of row i (all of them in order unless the split was evaluated in part).
    """

    stage: str  # "val" or "test"
    embeddings: Tensor  # (N, D) float32, on the CPU
    labels: Tensor  # (N,)
    items: Tensor | None  # (N,) int64 split indices, or None when the loader gave none
    distances: np.ndarray  # (P,) verification pair distances, lower means more alike
    same: np.ndarray  # (P,) bool
    metrics: dict[str, float]


class SiameseModule(pl.LightningModule):
    """Siamese network: ``forward(images) -> embeddings``, trained on in-batch or explicit pairs.

    Args:
        tower: config of the tower (images (B, C, H, W) -> embeddings (B, D)).
        distance: config of the distance Φ.
        loss: config of the loss (it receives the distance).
        optimizer: partial config of the optimizer (it receives the parameters).
        scheduler: partial config of a step-wise LR scheduler, or None; ``total_steps`` or
            ``T_max`` is filled from the trainer when the scheduler takes one.
        eval_pairs: number of balanced verification pairs drawn from each evaluated split.
        eval_seed: seed of those pairs (fixed, so a checkpoint always scores the same).
        config: the run's resolved config, kept in the checkpoint for evaluation.
        channels_last: hold the tower's weights and the images in ``torch.channels_last``
            memory format (faster convolutions on GPUs, with mixed precision above all).
        compile: ``torch.compile`` the tower for training steps: ``True``, or a dict of
            ``torch.compile`` keywords (``{mode: max-autotune}``). Evaluation runs eagerly
            (its last batch has another shape), and checkpoints keep the plain weights.
        backbone_lr_mult: the learning rate of a backbone tower's backbone (``model=timm``,
            ``resnet18``) relative to the head's, through an optimizer parameter group (the
            one-cycle peak and any other schedule scale with it).

    Under DDP the in-batch pairs and mining span the global batch: each process embeds its
    part, and the embeddings are gathered with their gradients (``siamese.distributed``), so
    N devices with batch B train like one device with batch N*B. Validation and test gather
    every process's embeddings before faiss, so their metrics equal one process's.
    """

    def __init__(
        self,
        tower: dict[str, Any],
        distance: dict[str, Any],
        loss: dict[str, Any],
        optimizer: dict[str, Any],
        scheduler: dict[str, Any] | None = None,
        eval_pairs: int = 50_000,
        eval_seed: int = 0,
        config: dict[str, Any] | None = None,
        channels_last: bool = False,
        compile: bool | dict[str, Any] = False,
        backbone_lr_mult: float = 1.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)  # the run config is logged once, by RunRecord
        self.backbone_lr_mult = check_lr_mult(backbone_lr_mult)
        self.tower = build(tower)
        self.distance = build(distance)
        self.loss_fn = build(loss, distance=self.distance)
        if not isinstance(compile, bool | dict):
            raise ConfigError(
                f"model.compile must be true, false or a dict of torch.compile options, got "
                f"{compile!r}"
            )
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.tower.to(memory_format=torch.channels_last)
        # Built at the first training step (after DDP's layer sync has swapped batch norms);
        # kept out of the module tree, so state_dict and checkpoints have plain tower keys.
        self.__dict__["_compiled_tower"] = None
        # Verification threshold calibrated on the last validation epoch (travels in ckpt).
        self.register_buffer("threshold", torch.tensor(math.nan))
        self._outputs: list[tuple[Tensor, Tensor, Tensor | None]] = []
        # This training epoch's TRAIN_EPOCH_LOGS statistics, summed on the device.
        self._epoch_stats = _EpochStats()
        # The last evaluated split (callbacks draw their pictures from it).
        self.last_eval: EvalOutputs | None = None
        # (C,) group of each class code of the test split (Omniglot's alphabets) for one-shot
        # episodes within a group; None: classes across the split. Set by whoever knows the
        # class names (train.py, from ``oneshot_within``); not saved in checkpoints.
        self.oneshot_groups: np.ndarray | None = None
        # The command-line overrides of the run (train.py sets them), saved in each
        # checkpoint so that ``ckpt_path=last`` composes the config that wrote it.
        self.run_overrides: list[str] | None = None

    @classmethod
    def load_from_checkpoint(  # type: ignore[override]
        cls,
        checkpoint_path: Any,
        map_location: Any = None,
        hparams_file: Any = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> SiameseModule:
        """Lightning's loader, made safe: the same as ``siamese.load`` (the file read as plain
        data, its stored config checked against the registry before anything is built), the
        model returned in eval mode. Lightning's own version would build whatever the
        checkpoint's hyper-parameters name."""
        if hparams_file is not None or kwargs or strict is False:
            raise ConfigError(
                "SiameseModule.load_from_checkpoint takes the checkpoint alone (and "
                "map_location): its model is rebuilt from the config stored in it; use "
                "siamese.load(path)"
            )
        from siamese.inference import load  # that module builds on this one

        return load(checkpoint_path, map_location=map_location or "cpu")

    # -- inference -------------------------------------------------------------------------
    # The public entry points check their input once (check_images): embed, compare and
    # same all of it; model(images) its type, dtype and shape only, so a training loop of
    # one's own never waits for a read-back. Training and evaluation steps call
    # _embed_batch and pay nothing.
    def forward(self, images: Tensor | np.ndarray) -> Tensor:
        """Images (B, C, H, W) in [0, 1] -> embeddings (B, D) as the distance sees them.

        Takes what ``embed`` takes (uint8 divided by 255, moved to the model's device), in
        one batch and with gradients when they are on. Its type, dtype and shape are
        checked, its values are not (no read-back per call): ``embed`` checks them.
        """
        return self._embed_batch(self._model_input(self.check_images(images, values=False)))

    def _embed_batch(self, images: Tensor) -> Tensor:
        """``forward`` without the input checks: the training and evaluation steps' path."""
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        tower = self.tower
        if self.hparams.get("compile") and self.training:
            tower = self._compiled()
        return self.distance.prepare(tower(images))

    def _compiled(self) -> Any:
        if self.__dict__["_compiled_tower"] is None:
            options = self.hparams.compile
            options = dict(options) if isinstance(options, dict) else {}
            self.__dict__["_compiled_tower"] = torch.compile(self.tower, **options)
        return self.__dict__["_compiled_tower"]

    def check_images(self, images: Any, name: str = "images", values: bool = True) -> Tensor:
        """``images`` as a (B, C, H, W) tensor of ``tower.input_shape``, or one DataError
        line (``siamese.module.check_images``)."""
        return check_images(images, self.tower.input_shape, name, values)

    def _model_input(self, images: Tensor) -> Tensor:
        """A checked batch on the model's device in its dtype; uint8 pixels divided by 255."""
        images = images.to(self.device)
        if images.dtype == torch.uint8:
            return images.to(self.dtype).div_(255.0)
        return images.to(self.dtype)

    @torch.no_grad()
    def embed(self, images: Tensor | np.ndarray, batch_size: int = 1024) -> Tensor:
        """Embeddings (N, D) of any number of images, in eval mode, batch by batch, on the
        model's device.

        Args:
            images: (N, C, H, W) with (C, H, W) = ``tower.input_shape``: floats in [0, 1]
                (any float dtype, cast to the model's), or uint8 pixels 0-255 (divided by 255
                here), as a tensor or a numpy array (taken without a copy). Checked once,
                with one pass over the values: another type, shape or dtype, NaN or infinity,
                or values outside [-0.5, 1.5] (0-255 floats, mean/std-normalised images) are
                one DataError line naming the fix.
            batch_size: images per forward pass (each batch is moved to the device alone).
        """
        return self._embed_checked(self.check_images(images), batch_size)

    def _embed_checked(self, images: Tensor, batch_size: int = 1024) -> Tensor:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
        was_training = self.training
        self.eval()
        try:
            out = [
                self._embed_batch(self._model_input(images[i : i + batch_size]))
                for i in range(0, len(images), batch_size)
            ]
        finally:
            self.train(was_training)
        if out:
            return torch.cat(out)
        return torch.zeros((0, self.tower.embedding_dim), dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def compare(self, a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
        """Distances (B,) between images ``a[i]`` and ``b[i]``; lower means more alike.

        ``a`` and ``b`` are checked as ``embed`` checks its images and hold the same number
        of images, or one of them a single image, compared with each of the other.
        """
        a, b = self.check_images(a, "a"), self.check_images(b, "b")
        if len(a) != len(b) and 1 not in (len(a), len(b)):
            raise DataError(
                f"a and b must hold the same number of images (pair i is a[i] with b[i]), or "
                f"one of them a single image; got {len(a)} and {len(b)}"
            )
        emb_a, emb_b = self._embed_checked(a), self._embed_checked(b)
        return self.distance.to_distance(self.distance.paired(emb_a, emb_b))

    @torch.no_grad()
    def same(self, a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> Tensor:
        """Same/different decisions (B,) at the threshold calibrated on validation; ``a`` and
        ``b`` as ``compare`` takes them."""
        if math.isnan(float(self.threshold)):
            raise ConfigError(
                "this model has no calibrated threshold (its checkpoint was saved before any "
                "validation); run evaluate.py ckpt_path=<this checkpoint> and load the "
                "model.ckpt it writes, or apply a threshold of your own to compare(a, b)"
            )
        return self.compare(a, b) <= self.threshold

    # -- training --------------------------------------------------------------------------
    def _shared_step(self, batch: tuple[Tensor, ...]) -> tuple[LossOutput, int]:
        """The loss of a batch and how many images it embedded."""
        if len(batch) == 3:  # explicit (x1, x2, same): one forward over both sides
            # The pair loss is a mean over pairs: DDP's gradient averaging over equal parts
            # already gives the global batch's gradient, so nothing is gathered.
            x1, x2, same = batch
            e1, e2 = self._embed_batch(torch.cat([x1, x2])).split(len(x1))
            return self.loss_fn.forward_pairs(e1, e2, same), 2 * len(x1)
        images, labels = batch
        emb = self._embed_batch(images)
        if is_distributed():  # every pair of the global batch (gradients flow back to each part)
            emb, labels = gather_with_grad(emb), gather_with_grad(labels)
        return self.loss_fn(emb, labels), len(emb)

    def setup(self, stage: str) -> None:
        seed_per_rank(torch.initial_seed())

    def _train_batch_sampler(self) -> Any:
        return getattr(self.trainer.train_dataloader, "batch_sampler", None)

    def _keep_batchnorm_frozen(self) -> None:
        # model.freeze_bn: Lightning neither calls train() when fitting starts nor skips
        # restoring modes after validation, and DDP's SyncBatchNorm makes new layers.
        if getattr(self.tower, "freeze_bn", False) and self.tower.training:
            self.tower.freeze_batchnorm()

    def on_train_epoch_start(self) -> None:
        self._keep_batchnorm_frozen()
        # Lightning calls set_epoch only on a loader's sampler, not on a batch_sampler: without
        # this every epoch would train on the same class-balanced batches (or pairs).
        batch_sampler = self._train_batch_sampler()
        if hasattr(batch_sampler, "set_epoch"):
            batch_sampler.set_epoch(self.current_epoch)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # The loader's position for checkpoints: checkpoints are written after a batch ends,
        # so this batch is done by the time one records it.
        batch_sampler = self._train_batch_sampler()
        if hasattr(batch_sampler, "completed"):
            batch_sampler.completed = batch_idx + 1

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        out, bs = self._shared_step(batch)
        # Nothing here reads a value back from the device, and self.log runs only at the
        # steps whose logs Lightning writes (each self.log call costs about 0.8 ms of Python:
        # at every step that was most of the framework's overhead over a bare loop). The
        # epoch means are summed on the device and logged once, at the epoch's end. Nothing
        # goes to the progress bar per step (a progress-bar value is read back, which would
        # synchronise a GPU at every step). The in-batch loss is the gathered global
        # batch's, the same on every process.
        self._epoch_stats.add(self.current_epoch, out, bs)
        if self._logs_this_step():
            self.log("train/loss_step", out.loss, on_step=True, on_epoch=False, batch_size=bs)
        return out.loss

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes the logs of this training step (its
        ``trainer.log_every_n_steps`` rule, asked before the step as its own hooks do)."""
        trainer = self.trainer
        connector = getattr(trainer, "_logger_connector", None)
        if connector is None:  # a Lightning without it: log every step, as before
            return True
        return bool(connector.should_update_logs or trainer.fast_dev_run)

    def on_train_epoch_end(self) -> None:
        means = self._epoch_stats.means(self.current_epoch)
        if means is None:
            return
        # sync_dist: a mean over processes, once an epoch.
        logged = dict(zip(TRAIN_EPOCH_LOGS, means, strict=True))
        self.log_dict({f"train/{k}": v for k, v in logged.items()}, sync_dist=True)
        # train/loss (for callbacks and sweeps: checkpoints.monitor, optimized_metric) is the
        # epoch mean, as Lightning's own on_step+on_epoch logging leaves it.
        self.log("train/loss", logged["loss_epoch"], logger=False, sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: tuple[Tensor, ...], stage: str) -> None:
        """``(images, labels)`` or ``(images, labels, item indices)`` of the evaluated split."""
        images, labels = batch[0], batch[1]
        emb = self._embed_batch(images)
        if len(labels) > 1:
            out = self.loss_fn(emb, labels)
            self.log(
                f"{stage}/loss", out.loss, on_epoch=True, batch_size=len(labels), sync_dist=True
            )
        index = batch[2] if len(batch) > 2 else None
        self._outputs.append((emb.detach().float(), labels.detach(), index))

    def on_validation_epoch_end(self) -> None:
        metrics = self._epoch_metrics("val")
        if metrics and not self.trainer.sanity_checking:
            self.threshold.fill_(metrics["threshold"])
        # Every process computed the same values from the gathered split: the reduction is a
        # formality that keeps Lightning from warning about unsynced epoch metrics.
        shown = ("precision_at_1", "roc_auc")  # on the progress bar, once an epoch
        for on_bar in (False, True):
            self.log_dict(
                {f"val/{k}": v for k, v in metrics.items() if (k in shown) == on_bar},
                prog_bar=on_bar,
                sync_dist=True,
            )

    def on_test_epoch_end(self) -> None:
        metrics = self._epoch_metrics("test")
        self.log_dict({f"test/{k}": v for k, v in metrics.items()}, sync_dist=True)

    def _epoch_metrics(self, stage: str) -> dict[str, float]:
        outputs, self._outputs = self._outputs, []
        split = self._collect(outputs)
        if split is None:
            return {}
        emb, labels, items = split
        metrics, dist, same = self._split_metrics(emb, labels, oneshot=stage == "test")
        self.last_eval = EvalOutputs(
            stage,
            emb.cpu(),
            labels.cpu(),
            None if items is None else items.cpu(),
            dist,
            same,
            metrics,
        )
        return metrics

    def _collect(
        self, outputs: list[tuple[Tensor, Tensor, Tensor | None]]
    ) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """The evaluated split's embeddings, labels and item indices, in item order (as
        evaluate.py embeds a split: the same pairs and tie-breaks). Under DDP every process
        holds part of the split: the parts are gathered first, so all get the whole."""
        distributed = is_distributed()
        if not outputs and not distributed:
            return None
        has_items = all(i is not None for _, _, i in outputs)
        if distributed and not has_items:
            raise RuntimeError("DDP evaluation needs item indices from the loader")
        # A process without a batch still takes part in the gathers, with empty tensors.
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        emb = (
            torch.cat([e for e, _, _ in outputs])
            if outputs
            else torch.zeros(0, self.tower.embedding_dim, device=self.device)
        )
        labels = torch.cat([y for _, y, _ in outputs]) if outputs else empty
        items = (torch.cat([i for _, _, i in outputs]) if outputs else empty) if has_items else None
        if distributed:
            emb, labels, items = (gather_uneven(t.to(self.device)) for t in (emb, labels, items))
        if len(emb) == 0:
            return None
        if items is None:
            return emb, labels, None
        order = torch.argsort(items.to(emb.device))
        return emb[order], labels[order.to(labels.device)], items.to(emb.device)[order]

    @torch.no_grad()
    def _split_metrics(
        self, emb: Tensor, labels: Tensor, oneshot: bool = False
    ) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """Retrieval (leave-one-out), verification (and one-shot) metrics of one split's
        embeddings, with the verification pairs' distances and same flags."""
        # A tiny split cannot rank 10 neighbours: report the recalls it can (k < N).
        ks = tuple(k for k in RECALL_KS if k < len(emb)) or (1,)
        emb_np, labels_np = emb.cpu().numpy(), labels.cpu().numpy()
        retrieval = retrieval_metrics(emb_np, labels_np, metric=self.distance.faiss_metric, ks=ks)
        dist, same = self.pair_distances(
            emb, labels, self.hparams.eval_pairs, self.hparams.eval_seed
        )
        verification = verification_metrics(dist, same)
        counts = ("num_queries", "num_queries_without_positive", "num_pairs", "num_same")
        merged = {**retrieval, **verification}
        metrics = {k: float(v) for k, v in merged.items() if k not in counts}
        # Mean same/different pair distance: two lines that meet when the embedding collapses.
        metrics["pos_distance"] = float(dist[same].mean()) if same.any() else math.nan
        metrics["neg_distance"] = float(dist[~same].mean()) if (~same).any() else math.nan
        if oneshot:
            shots = oneshot_metrics(
                emb_np,
                labels_np,
                ways=ONESHOT_WAYS,
                episodes=ONESHOT_EPISODES,
                seed=self.hparams.eval_seed,
                metric=self.distance.faiss_metric,
                scorer=self.episode_scorer(),
                groups=None if self.oneshot_groups is None else self.oneshot_groups[labels_np],
            )
            metrics.update({k: v for k, v in shots.items() if not k.endswith("_ci95")})
        return metrics, dist, same

    def episode_scorer(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """One-shot scoring by a learned head (Koch et al.): queries (B, 1, D) and prototypes
        (B, N, D) as numpy -> (B, N) head distances; None for a geometric distance, which
        one-shot scores with the faiss metric of its embeddings."""
        if not isinstance(self.distance, LearnedDistance):
            return None

        @torch.no_grad()
        def score(query: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
            p = torch.as_tensor(prototypes, dtype=torch.float32, device=self.device)
            q = torch.as_tensor(query, dtype=torch.float32, device=self.device).expand_as(p)
            return self.distance.to_distance(self.distance.paired(q, p)).double().cpu().numpy()

        return score

    def retrieval_scorer(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
        """Brute-force retrieval by this model's own pair distance (a learned head too):
        query rows (B, D) and gallery (M, D) as numpy -> (B, M) distances, float64."""
        gallery: list[Any] = [None, None]  # (the array, its tensor): one copy per gallery

        @torch.no_grad()
        def score(query: np.ndarray, items: np.ndarray) -> np.ndarray:
            if gallery[0] is not items:
                gallery[:] = [items, torch.as_tensor(items, dtype=torch.float32).to(self.device)]
            q = torch.as_tensor(query, dtype=torch.float32).to(self.device)
            scores = self.distance.pairwise(q, gallery[1])
            return self.distance.to_distance(scores).double().cpu().numpy()

        return score

    @torch.no_grad()
    def pair_distances(
        self, emb: Tensor, labels: Tensor, num_pairs: int, seed: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Distances (this model's Φ, a learned head too) and same flags of ``num_pairs``
        fixed-seed balanced pairs of a split's embeddings, as numpy."""
        pairs = sample_pairs(labels, num_pairs, seed)
        out = []
        for s in range(0, len(pairs.first), 65536):  # bounded memory for a learned head
            a = emb[pairs.first[s : s + 65536].to(emb.device)]
            b = emb[pairs.second[s : s + 65536].to(emb.device)]
            out.append(self.distance.to_distance(self.distance.paired(a, b)).float().cpu())
        return torch.cat(out).numpy(), pairs.same.numpy()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Augmentation and dropout draw from these: an exact resume needs them back.
        checkpoint["rng_states"] = rng_states()
        # A run resumed mid-epoch logs that epoch's means over all its steps (Lightning
        # keeps no logged sums in a checkpoint: its own epoch means would restart).
        checkpoint["train_epoch_stats"] = self._epoch_stats.state_dict()
        if self.run_overrides is not None:
            checkpoint[RUN_OVERRIDES_KEY] = list(self.run_overrides)

    def on_train_start(self) -> None:
        self._keep_batchnorm_frozen()  # also for a run resumed mid-epoch (no epoch start)
        # Put the random streams back as late as possible: nothing between here and the
        # next batch draws from them, so training goes on exactly as it would have.
        states = self.__dict__.pop("_resume_rng", None)
        if states is None:
            return
        restore_rng_states(states)
        if is_distributed():  # the checkpoint holds rank 0's streams: give each rank its own
            seed_per_rank(int(torch.randint(2**62, (1,))))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        check_same_model(checkpoint.get("state_dict", {}), self.state_dict())
        self.__dict__["_resume_rng"] = checkpoint.get("rng_states")
        self._epoch_stats.load_state_dict(checkpoint.get("train_epoch_stats"))
        # A one-cycle schedule is planned for a fixed number of steps: resuming it with a
        # different plan would fail deep inside torch, so say what to change instead.
        for state in checkpoint.get("lr_schedulers", []):
            planned = state.get("total_steps")
            if planned is not None and planned != self.planned_steps():
                raise ConfigError(
                    f"the checkpoint's one-cycle LR schedule is planned for {planned} steps, "
                    f"but this run plans {self.planned_steps()}; resume "
                    "with the run's own trainer.max_epochs and data.batch_size, or start a "
                    "new run (init from the weights with siamese.load)"
                )

    def planned_steps(self) -> int:
        """Optimizer steps this fit will take: Lightning's ``estimated_stepping_batches``,
        computed from the data module's batch count when it has one. (Lightning's own
        estimate builds the training iterator and draws its first batch at once, before a
        resumed run has put the loader back where the checkpoint left it.)"""
        trainer = self.trainer
        datamodule = trainer.datamodule
        count = getattr(datamodule, "train_batches_per_epoch", None)
        if trainer.max_epochs in (None, -1) or count is None:
            return int(trainer.estimated_stepping_batches)
        batches = count()
        limit = trainer.limit_train_batches
        if isinstance(limit, int):
            batches = min(batches, limit)
        elif limit is not None and float(limit) != 1.0:
            batches = int(batches * float(limit))
        steps = math.ceil(batches / trainer.accumulate_grad_batches) * max(trainer.max_epochs, 1)
        return min(steps, trainer.max_steps) if trainer.max_steps != -1 else steps

    @property
    def backbone(self) -> torch.nn.Module | None:
        """The tower's pretrained-style backbone (everything but its embedding head), or None
        for a tower without one; Lightning's BackboneFinetuning acts on it."""
        return getattr(self.tower, "backbone", None)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: for a tower with a backbone, the backbone's (its
        ``lr_mult`` scales the optimizer's lr) and the rest (named, so a dashboard's
        ``lr-AdamW/backbone`` and ``lr-AdamW/head`` do not depend on the multiplier); one
        group otherwise."""
        backbone = self.backbone
        if backbone is None:
            return [{"params": list(self.parameters())}]
        inside = {id(p) for p in backbone.parameters()}
        return [
            {
                "params": [p for p in self.parameters() if id(p) in inside],
                "name": "backbone",
                "lr_mult": self.backbone_lr_mult,
            },
            {
                "params": [p for p in self.parameters() if id(p) not in inside],
                "name": "head",
                "lr_mult": 1.0,
            },
        ]

    def configure_optimizers(self):
        make_optimizer = build(self.hparams.optimizer)
        groups = self.parameter_groups()
        lr = getattr(make_optimizer, "keywords", {}).get("lr")
        if len(groups) == 1:
            optimizer = make_optimizer(params=groups[0]["params"])
        else:
            if lr is None:
                raise ConfigError(
                    "model.backbone_lr_mult needs optimizer.lr set (it scales it), e.g. "
                    "optimizer.lr=0.001"
                )
            for group in groups:
                group["lr"] = float(lr) * group["lr_mult"]
            optimizer = make_optimizer(params=groups)
        if not self.hparams.scheduler:
            return optimizer
        make = build(self.hparams.scheduler)
        kwargs = scheduler_kwargs(make, self.planned_steps())
        peak = getattr(make, "keywords", {}).get("max_lr")
        if len(groups) > 1 and isinstance(peak, int | float):  # one peak per group
            kwargs["max_lr"] = [float(peak) * g["lr_mult"] for g in optimizer.param_groups]
        scheduler = make(optimizer, **kwargs)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def state_difference(saved: dict[str, Any], own: dict[str, Any]) -> str | None:
    """The first difference between a checkpoint's tensors and a model's, in words (with
    their count), or None when every key and shape matches."""

    def shape(t: Any) -> str:
        return "x".join(str(n) for n in getattr(t, "shape", ())) or "scalar"

    not_tensors = [k for k, v in saved.items() if not isinstance(v, Tensor)]
    if not_tensors:
        return f"{not_tensors[0]} is {type(saved[not_tensors[0]]).__name__}, not a tensor"
    resized = [k for k in saved if k in own and tuple(saved[k].shape) != tuple(own[k].shape)]
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    if not (resized or missing or extra):
        return None
    if resized:
        k = resized[0]
        first = f"{k} is {shape(saved[k])} there and {shape(own[k])} here"
    elif missing:
        first = f"{missing[0]} is not in it"
    else:
        first = f"it has {extra[0]}, which this model lacks"
    count = len(resized) + len(missing) + len(extra)
    return f"{first}; {count} tensor{'s differ' if count > 1 else ' differs'}"


def check_same_model(saved: dict[str, Any], own: dict[str, Any]) -> None:
    """Refuse to resume into a model whose tensors differ from the checkpoint's (another
    ``model.*``, ``distance`` or loss with parameters): one line naming the first
    difference, instead of torch's page of size mismatches."""
    difference = state_difference(saved, own)
    if difference is None:
        return
    raise ConfigError(
        f"the checkpoint holds another model ({difference}); resume with the run's own model, "
        "distance and loss settings (ckpt_path=last or auto reuses the run's own, saved in "
        "the checkpoint), or start a new run"
    )


def scheduler_kwargs(make: Callable[..., Any], steps: int) -> dict[str, Any]:
    """What a partial scheduler config gets besides the optimizer: ``total_steps`` or
    ``T_max`` = ``steps`` (the fit's optimizer steps) when it takes one and the config does
    not set it; and a one-cycle warm-up of exactly one step moved to two (torch divides by
    ``pct_start * total_steps - 1``: 0.2 x 5 steps in a quick check would crash it)."""
    keywords = getattr(make, "keywords", {})
    params = inspect.signature(getattr(make, "func", make)).parameters
    extra: dict[str, Any] = {
        name: steps for name in ("total_steps", "T_max") if name in params and name not in keywords
    }
    pct = keywords.get("pct_start")
    total = extra.get("total_steps", keywords.get("total_steps"))
    if pct is not None and total and float(pct) * total == 1.0 and total > 2:
        extra["pct_start"] = 2.0 / total
    return extra
