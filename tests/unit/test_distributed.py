"""DDP: 2 CPU processes (gloo) with batch B each train exactly like 1 process with batch 2B.

The gradient test runs the module's real training step inside torch's
DistributedDataParallel on 2 spawned processes and compares the loss, every tower gradient
and the batch-norm running statistics with one process on the same 2B images. The
samplers are checked to split the same global batches, and evaluation to gather the whole
split back; tests/runs/test_ddp_runs.py runs ``train.py trainer=ddp`` end to end."""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import LOSSES, TOWER
from omegaconf import OmegaConf

from siamese.data.pairs import PairBatchSampler
from siamese.data.samplers import ClassBalancedBatchSampler, EvalBatchSampler
from siamese.distributed import (
    SyncBatchNormPlugin,
    convert_cpu_sync_batchnorm,
    gather_split,
    gather_uneven,
    gather_with_grad,
)
from siamese.module import SiameseModule
from siamese.pipelines.train import planned_processes, run_training

B = 16  # images per process


M = 4  # images per class


def make_module(loss: dict[str, Any]) -> SiameseModule:
    torch.manual_seed(0)
    return SiameseModule(
        tower=TOWER,
        distance={"_target_": "siamese.distances.EuclideanDistance"},
        loss=loss,
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
        eval_pairs=200,
    )


# The global batches of the gradient test: "whole" is 2B / M = 8 classes of M images (each
# process holds 4 whole classes); "shared" draws from 3 classes, so the plan takes 11 + 11 +
# 10 images of them and the middle class is split between the two processes.
GLOBAL_BATCHES = {"whole": 10, "shared": 3}


def global_batch(kind: str = "whole") -> tuple[torch.Tensor, torch.Tensor]:
    """2B images drawn by the class-balanced sampler, the first process's part first."""
    targets = torch.arange(60) % GLOBAL_BATCHES[kind]
    sampler = ClassBalancedBatchSampler(targets, 2 * B, M, seed=3)
    idx = torch.tensor(next(iter(sampler)))
    g = torch.Generator().manual_seed(1)
    return torch.rand(len(idx), 1, 12, 12, generator=g), targets[idx]


