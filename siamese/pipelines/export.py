"""Export job: a checkpoint's tower (images -> embeddings) as ONNX, TorchScript or torch.export.

The exported graph computes what ``siamese.load(ckpt)(images)`` computes: float images
(B, C, H, W) in [0, 1] -> the tower (its input normalisation included) -> the distance's
``prepare`` (L2-normalisation where the distance uses it) -> embeddings (B, D), with a
dynamic batch dimension. ``model.json`` beside the file says how to feed it and how to
compare two of its embeddings (distance, calibrated threshold, a learned head's weights).
Both replace earlier ones together, and only once the exported file passed its check: a full
disk or a failed check leaves the earlier pair as it was.
"""

from __future__ import annotations

import io
import json
import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from siamese.checks import check_int_setting
from siamese.console import next_steps, say, shown_path
from siamese.distances import LearnedDistance
from siamese.errors import ConfigError
from siamese.exports import atomic_write, pending_path, written_together
from siamese.inference import load
from siamese.module import SiameseModule
from siamese.signals import stop_on_sigterm

log = logging.getLogger(__name__)

# format -> file written in the run directory.
FILES = {"onnx": "model.onnx", "torchscript": "model.ts", "export": "model.pt2"}
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
# The largest difference the written file may show against PyTorch on a check batch.
CHECK_ATOL = 1e-4
# How each distance turns two prepared embeddings a, b into "lower means more alike".
COMPARE = {
    "euclidean": "||a - b||_2",
    "cosine": "1 - a . b",
    "learned": "-(head.weight . |a - b| + head.bias)",
}


class EmbeddingGraph(nn.Module):
    """The inference path of a SiameseModule alone: images (B, C, H, W) -> embeddings (B, D)."""

    def __init__(self, model: SiameseModule) -> None:
        super().__init__()
        self.tower = model.tower
        self.distance = model.distance

    def forward(self, images: Tensor) -> Tensor:
        return self.distance.prepare(self.tower(images))  # (B, D)


def check_export_config(cfg: DictConfig) -> None:
    """Fail at start, in one sentence, on options that cannot work."""
    fmt = cfg.get("format")
    if fmt not in FILES:
        raise ConfigError(
            f"format={fmt!r} is unknown; choose one of: {', '.join(FILES)} "
            "(export: a .pt2 from torch.export)"
        )
    ex = cfg.export
    opset = ex.get("opset")
    check_int_setting("export.opset", opset, 18, " (the dynamo exporter)")
    check_int_setting("export.check_batch", ex.get("check_batch"), 2)
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.get("ckpt_path"):
        raise ConfigError(
            "ckpt_path is required: python export.py "
            "ckpt_path=outputs/train/runs/<time>/checkpoints/best.ckpt format=onnx"
        )


def require_onnx(check: bool) -> None:
    """One line naming the pip command when the ONNX exporter (or its runtime) is missing."""
    needed = ONNX_PACKAGES if check else ONNX_PACKAGES[:2]
    missing = [name for name in needed if find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"format=onnx needs {', '.join(missing)}: pip install {' '.join(missing)} "
            "(or pip install 'siamese[export]')"
        )


def describe(model: SiameseModule, fmt: str, ckpt_path: Path, opset: int | None) -> dict[str, Any]:
    """model.json: how to feed the exported file and compare what it returns."""
    tower, distance = model.tower, model.distance
    c, h, w = tower.input_shape
    threshold = float(model.threshold)
    dist: dict[str, Any] = {
        "name": distance.name,
        "normalize_embeddings": bool(distance.normalize_embeddings),
        "faiss_metric": distance.faiss_metric,
        "is_similarity": bool(distance.is_similarity),
        "compare": COMPARE.get(distance.name, distance.name),
    }
    if isinstance(distance, LearnedDistance):
        # The head is not in the graph (it takes two embeddings); its weights are small.
        dist["head"] = {
            "weight": distance.head.weight.detach().cpu().reshape(-1).tolist(),
            "bias": float(distance.head.bias.detach().cpu()),
        }
    info: dict[str, Any] = {
        "format": fmt,
        "file": FILES[fmt],
        "input": {
            "name": "images",
            "shape": [None, c, h, w],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "mean": tower.input_mean.detach().cpu().reshape(-1).tolist(),
            "std": tower.input_std.detach().cpu().reshape(-1).tolist(),
            "normalization": "inside the graph: feed images in [0, 1], (x - mean) / std is applied",
        },
        "output": {"name": "embeddings", "shape": [None, tower.embedding_dim]},
        "embedding_dim": tower.embedding_dim,
        "distance": dist,
        "threshold": None if math.isnan(threshold) else threshold,
        "same_if": "compare(a, b) <= threshold",
        "checkpoint": str(ckpt_path),
        "torch": torch.__version__,
    }
    if fmt == "onnx":
        info["opset"] = opset
    return info


@contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise these loggers to WARNING for a while (the ONNX optimiser logs each pass at INFO)."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(graph: nn.Module, example: Tensor, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1)
    with warnings.catch_warnings(), quiet_loggers(*ONNX_PACKAGES[:2], "onnx_ir"):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes={"images": {0: batch}},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )
    assert program is not None  # dynamo=True always returns the ONNXProgram
    # One self-contained protobuf (what ``program.save`` writes below its 1.5 GB external-data
    # threshold), written through a file object so that it can go to a temporary first.
    proto = program.model_proto.SerializeToString()
    with atomic_write(path) as f:
        f.write(proto)


def export_torchscript(graph: nn.Module, example: Tensor, path: Path) -> None:
    # Traced, not scripted: the towers have no data-dependent control flow, and the batch
    # size stays symbolic in the ops they use (checked on another batch size after saving).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notice: format=export
        traced = torch.jit.trace(graph, example, check_trace=False)
        with atomic_write(path) as f:
            torch.jit.save(traced, f)


def export_program(graph: nn.Module, example: Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(graph, (example,), dynamic_shapes={"images": {0: batch}})
    # Into memory first: torch's archive writer aborts the process (C++ terminate) when a
    # write to the disk fails under it; the archive is about the size of the weights.
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with atomic_write(path) as f:
        f.write(buffer.getbuffer())


def load_exported(fmt: str, path: Path) -> Any:
    """A callable ``images (B, C, H, W) float32 -> embeddings (B, D)`` run by the file alone."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path), map_location="cpu")
    with open(path, "rb") as f:  # a file object: torch.export.load wants a name ending .pt2
        return torch.export.load(f).module()


@torch.inference_mode()
def check_export(
    graph: nn.Module, fmt: str, path: Path, shape: tuple[int, ...], batch: int
) -> float:
    """Largest |exported - PyTorch| over batches of 1 and ``batch`` random images."""
    run = load_exported(fmt, path)
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for size in (1, batch):
        images = torch.rand((size, *shape), generator=generator)
        diff = (run(images).float() - graph(images)).abs().max()
        worst = max(worst, float(diff))
    if not worst <= CHECK_ATOL:
        raise RuntimeError(
            f"the exported {FILES.get(fmt, path.name)} differs from PyTorch by {worst:.2e} "
            f"(> {CHECK_ATOL}); please report it with the checkpoint's model config"
        )
    return worst


def run_export(cfg: DictConfig) -> dict[str, Any]:
    """Write ``model.<ext>`` and ``model.json`` into the run directory; return the JSON.
    A SIGTERM on the way is one ``stopped:`` line and exit 143, with no temporary left."""
    with stop_on_sigterm(Path(cfg.paths.output_dir), "exporting", "export.py"):
        return _export(cfg)


def _export(cfg: DictConfig) -> dict[str, Any]:
    check_export_config(cfg)
    fmt, ex = str(cfg.format), cfg.export
    if fmt == "onnx":
        require_onnx(bool(ex.check))
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser()
    model = load(ckpt_path, map_location="cpu")
    graph = EmbeddingGraph(model).eval()
    shape = tuple(model.tower.input_shape)
    # Two rows, so that the exporters see a batch they cannot mistake for a constant 1.
    example = torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))

    out_dir = Path(cfg.paths.output_dir)
    path = out_dir / FILES[fmt]
    with written_together(then="run export.py again"):
        if fmt == "onnx":
            export_onnx(graph, example, path, int(ex.opset))
        elif fmt == "torchscript":
            export_torchscript(graph, example, path)
        else:
            export_program(graph, example, path)
        info = describe(model, fmt, ckpt_path, int(ex.opset) if fmt == "onnx" else None)
        if ex.check:  # the new file, still beside the earlier one until the block ends
            written = pending_path(path)
            info["max_abs_diff"] = check_export(graph, fmt, written, shape, int(ex.check_batch))
        with atomic_write(out_dir / "model.json") as f:
            f.write((json.dumps(info, indent=2) + "\n").encode())
    log.info("exported %s and model.json to %s", path.name, out_dir)
    say(next_steps(out_dir, note=f"next: load {shown_path(path)} as docs/export.md shows"))
    return info
