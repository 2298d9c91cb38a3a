"""The LightningModule: one tower for both sides, scoring, its logs, and its speed options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from helpers import LAYERS, LOSSES, TOWER, TinySource
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from siamese.config import build
from siamese.data import SiameseDataModule
from siamese.data.augment import BatchRandomAffine
from siamese.distances import EuclideanDistance
from siamese.errors import ConfigError
from siamese.losses import ContrastiveLoss
from siamese.models import ConvTower
from siamese.module import SiameseModule
from siamese.pipelines.train import build_module


def test_weight_sharing_gradient_is_the_sum_of_both_branches():
    """One tower embeds both sides; its gradient equals branch 1's plus branch 2's."""
    torch.manual_seed(0)
    tower = ConvTower(
        [*LAYERS[:1], {"type": "relu"}], embedding_dim=6, in_channels=1, image_size=12
    )
    tower.eval()  # no batch-norm here anyway; keep the two passes comparable
    loss = ContrastiveLoss(EuclideanDistance(), margin=1.0)
    x1, x2 = torch.rand(5, 1, 12, 12), torch.rand(5, 1, 12, 12)
    same = torch.tensor([True, False, True, False, False])

    # Shared forward over the concatenated batch, as the module does.
    emb = tower(torch.cat([x1, x2]))
    loss.forward_pairs(*emb.split(5), same).loss.backward()
    shared = [p.grad.clone() for p in tower.parameters()]
    assert len(shared) == len(list(tower.parameters()))  # one parameter set

    # Branch 1 alone (branch 2 detached), then branch 2 alone: their sum is the shared grad.
    branch = []
    for side in (0, 1):
        tower.zero_grad()
        e1, e2 = tower(x1), tower(x2)
        e1, e2 = (e1, e2.detach()) if side == 0 else (e1.detach(), e2)
        loss.forward_pairs(e1, e2, same).loss.backward()
        branch.append([p.grad.clone() for p in tower.parameters()])
    for g, g1, g2 in zip(shared, *branch, strict=True):
        assert torch.allclose(g, g1 + g2, atol=1e-6)
        assert g1.abs().sum() > 0 and g2.abs().sum() > 0


def test_the_module_scores_with_its_own_distance_through_the_evaluator():
    import numpy as np

    from siamese.module import SiameseModule

    torch.manual_seed(0)
    tower = {
        "_target_": "siamese.models.ConvTower",
        "layers": [],
        "embedding_dim": 4,
        "in_channels": 1,
        "image_size": [2, 2],
    }
    module = SiameseModule(
        tower=tower,
        distance={"_target_": "siamese.distances.CosineSimilarity"},
        loss={"_target_": "siamese.losses.ContrastiveLoss"},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        eval_pairs=40,
        eval_seed=7,
    )
    a = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]], dtype=np.float32)
    b = np.array([[1.0, 1.0, 0.0, 0.0], [0.0, -1.0, 0.0, 0.0]], dtype=np.float32)
    # Cosine distance 1 - cos: 1 - 1/sqrt(2), and 2 for opposite directions.
    np.testing.assert_allclose(module.pair_distance(a, b), [1 - 2**-0.5, 2.0], rtol=1e-6)
    evaluator = module.evaluator(oneshot=True)
    assert evaluator.metric == "ip" and evaluator.pair_distance == module.pair_distance
    assert (evaluator.pairs, evaluator.pairs_seed, evaluator.oneshot_seed) == (40, 7, 7)
    assert evaluator.oneshot_ways == (5, 20) and module.evaluator().oneshot_ways == ()
    assert module.evaluator(pairs=10).pairs == 10
    # Validation: the steps' embeddings scored by that evaluator; the report is kept.
    emb = torch.nn.functional.normalize(torch.randn(30, 4), dim=1)
    labels = torch.arange(30) % 3
    module._outputs.append((emb, labels, torch.arange(30)))
    logged = module._epoch_metrics("val")
    report = module.last_eval.report
    assert logged == report.logged() and "oneshot_5way_1shot" not in logged
    want = module.evaluator().evaluate(emb.numpy(), labels.numpy())
    assert report.metrics == want.metrics
    assert module.last_eval.stage == "val" and torch.equal(module.last_eval.embeddings, emb)


def test_training_steps_log_where_lightning_writes_logs():
    """log_every_n_steps=2: the steps after 1, 3, 5 optimizer steps, and a stopping run's."""
    from types import SimpleNamespace

    from siamese.module import SiameseModule

    module = SiameseModule(
        tower={
            "_target_": "siamese.models.ConvTower",
            "layers": [],
            "embedding_dim": 2,
            "in_channels": 1,
            "image_size": [2, 2],
        },
        distance={"_target_": "siamese.distances.EuclideanDistance"},
        loss={"_target_": "siamese.losses.ContrastiveLoss"},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
    )
    trainer = SimpleNamespace(fast_dev_run=False, log_every_n_steps=2, should_stop=False)
    module._trainer = trainer
    logged = []
    for step in range(6):
        trainer.global_step = step
        logged.append(module._logs_this_step())
    assert logged == [False, True, False, True, False, True]
    trainer.should_stop = True
    assert module._logs_this_step()
    trainer.log_every_n_steps = 0  # logging off
    assert not module._logs_this_step()


# -- speed: channels_last, torch.compile, no per-step sync (meta device stands in for a GPU)
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
