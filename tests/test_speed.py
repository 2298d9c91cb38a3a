"""Speed options: splits held on the device, channels_last, torch.compile, no per-step sync.

No GPU here: the device path is exercised with torch's ``meta`` device (tensors with a
shape and no data, like a GPU's from the host's point of view); benchmarks/gpu_check.sh
measures the real thing on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from test_datamodule import TinySource
from test_distributed import LOSSES, TOWER

from siamese.config import build
from siamese.data import SiameseDataModule
from siamese.data.sources import ImageFolder
from siamese.errors import ConfigError
from siamese.module import SiameseModule
from siamese.pipelines.train import build_module


def meta_datamodule(monkeypatch, **kwargs) -> SiameseDataModule:
    dm = SiameseDataModule(TinySource(), batch_size=8, samples_per_class=2, **kwargs)
    monkeypatch.setattr(dm, "_device", lambda: torch.device("meta"))
    dm.setup("fit")
    return dm


def test_in_memory_splits_are_sliced_on_the_device(monkeypatch):
    dm = meta_datamodule(monkeypatch, num_workers=2, pin_memory=True, eval_batch_size=5)
    loader = dm.train_dataloader()
    # Device tensors are sliced in this process: no workers to copy them, nothing to pin.
    assert loader.num_workers == 0 and not loader.pin_memory
    images, labels = next(iter(loader))
    assert images.device.type == labels.device.type == "meta"
    assert images.shape == (8, 1, 12, 10) and images.dtype == torch.float32
    images, labels, items = next(iter(dm.val_dataloader()))
    assert images.device.type == "meta" and items.device.type == "cpu"
    # The CPU splits stay as they were, for the pictures and statistics.
    assert dm.load_splits().train.images.device.type == "cpu"


def test_on_device_false_keeps_batches_on_the_cpu(monkeypatch):
    dm = meta_datamodule(monkeypatch, on_device=False, num_workers=1)
    assert dm.train_dataloader().num_workers == 1
    images, _ = next(iter(dm.train_dataloader()))
    assert images.device.type == "cpu"


def test_on_device_true_refuses_files_and_bad_values(tmp_path: Path, monkeypatch):
    from fixtures_data import make_image_folder

    make_image_folder(tmp_path, {"a": 8, "b": 8})
    source = ImageFolder(channels=1, val_fraction=0.25, test_fraction=0.25, seed=0)
    dm = SiameseDataModule(
        source, root=str(tmp_path), batch_size=4, samples_per_class=2, image_size=8, on_device=True
    )
    monkeypatch.setattr(dm, "_device", lambda: torch.device("meta"))
    with pytest.raises(ConfigError, match="data.on_device=true needs in-memory"):
        dm.setup("fit")
    dm.on_device = "auto"  # files stay on the CPU without complaint
    dm.setup("fit")
    assert next(iter(dm.train_dataloader()))[0].device.type == "cpu"
    with pytest.raises(ConfigError, match="data.on_device='gpu' is unknown"):
        SiameseDataModule(TinySource(), on_device="gpu")


def make_module(**kwargs) -> SiameseModule:
    torch.manual_seed(0)
    return SiameseModule(
        tower=TOWER,
        distance={"_target_": "siamese.distances.EuclideanDistance"},
        loss=LOSSES["multi_similarity"],
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        **kwargs,
    )


def test_channels_last_changes_the_layout_not_the_numbers():
    plain, fast = make_module(), make_module(channels_last=True)
    conv = fast.tower.features[4].weight  # 16x8x3x3 (with one channel both layouts agree)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    images = torch.rand(6, 1, 12, 12)
    for mode in ("train", "eval"):
        getattr(plain, mode)(), getattr(fast, mode)()
        torch.testing.assert_close(fast(images), plain(images), rtol=1e-5, atol=1e-5)
    # Checkpoints hold the same tensors: either module loads the other's weights.
    plain.load_state_dict(fast.state_dict())


def test_compile_is_used_for_training_steps_and_leaves_the_weights_plain():
    plain = make_module()
    fast = make_module(compile={"backend": "eager"})  # dynamo tracing, no code generation
    assert fast.state_dict().keys() == plain.state_dict().keys()
    images = torch.rand(8, 1, 12, 12)
    fast.train(), plain.train()
    torch.testing.assert_close(fast(images), plain(images))
    compiled = fast.__dict__["_compiled_tower"]
    assert compiled is not None and compiled._orig_mod is fast.tower
    assert fast.state_dict().keys() == plain.state_dict().keys()  # not a submodule
    fast.eval(), plain.eval()
    torch.testing.assert_close(fast(images), plain(images))
    with pytest.raises(ConfigError, match="model.compile must be true, false or a dict"):
        make_module(compile="fast")


def test_no_training_metric_reaches_the_progress_bar_per_step(make_cfg):
    """A progress-bar value is read back from the device every step (a GPU sync); the module
    logs step values for the loggers only, and shows validation figures once an epoch."""
    bars: list[dict] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            bars.append(dict(trainer.progress_bar_metrics))

    cfg = make_cfg()
    dm = build(cfg.data)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Spy()],
    )
    trainer.fit(build_module(cfg, dm), datamodule=dm)
    assert len(bars) == 4 and bars[0] == bars[1] == {}  # nothing per step
    assert set(bars[2]) == set(bars[3]) == {"val/precision_at_1", "val/roc_auc"}
