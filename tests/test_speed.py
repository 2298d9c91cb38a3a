"""Speed options: splits held on the device, channels_last, torch.compile, no per-step sync.

No GPU here: the device path is exercised with torch's ``meta`` device (tensors with a
shape and no data, like a GPU's from the host's point of view); benchmarks/gpu_check.sh
measures the real thing on a GPU.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from test_datamodule import TinySource
from test_distributed import LOSSES, TOWER
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from siamese.config import build
from siamese.data import SiameseDataModule
from siamese.data.augment import BatchRandomAffine
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


class HostToDeviceCopies(TorchFunctionMode):
    """Records every torch call that moves host data onto the ``meta`` device: a tensor
    argument on the CPU with a result on meta (``.to``, ``copy_``, indexing by a CPU index),
    or ``torch.tensor``/``as_tensor`` of Python data made there."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[tuple[str, list[tuple[int, ...]]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        on_device = any(o.device.type == "meta" for o in tree_flatten(out)[0] if torch.is_tensor(o))
        host = [tuple(a.shape) for a in tensors if a.device.type == "cpu"]
        made = not tensors and getattr(func, "__name__", "") in ("tensor", "as_tensor")
        if on_device and (host or made):
            self.copies.append((getattr(func, "__name__", str(func)), host))
        return out


@pytest.mark.parametrize(
    ("loss", "distance", "pair_mode"),
    [
        ("multi_similarity", "EuclideanDistance", "in_batch"),
        ("triplet_batch_hard", "EuclideanDistance", "in_batch"),
        ("contrastive", "CosineSimilarity", "explicit"),
    ],
)
def test_a_training_step_on_a_device_reads_nothing_back_and_copies_only_the_indices(
    monkeypatch, loss, distance, pair_mode
):
    """The step's data path, augmentation, loss, epoch sums, backward and optimizer step on
    the ``meta`` device (a GPU stand-in whose tensors hold no data: reading a value back,
    ``.item()``, ``bool()``, a data-dependent shape, fails). The only host data that reaches
    the device is each batch's index list, once."""
    meta = torch.device("meta")
    dm = SiameseDataModule(
        TinySource(),
        batch_size=8,
        samples_per_class=2,
        image_size=12,
        pair_mode=pair_mode,
        augment=BatchRandomAffine(elastic_alpha=2.0),
    )
    monkeypatch.setattr(dm, "_device", lambda: meta)
    dm.setup("fit")
    monkeypatch.setattr(
        dm, "trainer", SimpleNamespace(training=True, global_rank=0, world_size=1), raising=False
    )
    torch.manual_seed(0)
    module = SiameseModule(
        tower=TOWER,
        distance={"_target_": f"siamese.distances.{distance}"},
        loss=LOSSES[loss],
        optimizer={"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3},
    ).to(meta)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    batches = iter(dm.train_dataloader())
    for step in range(3):
        with HostToDeviceCopies() as log:
            batch = dm.on_after_batch_transfer(next(batches), 0)
            out, images = module._shared_step(batch)
            module._epoch_stats.add(0, out, images)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
        # The batch's indices, once (explicit pairs: the 8 first and 8 second images).
        images_read = 16 if pair_mode == "explicit" else 8
        assert log.copies == [("to", [(images_read,)])], step
        assert batch[0].device.type == "meta" and batch[0].shape[0] == 8
    assert module._epoch_stats.means(0).device.type == "meta"
