"""export's pipeline in process: each format loads back with its own runtime and matches
PyTorch at 1e-4 for any batch size; model.json says exactly how to feed and compare."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import compose_config

import siamese
from siamese.errors import ConfigError
from siamese.module import SiameseModule
from siamese.pipelines import export as export_mod
from siamese.pipelines.export import (
    FILES,
    EmbeddingGraph,
    check_export,
    check_export_config,
    describe,
    export_onnx,
    export_program,
    export_torchscript,
    run_export,
)


@pytest.fixture(scope="module")
def ckpt(export_ckpt: Path) -> Path:
    """The checkpoint exported below: conftest's ``export_ckpt``, shared with tests/runs."""
    return export_ckpt


FORMATS = ("onnx", "torchscript", "export")


@pytest.fixture(scope="module")
def exported(ckpt, tmp_path_factory):
    """format -> (run directory, the returned model.json)."""
    runs = {}
    for fmt in FORMATS:
        out = tmp_path_factory.mktemp(fmt)
        cfg = compose_config("export", [f"ckpt_path={ckpt}", f"format={fmt}"], out)
        runs[fmt] = out, run_export(cfg)
    return runs


def load_back(fmt, path):
    """The file run by its own runtime, independent of the pipeline's checker."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == ["images"]
        assert [o.name for o in session.get_outputs()] == ["embeddings"]
        return lambda x: torch.from_numpy(session.run(["embeddings"], {"images": x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.load(str(path))
    return torch.export.load(str(path)).module()


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_loads_back_and_matches_pytorch_for_any_batch(ckpt, exported, fmt):
    out, _ = exported[fmt]
    run = load_back(fmt, out / FILES[fmt])
    model = siamese.load(ckpt)
    generator = torch.Generator().manual_seed(1)
    for batch in (1, 7):
        images = torch.rand((batch, 1, 28, 28), generator=generator)
        with torch.inference_mode():
            got = run(images)
        expected = model.embed(images)
        assert got.shape == (batch, 64)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    # Unit length: the euclidean distance's L2-normalisation is inside the graph.
    torch.testing.assert_close(got.norm(dim=1), torch.ones(7), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fmt", FORMATS)
def test_model_json_says_how_to_feed_and_compare(ckpt, exported, fmt):
    out, info = exported[fmt]
    on_disk = json.loads((out / "model.json").read_text())
    model = siamese.load(ckpt)
    threshold = float(model.threshold)
    assert 0 < threshold < 2  # calibrated on validation, a euclidean distance of unit vectors
    expected = {
        "format": fmt,
        "file": FILES[fmt],
        "input": {
            "name": "images",
            "shape": [None, 1, 28, 28],
            "dtype": "float32",
            "range": [0.0, 1.0],
            "mean": [float(model.tower.input_mean.reshape(-1)[0])],
            "std": [float(model.tower.input_std.reshape(-1)[0])],
            "normalization": "inside the graph: feed images in [0, 1], (x - mean) / std is applied",
        },
        "output": {"name": "embeddings", "shape": [None, 64]},
        "embedding_dim": 64,
        "distance": {
            "name": "euclidean",
            "normalize_embeddings": True,
            "faiss_metric": "l2",
            "is_similarity": False,
            "compare": "||a - b||_2",
        },
        "threshold": threshold,
        "same_if": "compare(a, b) <= threshold",
        "checkpoint": str(ckpt),
        "torch": torch.__version__,
        **({"opset": 18} if fmt == "onnx" else {}),
        "max_abs_diff": on_disk["max_abs_diff"],
    }
    assert on_disk == expected
    assert on_disk == info
    assert 0 <= on_disk["max_abs_diff"] <= 1e-4
    # mnist_subset's statistics of the training digits, applied inside the graph.
    assert on_disk["input"]["mean"][0] == pytest.approx(0.1311, abs=1e-3)
    assert on_disk["input"]["std"][0] == pytest.approx(0.3083, abs=1e-3)
    assert sorted(p.name for p in out.iterdir()) == sorted([FILES[fmt], "model.json"])


def small_module(tower: dict, distance: dict) -> SiameseModule:
    base = {"in_channels": 3, "image_size": [16, 16], "input_mean": [0.5, 0.4, 0.3]}
    return SiameseModule(
        tower={**base, "input_std": [0.2, 0.25, 0.3], **tower},
        distance=distance,
        loss={"_target_": "siamese.losses.ContrastiveLoss"},
        optimizer={"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1},
    ).eval()


@pytest.mark.slow  # ~15 s for the formats; the conv tower's exports stay in the default run
@pytest.mark.parametrize("fmt", FORMATS)
def test_resnet18_tower_with_cosine_exports_with_a_dynamic_batch(tmp_path, fmt):
    model = small_module(
        {"_target_": "siamese.models.ResNet18Tower", "embedding_dim": 8},
        {"_target_": "siamese.distances.CosineSimilarity"},
    )
    graph = EmbeddingGraph(model).eval()
    path = tmp_path / FILES[fmt]
    example = torch.rand(2, 3, 16, 16)
    writer = {"onnx": lambda: export_onnx(graph, example, path, 18)}
    writer["torchscript"] = lambda: export_torchscript(graph, example, path)
    writer["export"] = lambda: export_program(graph, example, path)
    writer[fmt]()
    # Batches of 1 and 5, against SiameseModule.forward through the file's own runtime.
    assert check_export(graph, fmt, path, (3, 16, 16), 5) <= 1e-4
    images = torch.rand(3, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(load_back(fmt, path)(images), model(images), atol=1e-4, rtol=0)


def test_learned_head_is_written_into_the_json_and_no_threshold_is_null(tmp_path):
    model = small_module(
        {"_target_": "siamese.models.ConvTower", "layers": [], "embedding_dim": 4},
        {"_target_": "siamese.distances.LearnedDistance", "embedding_dim": 4},
    )
    with torch.no_grad():
        model.distance.head.weight.copy_(torch.tensor([[-1.0, -2.0, 0.0, 0.5]]))
        model.distance.head.bias.fill_(0.25)
    info = describe(model, "export", tmp_path / "x.ckpt", None)
    assert info["distance"] == {
        "name": "learned",
        "normalize_embeddings": False,
        "faiss_metric": "l2",
        "is_similarity": True,
        "compare": "-(head.weight . |a - b| + head.bias)",
        "head": {"weight": [-1.0, -2.0, 0.0, 0.5], "bias": 0.25},
    }
    assert info["threshold"] is None  # never validated: NaN in the module
    assert "opset" not in info
    assert info["input"]["mean"] == pytest.approx([0.5, 0.4, 0.3])
    assert info["input"]["shape"] == [None, 3, 16, 16]
    # The formula in the JSON gives what model.compare gives.
    a, b = torch.rand(3, 4), torch.rand(3, 4)
    head = info["distance"]["head"]
    by_json = -((a - b).abs() @ torch.tensor(head["weight"]) + head["bias"])
    by_model = model.distance.to_distance(model.distance.paired(a, b))
    torch.testing.assert_close(by_json, by_model.detach())


def test_missing_onnx_packages_name_the_pip_command(monkeypatch, tmp_path):
    real = export_mod.find_spec
    monkeypatch.setattr(
        export_mod, "find_spec", lambda name: None if name == "onnxscript" else real(name)
    )
    cfg = compose_config("export", [f"ckpt_path={tmp_path / 'x.ckpt'}"], tmp_path / "out")
    with pytest.raises(ConfigError, match=r"format=onnx needs onnxscript: pip install onnxscript"):
        run_export(cfg)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "ckpt_path is required: python export.py ckpt_path="),
        (["ckpt_path=x.ckpt", "export.opset=11"], "export.opset must be an integer >= 18"),
        (["ckpt_path=x.ckpt", "export.check_batch=1"], "export.check_batch must be an integer"),
    ],
    ids=["no-ckpt", "old-opset", "check-batch"],
)
def test_options_that_cannot_work_fail_before_loading(tmp_path, args, expected):
    cfg = compose_config("export", args, tmp_path / "out")
    with pytest.raises(ConfigError, match=re.escape(expected)):
        check_export_config(cfg)
