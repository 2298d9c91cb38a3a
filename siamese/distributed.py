"""DDP pieces: gathers that keep gradients, padded gathers, evaluated splits, sync batch norm.

Under Lightning's DDP every process embeds its own part of the global batch. In-batch pair
losses and triplet mining must see the **global** batch, so embeddings are gathered with
``gather_with_grad``: every process then computes the same global loss, and the backward
pass sums each process's gradient of the gathered tensor before keeping its own slice.
DDP averages parameter gradients over the W processes, which turns that W-fold sum back
into the gradient of the global loss: 2 devices with batch B each train exactly like
1 device with batch 2B (``tests/unit/test_distributed.py`` checks it to 1e-5).

Everything here is the identity in a single process.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from pytorch_lightning.plugins.layer_sync import TorchSyncBatchNorm
from torch import Tensor, nn
from torch.autograd import Function


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """(global rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def seed_per_rank(base: int) -> None:
    """Under DDP, seed each process's global random stream with ``base`` offset by its rank
    (Lightning seeds them alike, so they would draw the same augmentations and dropout
    masks for their parts of the global batch); nothing in a single process."""
    rank, world = rank_and_world()
    if world > 1:
        torch.manual_seed((base + 1_000_003 * rank) % 2**63)


class _GatherWithGrad(Function):
    """Concatenate equally sized tensors of all processes along dim 0, keeping gradients."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        world = dist.get_world_size()
        ctx.rank, ctx.size = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(world)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Each process holds the gradient of its own copy of the global loss with respect to
        # every gathered row; the rows of this process get the sum over all copies.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.size : (ctx.rank + 1) * ctx.size]


class _AllReduceSum(Function):
    """Sum of ``tensor`` over all processes, differentiable: every process's copy of the
    result feeds its own loss, so the gradient is summed over processes the same way."""

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:  # type: ignore[override]
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """``tensor`` summed over all processes, differentiable; itself in a single process."""
    if not is_distributed():
        return tensor
    return _AllReduceSum.apply(tensor)


def gather_with_grad(tensor: Tensor) -> Tensor:
    """All processes' ``tensor`` (same shape on each) concatenated in rank order, (W*B, ...),
    differentiable; the tensor itself in a single process."""
    if not is_distributed():
        return tensor
    return _GatherWithGrad.apply(tensor)


@torch.no_grad()
def gather_uneven(tensor: Tensor) -> Tensor:
    """All processes' ``tensor`` concatenated in rank order, each of any length along dim 0
    (padded for the collective, then cut), without gradients."""
    if not is_distributed():
        return tensor
    world = dist.get_world_size()
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    counts = [int(s) for s in sizes]
    padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])


@torch.no_grad()
def gather_split(
    outputs: list[tuple[Tensor, Tensor, Tensor | None]], dim: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """One evaluated split from the ``(embeddings, labels, item indices)`` batches of an
    epoch's evaluation steps: every process's batches gathered (each holds part of the
    split), rows in item order (as evaluate.py embeds a split: the same pairs and
    tie-breaks); None when no process embedded anything. ``dim`` is the embedding size a
    process without a batch contributes empty rows of."""
    distributed = is_distributed()
    if not outputs and not distributed:
        return None
    has_items = all(i is not None for _, _, i in outputs)
    if distributed and not has_items:
        raise RuntimeError("DDP evaluation needs item indices from the loader")
    # A process without a batch still takes part in the gathers, with empty tensors.
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    emb = torch.cat([e for e, _, _ in outputs]) if outputs else torch.zeros(0, dim, device=device)
    labels = torch.cat([y for _, y, _ in outputs]) if outputs else empty
    items = (torch.cat([i for _, _, i in outputs]) if outputs else empty) if has_items else None
    if distributed:
        emb, labels, items = (gather_uneven(t.to(device)) for t in (emb, labels, items))
    if len(emb) == 0:
        return None
    if items is None:
        return emb, labels, None
    order = torch.argsort(items.to(emb.device))
    return emb[order], labels[order.to(labels.device)], items.to(emb.device)[order]


class CPUSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics span all processes, for CPU tensors (gloo).

    torch's ``SyncBatchNorm`` only takes GPU tensors (and DDP refuses it on a CPU module).
    Here the batch statistics are summed over all processes with differentiable
    all-reduces (two passes: mean, then variance), so a 2-process CPU run normalises by the
    global batch exactly like one process would. Outside a process group, or in eval mode,
    it is plain batch norm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected a batch of at least 2 dimensions, got {input.dim()}")

    def forward(self, input: Tensor) -> Tensor:
        if not (self.training and is_distributed()):
            return super().forward(input)
        self._check_input_dim(input)
        dtype, input = input.dtype, input.float()  # statistics in float32 under autocast
        channels = input.shape[1]
        dims = [0, *range(2, input.dim())]
        shape = [1, channels] + [1] * (input.dim() - 2)
        count = input.new_tensor([input.numel() // channels])
        total = all_reduce_sum(torch.cat([input.sum(dims), count]))
        n = total[-1]
        mean = total[:channels] / n
        centred = input - mean.view(shape)
        var = all_reduce_sum((centred * centred).sum(dims)) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                if self.momentum is None:  # cumulative moving average
                    m = 1.0 / float(self.num_batches_tracked)
                else:
                    m = self.momentum
                unbiased = var * (n / (n - 1).clamp_min(1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        return out.to(dtype)


class _PlainBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Batch norm of any input rank (what a synchronised layer turns back into)."""

    def _check_input_dim(self, input: Tensor) -> None:
        return


def _swap_batchnorm(module: nn.Module, kind: type, sources: tuple[type, ...]) -> nn.Module:
    """``module`` with every layer of a ``sources`` type rebuilt as ``kind`` (same tensors)."""
    converted = module
    if isinstance(module, sources) and not isinstance(module, kind):
        converted = kind(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
        )
        if module.affine:
            with torch.no_grad():
                converted.weight = module.weight
                converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, _swap_batchnorm(child, kind, sources))
    return converted


def convert_cpu_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Every batch-norm layer of ``module`` as a :class:`CPUSyncBatchNorm` (tensors kept)."""
    return _swap_batchnorm(module, CPUSyncBatchNorm, (nn.modules.batchnorm._BatchNorm,))


class SyncBatchNormPlugin(TorchSyncBatchNorm):
    """Lightning's ``sync_batchnorm=True`` on GPUs (torch's fused ``SyncBatchNorm``) and on
    CPUs (:class:`CPUSyncBatchNorm`), so ``trainer=ddp trainer.accelerator=cpu`` works too.

    Args:
        cpu: the processes train on CPUs.
    """

    def __init__(self, cpu: bool) -> None:
        self.cpu = cpu

    def apply(self, model: nn.Module) -> nn.Module:
        if self.cpu:
            return convert_cpu_sync_batchnorm(model)
        return super().apply(model)

    def revert(self, model: nn.Module) -> nn.Module:
        if self.cpu:
            return _swap_batchnorm(model, _PlainBatchNorm, (CPUSyncBatchNorm,))
        return super().revert(model)


__all__ = [
    "CPUSyncBatchNorm",
    "SyncBatchNormPlugin",
    "all_reduce_sum",
    "convert_cpu_sync_batchnorm",
    "gather_split",
    "gather_uneven",
    "gather_with_grad",
    "is_distributed",
    "rank_and_world",
    "seed_per_rank",
]
