"""Benchmark: training images/s through the framework (LightningModule + Trainer) against a
bare PyTorch loop on the same tensors, batches, tower, loss, optimizer and schedule.

Three variants train copies of the same freshly built ``SiameseModule`` (built from the
project's Hydra config, overrides welcome); the first ``--warmup`` steps are not timed:

- ``bare``: forward, loss, backward, optimizer and scheduler step on precomputed
  class-balanced batches held on the device;
- ``framework``: the same batches through ``pl.Trainer``: Lightning's loop, the module's
  training_step and logging, the throughput callback;
- ``pipeline``: the project's data path: a ``SiameseDataModule`` built from ``cfg.data``
  whose training split is the embedded split tiled to ``--images`` (uint8, held on a GPU
  under ``data.on_device=auto``), its ClassBalancedBatchSampler and loaders, through the
  same Trainer set-up.

Goal (issue 5): framework >= 0.9x the bare loop. The config is composed with
``data.augment=null`` (bare and framework never augment); ``--augment`` keeps the config's
augmentation for the pipeline. ``data.on_device=...`` is accepted whether or not the data
config lists the key. ``--json PATH`` also writes the figures as JSON.

    python benchmarks/throughput.py
    python benchmarks/throughput.py --steps 200 data.batch_size=320 data.samples_per_class=32
    python benchmarks/throughput.py --device cuda --precision 16-mixed --images 60000 \\
        data.batch_size=1024 data.samples_per_class=128 model.channels_last=true
    python benchmarks/throughput.py --variants bare,pipeline --augment model.compile=true
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from siamese.callbacks import DivergenceGuard, Throughput  # noqa: E402
from siamese.config import build  # noqa: E402
from siamese.data.datasets import DataSplits, TensorImages  # noqa: E402
from siamese.data.samplers import ClassBalancedBatchSampler  # noqa: E402
from siamese.pipelines.train import build_module  # noqa: E402

VARIANTS = ("bare", "framework", "pipeline")


class StepClock(pl.Callback):
    """Wall clock from the end of step ``warmup`` to the end of the last step (device synced).

    Steps are counted across epochs (the pipeline's epochs are shorter than the run).
    """

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.steps = 0
        self.start: float | None = None
        self.end: float | None = None
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps += 1
        if self.steps == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()
        elif self.steps > self.warmup:
            self.images += len(batch[0])
            if self.steps == trainer.max_steps:  # the last step: stop before the teardown
                _sync(pl_module.device)
                self.end = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        if self.end is None:
            _sync(pl_module.device)
            self.end = time.perf_counter()

    def rate(self) -> float:
        if self.start is None or not self.images:
            raise RuntimeError(
                f"only {self.steps} steps ran, not more than --warmup {self.warmup}: raise --steps"
            )
        return self.images / (self.end - self.start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class FixedSplits:
    """A data source whose ``load`` returns splits already in memory."""

    def __init__(self, splits: DataSplits) -> None:
        self.splits = splits

    def load(self, root: str | None = None) -> DataSplits:
        return self.splits


def tiled(train: TensorImages, images: int | None) -> TensorImages:
    """The split repeated up to ``images`` items (GPU goal: 60,000), the dtype kept."""
    if not images or images <= len(train):
        return train
    reps = -(-images // len(train))
    return TensorImages(
        train.images.repeat(reps, 1, 1, 1)[:images],
        train.targets.repeat(reps)[:images],
        train.classes,
    )


def make_batches(cfg, steps: int, device: torch.device, images: int | None):
    """``steps`` class-balanced (images, labels) batches of the training split, on ``device``,
    with the data module and the (tiled) training split they came from."""
    datamodule = build(cfg.data)
    train = tiled(datamodule.load_splits().train, images)
    x, y = train.__getitems__(list(range(len(train))))  # float32 in [0, 1]
    sampler = ClassBalancedBatchSampler(y, cfg.data.batch_size, cfg.data.samples_per_class)
    x, y = x.to(device), y.to(device)
    batches = []
    epoch = 0
    while len(batches) < steps:
        sampler.set_epoch(epoch)
        for idx in sampler:
            index = torch.as_tensor(idx, device=device)
            batches.append((x[index], y[index]))
            if len(batches) == steps:
                break
        epoch += 1
    return datamodule, train, batches


def bare_loop(module, batches, warmup: int, precision: str) -> float:
    """Images/s of forward, loss, backward, optimizer and scheduler step after warm-up."""
    module.train()
    # The module's own optimizer and schedule, planned for these steps (as the Trainer does).
    optimizer = build(module.hparams.optimizer)(params=module.parameters())
    scheduler = None
    if module.hparams.scheduler:
        make = build(module.hparams.scheduler)
        names = inspect.signature(make.func).parameters
        extra = {n: len(batches) for n in ("total_steps", "T_max") if n in names}
        scheduler = make(optimizer, **{k: v for k, v in extra.items() if k not in make.keywords})
    device = module.device
    dtype = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)
    start, seen = None, 0
    for step, (images, labels) in enumerate(batches):
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = module.loss_fn(module._embed_batch(images), labels).loss  # as training_step
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        if step + 1 == warmup:
            _sync(device)
            start = time.perf_counter()
        elif step + 1 > warmup:
            seen += len(images)
    _sync(device)
    return seen / (time.perf_counter() - start)


def _trainer(device: torch.device, precision: str, steps: int, clock: StepClock) -> pl.Trainer:
    return pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=steps,
        max_epochs=-1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        # train.py's per-step callbacks: throughput and the non-finite loss/gradient guard.
        callbacks=[clock, Throughput(), DivergenceGuard()],
    )


def framework(module, batches, warmup: int, device: torch.device, precision: str) -> float:
    """Images/s of the same steps through the Trainer, the module's training_step and logging."""
    clock = StepClock(warmup)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    _trainer(device, precision, len(batches), clock).fit(module, train_dataloaders=loader)
    return clock.rate()


def pipeline(
    module, cfg, splits: DataSplits, steps: int, warmup: int, device: torch.device, precision: str
) -> tuple[float, str]:
    """Images/s of the project's data path: SiameseDataModule (from ``cfg.data``, reading
    ``splits``), its class-balanced sampler and loader, the Trainer, the module; and where
    the loader's training images were held."""
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    data_cfg.pop("source", None)
    datamodule = build(data_cfg, source=FixedSplits(splits))
    clock = StepClock(warmup)
    trainer = _trainer(device, precision, steps, clock)
    trainer.fit(module, datamodule=datamodule)
    images = getattr(trainer.train_dataloader.dataset, "images", None)
    return clock.rate(), str(images.device) if images is not None else "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="steps per variant, warm-up included")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--images", type=int, default=None, help="tile the split to N images")
    parser.add_argument("--repeats", type=int, default=2, help="alternate runs of each variant")
    parser.add_argument(
        "--variants", default=",".join(VARIANTS), help=f"comma-separated, of {','.join(VARIANTS)}"
    )
    parser.add_argument(
        "--augment", action="store_true", help="keep the config's data.augment (pipeline only)"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    args = parser.parse_intermixed_args()
    variants = list(dict.fromkeys(v.strip() for v in args.variants.split(",") if v.strip()))
    if not variants or set(variants) - set(VARIANTS):
        parser.error(f"--variants takes a comma-separated list of {', '.join(VARIANTS)}")
    if args.warmup < 1 or args.steps <= args.warmup:
        parser.error("need --warmup >= 1 and --steps > --warmup")
    # data.on_device is a data module keyword that a data config may not list: force-add it.
    overrides = ["++" + o if o.startswith("data.on_device=") else o for o in args.overrides]
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "train", overrides=[*([] if args.augment else ["data.augment=null"]), *overrides]
        )
    with open_dict(cfg):
        cfg.paths.output_dir = os.devnull
    device = torch.device(args.device)
    pl.seed_everything(0, verbose=False)
    steps = args.steps
    datamodule, train, batches = make_batches(
        cfg, steps if {"bare", "framework"} & set(variants) else 0, device, args.images
    )
    splits = DataSplits(train, datamodule.load_splits().val, datamodule.load_splits().test)
    base = build_module(cfg, datamodule).to(device)

    runs: dict[str, list[float]] = {v: [] for v in variants}
    held_on = None  # where the pipeline's training images were
    for _ in range(args.repeats):  # alternate, so drifts of a shared machine hit all
        for variant in variants:
            module = copy.deepcopy(base)
            if variant == "bare":
                rate = bare_loop(module, batches, args.warmup, args.precision)
            elif variant == "framework":
                rate = framework(module, batches, args.warmup, device, args.precision)
            else:
                rate, held_on = pipeline(
                    module, cfg, splits, steps, args.warmup, device, args.precision
                )
            runs[variant].append(rate)
            # One line per run as it ends: a run cut short by a timeout still shows the rest.
            print(f"  run {len(runs[variant])} {variant}: {rate:.0f} images/s", flush=True)
            del module
    best = {v: max(r) for v, r in runs.items()}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {name} ({torch.get_num_threads()} threads), precision {args.precision}, "
        f"batch {cfg.data.batch_size}, {len(train)} training images, "
        f"{steps - args.warmup} timed steps, channels_last {cfg.model.get('channels_last')}, "
        f"compile {cfg.model.get('compile')}"
    )
    labels = {"bare": "bare loop", "framework": "framework", "pipeline": "pipeline"}
    for v in variants:
        extra = f"; images held on {held_on}" if v == "pipeline" else ""
        print(
            f"{labels[v]:<11} {best[v]:10.0f} images/s   "
            f"(runs: {', '.join(f'{r:.0f}' for r in runs[v])}{extra})"
        )
    ratios = {}
    if "bare" in best:
        if "framework" in best:
            ratios["framework"] = best["framework"] / best["bare"]
            print(f"ratio       {ratios['framework']:10.3f}   (framework / bare loop, goal >= 0.9)")
        if "pipeline" in best:
            ratios["pipeline"] = best["pipeline"] / best["bare"]
            print(f"pipe ratio  {ratios['pipeline']:10.3f}   (pipeline / bare loop)")
    if args.json:
        record = {
            "device": name,
            "threads": torch.get_num_threads(),
            "precision": args.precision,
            "batch_size": int(cfg.data.batch_size),
            "images": len(train),
            "timed_steps": steps - args.warmup,
            "overrides": args.overrides,
            "augment": bool(args.augment),
            "pipeline_images_on": held_on,
            "images_per_sec": best,
            "runs": runs,
            "ratio_to_bare": ratios,
        }
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
