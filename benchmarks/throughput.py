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
import os
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from siamese.callbacks import Throughput  # noqa: E402
from siamese.config import build  # noqa: E402
from siamese.data.samplers import ClassBalancedBatchSampler  # noqa: E402
from siamese.pipelines.train import build_module  # noqa: E402


class StepClock(pl.Callback):
    """Wall clock from the end of step ``warmup`` to the end of the last step (device synced)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.end: float | None = None
        self.images = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            _sync(pl_module.device)
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.images += len(batch[0])

    def on_train_end(self, trainer, pl_module) -> None:
        _sync(pl_module.device)
        self.end = time.perf_counter()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_batches(cfg, steps: int, device: torch.device, images: int | None):
    """``steps`` class-balanced (images, labels) batches of the training split, on ``device``."""
    datamodule = build(cfg.data)
    train = datamodule.load_splits().train
    x, y = train.__getitems__(list(range(len(train))))
    if images and images > len(x):  # tile the split up to the requested size (GPU goal: 60k)
        reps = -(-images // len(x))
        x, y = x.repeat(reps, 1, 1, 1)[:images], y.repeat(reps)[:images]
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
    return datamodule, batches


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
            loss = module.loss_fn(module(images), labels).loss
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


def framework(module, batches, warmup: int, device: torch.device, precision: str) -> float:
    """Images/s of the same steps through the Trainer, the module's training_step and logging."""
    clock = StepClock(warmup)
    loader = torch.utils.data.DataLoader(batches, batch_size=None, shuffle=False)
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        precision=precision,
        max_steps=len(batches),
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock, Throughput()],
    )
    trainer.fit(module, train_dataloaders=loader)
    return clock.images / (clock.end - clock.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="steps per variant, warm-up included")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--images", type=int, default=None, help="tile the split to N images")
    parser.add_argument("--repeats", type=int, default=2, help="alternate runs of each variant")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of conf/train.yaml")
    args = parser.parse_intermixed_args()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("train", overrides=["data.augment=null", *args.overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = os.devnull
    device = torch.device(args.device)
    pl.seed_everything(0, verbose=False)
    datamodule, batches = make_batches(cfg, args.steps, device, args.images)
    base = build_module(cfg, datamodule).to(device)

    fw, bare = [], []
    for _ in range(args.repeats):  # alternate, so drifts of a shared machine hit both
        bare.append(bare_loop(copy.deepcopy(base), batches, args.warmup, args.precision))
        fw.append(framework(copy.deepcopy(base), batches, args.warmup, device, args.precision))
    best_fw, best_bare = max(fw), max(bare)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device {name} ({torch.get_num_threads()} threads), precision {args.precision}, "
        f"batch {cfg.data.batch_size}, {args.steps - args.warmup} timed steps"
    )
    print(f"bare loop   {best_bare:10.0f} images/s   (runs: {', '.join(f'{v:.0f}' for v in bare)})")
    print(f"framework   {best_fw:10.0f} images/s   (runs: {', '.join(f'{v:.0f}' for v in fw)})")
    print(f"ratio       {best_fw / best_bare:10.3f}   (goal >= 0.9)")


if __name__ == "__main__":
    main()