class StepLoss(torch.nn.Module):
    """The module's training-step loss as a forward, for DistributedDataParallel."""

    def __init__(self, module: SiameseModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.module._shared_step((images, labels))[0].loss


def one_step(module: SiameseModule, images: torch.Tensor, labels: torch.Tensor) -> dict:
    module.train()
    loss = module._shared_step((images, labels))[0].loss
    loss.backward()
    return {"loss": loss.detach(), **_state(module)}


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {f"grad.{n}": p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    out.update({f"buffer.{n}": b.clone() for n, b in module.named_buffers() if "running" in n})
    return out


def _worker(rank: int, store: str, results: str, eval_emb: torch.Tensor, eval_labels) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        part = slice(rank * B, (rank + 1) * B)
        out: dict[str, Any] = {}
        for kind in GLOBAL_BATCHES:
            images, labels = global_batch(kind)
            for name, loss in LOSSES.items():
                module = make_module(loss)
                module.tower = convert_cpu_sync_batchnorm(module.tower)
                ddp = torch.nn.parallel.DistributedDataParallel(StepLoss(module))
                module.train()
                step_loss = ddp(images[part], labels[part])
                step_loss.backward()
                out[kind, name] = {"loss": step_loss.detach(), **_state(module)}
        # Gathers: uneven parts come back whole and in rank order.
        mine = torch.arange(3 + rank, dtype=torch.float32) + 10 * rank
        out["uneven"] = gather_uneven(mine)
        x = torch.full((2, 3), float(rank + 1), requires_grad=True)
        (gather_with_grad(x) * torch.arange(4.0).view(4, 1)).sum().backward()
        out["gather_grad"] = x.grad
        # Evaluation: each process embeds its share of batches; metrics of the whole split.
        module = make_module(LOSSES["multi_similarity"]).eval()
        sampler = EvalBatchSampler(len(eval_emb), 7, seed=0, rank=rank, world_size=2)
        for batch in sampler:
            idx = torch.tensor(batch, dtype=torch.int64)
            module._outputs.append((eval_emb[idx], eval_labels[idx], idx))
        out["eval_batches"] = len(sampler)
        out["metrics"] = module._epoch_metrics("val")
        torch.save(out, os.path.join(results, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory) -> tuple[list[dict], torch.Tensor, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("ddp")
    g = torch.Generator().manual_seed(2)
    eval_emb = torch.randn(45, 8, generator=g)
    eval_labels = torch.arange(45) % 6
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp), eval_emb, eval_labels), nprocs=2)
    results = [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(2)]
    return results, eval_emb, eval_labels


@pytest.mark.parametrize("kind", list(GLOBAL_BATCHES))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_two_processes_step_like_one_process_with_the_global_batch(two_process_results, loss, kind):
    results, _, _ = two_process_results
    images, labels = global_batch(kind)
    if kind == "shared":  # a class on both processes: its pairs across them count too
        assert sorted(labels.bincount().tolist()) == [10, 11, 11]
        assert set(labels[:B].tolist()) & set(labels[B:].tolist())
    reference = one_step(make_module(LOSSES[loss]), images, labels)
    for rank in range(2):
        got = results[rank][kind, loss]
        assert set(got) == set(reference)
        assert len([k for k in got if k.startswith("grad.")]) == 11  # every tower tensor
        for key, want in reference.items():
            assert torch.allclose(got[key], want, rtol=1e-5, atol=1e-5), (rank, key)
    # The gradients are not trivially equal: the loss is learning something.
    assert float(reference["loss"]) > 0
    assert max(float(v.abs().max()) for k, v in reference.items() if k.startswith("grad.")) > 1e-3


def test_gathers_keep_rank_order_and_sum_gradients(two_process_results):
    results, _, _ = two_process_results
    for out in results:
        assert out["uneven"].tolist() == [0.0, 1.0, 2.0, 10.0, 11.0, 12.0, 13.0]
    # d/dx of sum_i i * row_i over the gathered rows [x0; x1], summed over both copies of
    # the loss: process 0 owns rows 0-1 (weights 0, 1), process 1 rows 2-3 (weights 2, 3).
    assert results[0]["gather_grad"].tolist() == [[0.0] * 3, [2.0] * 3]
    assert results[1]["gather_grad"].tolist() == [[4.0] * 3, [6.0] * 3]


def test_evaluation_gathers_the_whole_split_before_scoring(two_process_results):
    results, emb, labels = two_process_results
    module = make_module(LOSSES["multi_similarity"]).eval()
    for batch in EvalBatchSampler(len(emb), 7, seed=0):
        idx = torch.tensor(batch, dtype=torch.int64)
        module._outputs.append((emb[idx], labels[idx], idx))
    single = module._epoch_metrics("val")
    assert results[0]["eval_batches"] == results[1]["eval_batches"] == 4
    for out in results:
        assert set(out["metrics"]) == set(single)
        for key, value in single.items():
            assert out["metrics"][key] == value or (
                math.isnan(value) and math.isnan(out["metrics"][key])
            )


def test_class_balanced_parts_make_up_the_single_process_batches():
    targets = torch.arange(400) % 10
    one = list(ClassBalancedBatchSampler(targets, 2 * B, M, seed=7))
    parts = [
        list(ClassBalancedBatchSampler(targets, B, M, seed=7, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert len(one) == len(parts[0]) == len(parts[1]) == 400 // (2 * B)
    for i, batch in enumerate(one):
        assert parts[0][i] + parts[1][i] == batch
        for part in (parts[0][i], parts[1][i]):  # here each part is whole classes of M images
            counts = torch.bincount(targets[part], minlength=10)
            assert set(counts.tolist()) <= {0, M}


def test_a_class_split_between_processes_keeps_its_images_distinct():
    """3 classes of 40 asked for 2B / M = 8 classes: every process draws the same global
    batch of 11 + 11 + 10 and takes its half, cutting one class in two."""
    targets = torch.arange(120) % 3
    one = list(ClassBalancedBatchSampler(targets, 2 * B, M, seed=7))
    parts = [
        list(ClassBalancedBatchSampler(targets, B, M, seed=7, rank=r, world_size=2)) for r in (0, 1)
    ]
    assert len(one) == len(parts[0]) == len(parts[1]) == 120 // (2 * B)
    for i, batch in enumerate(one):
        assert parts[0][i] + parts[1][i] == batch and len(parts[0][i]) == len(parts[1][i]) == B
        assert len(set(batch)) == 2 * B  # no image twice in the global batch
        assert sorted(torch.bincount(targets[batch]).tolist()) == [10, 11, 11]
        on_both = set(targets[parts[0][i]].tolist()) & set(targets[parts[1][i]].tolist())
        assert len(on_both) == 1


def test_explicit_pairs_split_into_equal_distinct_parts():
    targets = torch.arange(100) % 5
    parts = [list(PairBatchSampler(targets, 8, 50, seed=1, rank=r, world_size=2)) for r in (0, 1)]
    assert len(parts[0]) == len(parts[1]) == 4  # 50 pairs -> 4 global batches of 16
    assert all(len(b) == 8 for p in parts for b in p)
    rows = [row for p in parts for b in p for row in b]
    one = [row for b in PairBatchSampler(targets, 8, 50, seed=1, rank=0, world_size=2) for row in b]
    assert rows[: len(one)] == one and len(rows) == 64


def test_eval_shares_cover_the_split_once_with_equal_batch_counts():
    shares = [list(EvalBatchSampler(103, 10, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shares] == [4, 4, 4]  # ceil(103 / 30)
    items = [i for s in shares for b in s for i in b]
    assert sorted(items) == list(range(103))
    assert max(len(b) for s in shares for b in s) <= 10


@pytest.mark.parametrize(
    ("batch_size", "slots", "rank0"),
    [
        # 36 = 9 classes x 4: process 0 takes 4 whole classes and half of the fifth.
        (18, [4] * 9, [4, 4, 4, 4, 2]),
        # 128 asks for 32 classes of 10: all 10, 13 or 12 images each.
        (64, [13] * 8 + [12] * 2, [13, 13, 13, 13, 12]),
    ],
)
def test_ddp_batches_the_old_sampler_refused_are_planned_for_the_global_batch(
    batch_size, slots, rank0
):
    targets = torch.arange(400) % 10
    parts = [
        ClassBalancedBatchSampler(targets, batch_size, M, rank=r, world_size=2) for r in (0, 1)
    ]
    assert list(parts[0].plan.slots) == slots
    for first, second in zip(*parts, strict=True):
        assert len(first) == len(second) == batch_size
        batch = first + second
        assert len(set(batch)) == len(batch)  # 40 images a class: no repeats
        assert sorted(torch.bincount(targets[batch]).tolist(), reverse=True) == sorted(
            slots + [0] * (10 - len(slots)), reverse=True
        )
        # Process 0 holds the first classes drawn (largest slots first among equals).
        counts = torch.bincount(targets[first], minlength=10)
        assert sorted(counts[counts > 0].tolist(), reverse=True) == rank0


@pytest.mark.parametrize(
    ("trainer", "processes"),
    [
        ({"accelerator": "cpu", "devices": 2}, 2),
        ({"accelerator": "cpu", "devices": 2, "num_nodes": 3}, 6),
        ({"accelerator": "cpu", "devices": "auto"}, 1),
        ({"accelerator": "cpu", "devices": [0, 1, 2]}, 3),
        ({"accelerator": "cpu", "devices": "0,1"}, 2),
        ({"accelerator": "cpu", "devices": 1, "num_nodes": 4}, 4),
    ],
)
def test_planned_processes(trainer, processes):
    assert planned_processes(OmegaConf.create(trainer)) == processes


def test_sync_batchnorm_plugin_round_trips_the_layers():
    module = make_module(LOSSES["multi_similarity"])
    before = {k: v.clone() for k, v in module.state_dict().items()}
    plugin = SyncBatchNormPlugin(cpu=True)
    synced = plugin.apply(module)
    assert sum(type(m).__name__ == "CPUSyncBatchNorm" for m in synced.modules()) == 2
    reverted = plugin.revert(synced)
    assert not any(type(m).__name__ == "CPUSyncBatchNorm" for m in reverted.modules())
    after = dict(reverted.state_dict())
    torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)


def test_train_py_plans_the_global_batch_before_any_process_starts(make_cfg, monkeypatch, caplog):
    """train.py plans the batches for the planned processes before Lightning starts them,
    and logs the plan once: 2 x 168 asks for 21 classes of the digits' 10."""
    cfg = make_cfg(
        "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "data.batch_size=168"
    )

    def stop(cfg, datamodule, resuming=False):
        raise RuntimeError("stopped after the batch check")

    monkeypatch.setattr("siamese.pipelines.train.build_module", stop)
    stopped = pytest.raises(RuntimeError, match="stopped after the batch check")
    with caplog.at_level(logging.INFO, logger="siamese.data"), stopped:
        run_training(cfg)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("batches:")]
    assert lines == [
        "batches: global batches of 336 images on 2 processes (168 each) = 6 classes x 34 + "
        "4 classes x 33 images (asked 2 x 168 / 16 = 21 classes; the training split has 10)"
    ]
    assert not (Path(cfg.paths.output_dir) / "checkpoints").exists()


def test_an_evaluated_split_comes_back_in_item_order_in_one_process():
    emb = torch.arange(12, dtype=torch.float32).view(6, 2)
    labels = torch.tensor([5, 4, 3, 2, 1, 0])
    items = torch.tensor([5, 4, 3, 2, 1, 0])
    batches = [(emb[:4], labels[:4], items[:4]), (emb[4:], labels[4:], items[4:])]
    got_emb, got_labels, got_items = gather_split(batches, 2, torch.device("cpu"))
    assert got_items.tolist() == [0, 1, 2, 3, 4, 5]
    assert got_labels.tolist() == [0, 1, 2, 3, 4, 5]
    assert got_emb[:, 0].tolist() == [10.0, 8.0, 6.0, 4.0, 2.0, 0.0]
    # Without item indices the rows stay as the loader gave them; nothing embedded: None.
    plain = gather_split([(emb, labels, None)], 2, torch.device("cpu"))
    assert plain[2] is None and torch.equal(plain[0], emb)
    assert gather_split([], 2, torch.device("cpu")) is None
