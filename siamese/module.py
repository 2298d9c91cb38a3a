"""The LightningModule: one weight-shared tower, a distance Φ and a loss, trained on pairs.

Both sides of every pair go through ``self.tower`` in one forward pass over the
concatenated batch, so a single parameter set receives the gradients of both branches.
Validation and test embed their whole split and hand it to ``siamese.evaluation.Evaluator``
(retrieval leave-one-out, verification on fixed-seed balanced pairs), as evaluate.py does.

The constructor takes plain config dicts (``_target_`` + keywords) and builds the parts
itself, so a checkpoint rebuilds its model from the file alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor

from siamese.checkpointing import restore_rng_states, rng_states
from siamese.checks import check_int_setting
from siamese.config import build
from siamese.distances import LearnedDistance
from siamese.distributed import gather_split, gather_with_grad, is_distributed, seed_per_rank
from siamese.errors import ConfigError, DataError
from siamese.evaluation import EvalReport, Evaluator
from siamese.inputs import IMAGE_RANGE, check_images
from siamese.losses import LossOutput
from siamese.metric_names import ONESHOT_WAYS
from siamese.models.backbones import check_lr_mult
from siamese.resume import RUN_OVERRIDES_KEY
from siamese.training import (
    TRAIN_EPOCH_LOGS,
    EpochStats,
    check_same_model,
    check_schedule_plan,
    make_optimizers,
    parameter_groups,
    planned_steps,
    scheduler_kwargs,
    state_difference,
)

# Importable from here as before: the input check, the training pieces.
__all__ = ["IMAGE_RANGE", "TRAIN_EPOCH_LOGS", "EvalOutputs", "SiameseModule", "check_images"]
__all__ += ["check_same_model", "scheduler_kwargs", "state_difference"]

RECALL_KS = (1, 5, 10)
ONESHOT_EPISODES = 1000


@dataclass
class EvalOutputs:
    """The last evaluated split and its report, kept for callbacks (plots, collapse check).

    When the loader gave item indices, rows are sorted by item and ``items[i]`` is the split
    index of row i (all of them in order unless the split was evaluated in part).
    """

    stage: str  # "val" or "test"
    embeddings: Tensor  # (N, D) float32, on the CPU
    labels: Tensor  # (N,)
    items: Tensor | None  # (N,) int64 split indices, or None when the loader gave none
    report: EvalReport


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
        self._epoch_stats = EpochStats()
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
        check_int_setting("batch_size", batch_size)
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
        """Whether Lightning writes the logs of this training step: its rule, from the
        trainer's public fields (the optimizer steps before this one, + 1, a multiple of
        ``log_every_n_steps``, or the run stopping)."""
        trainer = self.trainer
        if trainer.fast_dev_run:
            return True
        every = trainer.log_every_n_steps
        return bool(every) and ((trainer.global_step + 1) % every == 0 or trainer.should_stop)

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
        """Score the split the epoch's steps embedded (gathered from every process, in item
        order) with this model's evaluator; keep its report in ``last_eval``."""
        outputs, self._outputs = self._outputs, []
        split = gather_split(outputs, self.tower.embedding_dim, self.device)
        if split is None:
            return {}
        emb, labels, items = (None if t is None else t.cpu() for t in split)
        labels_np = labels.numpy()
        test = stage == "test"
        groups = (
            self.oneshot_groups[labels_np] if test and self.oneshot_groups is not None else None
        )
        report = self.evaluator(oneshot=test).evaluate(emb.numpy(), labels_np, groups=groups)
        self.last_eval = EvalOutputs(stage, emb, labels, items, report)
        return report.logged()

    def evaluator(self, oneshot: bool = False, **settings: Any) -> Evaluator:
        """The ``Evaluator`` of this model's distance (a learned head scores pairs and one-shot
        episodes itself) with training's settings (``eval_pairs``, ``eval_seed``; one-shot
        ``ONESHOT_WAYS`` when ``oneshot``); ``settings`` replace any of its keywords."""
        seed = self.hparams.eval_seed
        options: dict[str, Any] = {
            "metric": self.distance.faiss_metric,
            "pair_distance": self.pair_distance,
            "episode_scorer": self.episode_scorer(),
            "ks": RECALL_KS,
            "pairs": self.hparams.eval_pairs,
            "pairs_seed": seed,
            "oneshot_ways": ONESHOT_WAYS if oneshot else (),
            "oneshot_episodes": ONESHOT_EPISODES,
            "oneshot_seed": seed,
        }
        return Evaluator(**{**options, **settings})

    @torch.no_grad()
    def pair_distance(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """This model's Φ between embedding rows ``a[i]`` and ``b[i]`` (a learned head too),
        lower means more alike: (P, D) numpy -> (P,) float32 numpy."""
        a_t = torch.as_tensor(a, dtype=torch.float32).to(self.device)
        b_t = torch.as_tensor(b, dtype=torch.float32).to(self.device)
        return self.distance.to_distance(self.distance.paired(a_t, b_t)).float().cpu().numpy()

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
        check_schedule_plan(checkpoint, self.planned_steps)

    @property
    def backbone(self) -> torch.nn.Module | None:
        """The tower's pretrained-style backbone (everything but its embedding head), or None
        for a tower without one; Lightning's BackboneFinetuning acts on it."""
        return getattr(self.tower, "backbone", None)

    def planned_steps(self) -> int:
        """Optimizer steps this fit will take (``siamese.training.planned_steps``)."""
        return planned_steps(self.trainer)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The optimizer's parameter groups (``siamese.training.parameter_groups``)."""
        return parameter_groups(self, self.backbone, self.backbone_lr_mult)

    def configure_optimizers(self) -> Any:
        return make_optimizers(self.hparams, self.parameter_groups(), self.planned_steps)
