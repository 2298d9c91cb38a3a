"""Pretrained backbones: weights from the libraries' caches or a file, exactly those tensors;
the weights' own input config; bad weights, names and multipliers refused in one line.

No test downloads: conftest sets HF_HUB_OFFLINE=1 and empty HF_HOME / TORCH_HOME folders, and
each test writes the files a loader looks for, at the place its download code would put them.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch
from helpers import (
    ARCH,
    FAST,
    HUB_ID,
    assert_fragments,
    compose_config,
    compose_train,
    make_image_folder,
    put_in_hf_cache,
    timm_state,
    tv_state,
)
from safetensors.torch import save_file

import siamese
from siamese.errors import ConfigError
from siamese.models import ResNet18Tower, TimmTower
from siamese.models.backbones import check_backbone_settings, input_defaults, without_pretrained
from siamese.models.weights import read_weights
from siamese.pipelines.export import run_export
from siamese.pipelines.train import run_training
from siamese.registry import REGISTRY

TV_FILE = "resnet18-f37072fd.pth"


@pytest.fixture
def caches(tmp_path, monkeypatch) -> dict[str, Path]:
    """Empty library caches of this test (HF_HOME, TORCH_HOME), downloads forbidden."""
    paths = {"hf": tmp_path / "hf", "torch": tmp_path / "torch"}
    monkeypatch.setenv("HF_HOME", str(paths["hf"]))
    monkeypatch.setenv("TORCH_HOME", str(paths["torch"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    return paths


def assert_starts_with(backbone: torch.nn.Module, state: dict, skip: tuple[str, ...] = ()):
    """Every tensor of ``backbone`` (a ResNet18Tower: its ``net`` but the head) is ``state``'s."""
    own = backbone.state_dict()
    if isinstance(backbone, ResNet18Tower):
        own = {k: v for k, v in backbone.net.state_dict().items() if not k.startswith("fc.")}
    checked = 0
    for key, value in own.items():
        if key in skip:
            continue
        assert torch.equal(value, state[key]), key
        checked += 1
    assert checked == len(own) - len(skip) > 10


def test_timm_tower_starts_with_exactly_the_cached_tensors(caches):
    state = timm_state()
    put_in_hf_cache(caches["hf"], HUB_ID, "model.safetensors", state)
    tower = TimmTower(ARCH, pretrained=True, embedding_dim=8, in_channels=3, image_size=32)
    assert_starts_with(tower.backbone, state)
    assert "fc.weight" not in tower.backbone.state_dict()  # num_classes=0: pooled features
    assert tower(torch.rand(2, 3, 32, 32)).shape == (2, 8)
    # Gray input: timm's in_chans adaptation sums the stem over RGB (3 -> 1 channel).
    gray = TimmTower(ARCH, pretrained=True, embedding_dim=8, in_channels=1, image_size=32)
    stem = "conv1.0.weight"
    assert torch.equal(gray.backbone.state_dict()[stem], state[stem].sum(1, keepdim=True))
    assert_starts_with(gray.backbone, state, skip=(stem,))


def test_resnet18_pretrained_takes_torchvisions_file_from_torch_home(caches):
    state = tv_state()
    folder = caches["torch"] / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / TV_FILE)
    big = ResNet18Tower(embedding_dim=8, pretrained=True, in_channels=3, image_size=112)
    assert big.net.conv1.stride == (2, 2) and not isinstance(big.net.maxpool, torch.nn.Identity)
    assert_starts_with(big, state)
    # 28 px digits: the small-input stem keeps the pretrained 7x7 conv, at stride 1.
    small = ResNet18Tower(embedding_dim=8, pretrained=True, in_channels=1, image_size=28)
    assert small.net.conv1.stride == (1, 1) and isinstance(small.net.maxpool, torch.nn.Identity)
    conv = small.net.conv1.weight
    assert torch.equal(conv, state["conv1.weight"].sum(1, keepdim=True))
    assert small(torch.rand(2, 1, 28, 28)).shape == (2, 8)


def test_a_weights_file_in_each_form_gives_the_same_tensors(tmp_path, caches):
    state = timm_state(seed=3)
    plain = tmp_path / "plain.pth"
    torch.save(state, plain)
    wrapped = tmp_path / "wrapped.pt"  # a DDP training script's checkpoint
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, wrapped)
    safe = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(safe))
    for path in (plain, wrapped, safe):
        tower = TimmTower(ARCH, weights=str(path), embedding_dim=4, in_channels=3, image_size=32)
        assert_starts_with(tower.backbone, state)
    # torchvision's file format into model=resnet18 through model.weights.
    tv = tv_state(seed=4)
    torch.save(tv, tmp_path / "tv.pth")
    tower = ResNet18Tower(
        embedding_dim=4, weights=str(tmp_path / "tv.pth"), in_channels=3, image_size=112
    )
    assert_starts_with(tower, tv)


def test_the_weights_input_config_sets_size_and_statistics(caches):
    timm_cfg = {"_target_": "siamese.models.TimmTower", "name": ARCH, "pretrained": True}
    assert input_defaults(timm_cfg, 3) == {
        "image_size": [160, 160],  # test_resnet's pretrained_cfg input_size (3, 160, 160)
        "input_mean": [0.5, 0.5, 0.5],
        "input_std": [0.5, 0.5, 0.5],
    }
    tv_cfg = {"_target_": "siamese.models.ResNet18Tower", "weights": "w.pth"}
    gray = input_defaults(tv_cfg, 1)
    assert gray["image_size"] == [224, 224]
    assert gray["input_mean"] == [pytest.approx((0.485 + 0.456 + 0.406) / 3, abs=1e-6)]
    assert gray["input_std"] == [pytest.approx((0.229 + 0.224 + 0.225) / 3, abs=1e-6)]
    assert input_defaults({**timm_cfg, "pretrained": False}, 3) == {}  # random: the data's
    assert input_defaults({"_target_": "siamese.models.ConvTower"}, 1) == {}


def test_weights_of_another_architecture_name_the_first_tensor_and_its_shapes(tmp_path, caches):
    state = timm_state()
    own = timm.create_model(ARCH, num_classes=0).state_dict()
    first = next(iter(own))  # conv1.0.weight, the stem
    bad = dict(state, **{first: torch.zeros(5, 3, 3, 3)})
    torch.save(bad, tmp_path / "bad.pth")
    shape = "x".join(map(str, own[first].shape))
    with pytest.raises(ConfigError) as info:
        TimmTower(ARCH, weights=str(tmp_path / "bad.pth"), in_channels=3, image_size=32)
    assert_fragments(
        str(info.value),
        f"model.weights='{tmp_path / 'bad.pth'}' does not fit timm's {ARCH}",
        f"{first} is 5x3x3x3 in the file and {shape} in the model",
        "1 tensor differs",
        "pass weights of this architecture or the model.name they were saved from",
    )
    torch.save(tv_state(), tmp_path / "tv.pth")  # a whole other network
    stem = rf"{first} \({shape}\) is not in the file; \d+ tensors differ"
    with pytest.raises(ConfigError, match=rf"does not fit timm's {ARCH}: {stem}"):
        TimmTower(ARCH, weights=str(tmp_path / "tv.pth"), in_channels=3, image_size=32)
    torch.save(state, tmp_path / "timm.pth")
    tv_stem = r"fit torchvision's ResNet-18: conv1.weight \(64x3x7x7\) is not"
    with pytest.raises(ConfigError, match=tv_stem):
        ResNet18Tower(weights=str(tmp_path / "timm.pth"), in_channels=3, image_size=112)


def test_a_file_that_is_not_weights_is_one_line(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(ConfigError, match=r"is not a weights file torch reads as plain tensors"):
        read_weights(text)
    fake = tmp_path / "x.safetensors"
    fake.write_bytes(b"\x00" * 16)
    with pytest.raises(ConfigError, match=r"x.safetensors' is not a safetensors weights file"):
        read_weights(fake)
    code = tmp_path / "code.pth"  # a pickle that would call a function: never run
    torch.save({"w": torch.zeros(1), "f": os.getcwd}, code)
    with pytest.raises(ConfigError, match=r"is not a weights file torch reads as plain tensors"):
        read_weights(code)
    torch.save({"w": torch.zeros(1), "n": 3}, tmp_path / "mixed.pth")
    with pytest.raises(ConfigError, match=r"its entry 'n' holds a int, not a tensor"):
        read_weights(tmp_path / "mixed.pth")
    with pytest.raises(ConfigError, match=r"model.weights='.*nope.pth' does not exist; pass a"):
        check_backbone_settings({"weights": str(tmp_path / "nope.pth")})


def test_pretrained_without_a_cached_file_names_the_file_the_folder_and_the_alternative(caches):
    with pytest.raises(ConfigError) as info:
        check_backbone_settings(
            {"_target_": "siamese.models.TimmTower", "name": ARCH, "pretrained": True}
        )
    folder = caches["hf"] / "hub" / "models--timm--test_resnet.r160_in1k"
    assert_fragments(
        str(info.value),
        f"timm's {ARCH} weights (model.safetensors of {HUB_ID})",
        f"are not in the Hugging Face cache {folder}",
        "HF_HUB_OFFLINE=1 forbids downloads",
        f"`hf download {HUB_ID} model.safetensors`",
        "or pass model.weights=PATH",
    )
    with pytest.raises(ConfigError) as info:
        ResNet18Tower(pretrained=True, in_channels=3, image_size=64)
    assert_fragments(
        str(info.value),
        f"torchvision's ResNet-18 weights {TV_FILE}",
        f"are not in {caches['torch'] / 'hub' / 'checkpoints'}",
        "HF_HUB_OFFLINE=1 forbids downloads",
        f"download https://download.pytorch.org/models/{TV_FILE} into that folder",
        "or pass model.weights=PATH",
    )


def test_an_unknown_timm_name_offers_the_closest_names():
    with pytest.raises(ConfigError) as info:
        check_backbone_settings({"_target_": "siamese.models.TimmTower", "name": "resnet19"})
    assert str(info.value).startswith(
        "model.name='resnet19' is not a timm model; closest: resnet18, "
    )
    assert "timm.list_models('*resnet*')" in str(info.value)


@pytest.mark.parametrize("value", [0, -0.1, math.nan, math.inf, True, "0.1"])
def test_backbone_lr_mult_must_be_a_positive_number(value):
    with pytest.raises(ConfigError, match=r"model.backbone_lr_mult=.* must be a positive number"):
        check_backbone_settings({"backbone_lr_mult": value})


class BackboneProbe(pl.Callback):
    """Copies of the backbone and head at the start and after each epoch, and the optimizer's
    learning rates at the first step (used through a Hydra override)."""

    def __init__(self) -> None:
        self.snapshots: list[dict[str, dict[str, torch.Tensor]]] = []
        self.lrs: dict[str, float] = {}
        PROBES.append(self)

    def _take(self, pl_module) -> None:
        self.snapshots.append(
            {
                part: {k: v.detach().clone() for k, v in module.state_dict().items()}
                for part, module in (
                    ("backbone", pl_module.backbone),
                    ("head", pl_module.tower.head),
                )
            }
        )

    def on_fit_start(self, trainer, pl_module) -> None:
        self._take(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if not self.lrs:
            self.lrs = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._take(pl_module)


PROBES: list[BackboneProbe] = []


def weights_changed(before: dict, after: dict, dims: int = 2) -> list[str]:
    """The ``weight`` tensors with ``dims`` or more dimensions (convs, Linears: not
    BatchNorm's) that differ between two snapshots."""
    return [
        k
        for k, v in before.items()
        if k.endswith("weight") and v.dim() >= dims and not torch.equal(v, after[k])
    ]


@pytest.mark.slow  # ~20 s: a 2-epoch fit, a test, siamese.load and an ONNX export
def test_fine_tuning_a_cached_backbone_then_loading_and_exporting_from_the_checkpoint_alone(
    tmp_path, caches, monkeypatch
):
    # In the stored config: loads once registered (the module's name as pytest imported it).
    probe_target = f"{BackboneProbe.__module__}.BackboneProbe"
    monkeypatch.setitem(REGISTRY, "callback", REGISTRY["callback"] | {probe_target})
    state = timm_state(seed=5)
    put_in_hf_cache(caches["hf"], HUB_ID, "model.safetensors", state)
    PROBES.clear()
    out = tmp_path / "run"
    cfg = compose_train(
        [
            *FAST,
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "model=timm",
            f"model.name={ARCH}",
            "model.pretrained=true",
            "model.image_size=32",  # the weights say 160: digits stay small here
            "model.embedding_dim=16",
            "model.backbone_lr_mult=0.1",
            "model.freeze_bn=true",
            "callbacks.backbone_freeze.unfreeze_at_epoch=1",
            f"+callbacks.probe._target_={probe_target}",
        ],
        out,
    )
    run_training(cfg)
    (probe,) = PROBES
    start, epoch0, epoch1 = probe.snapshots
    # The run starts from the cached tensors (the stem summed over RGB for gray digits).
    stem = "conv1.0.weight"
    assert torch.equal(start["backbone"][stem], state[stem].sum(1, keepdim=True))
    assert all(torch.equal(v, state[k]) for k, v in start["backbone"].items() if k != stem)
    # Epoch 0: the backbone is frozen (its BatchNorm layers train: train_bn=true, Lightning's
    # default), the head trains; epoch 1: the backbone trains too.
    assert weights_changed(start["backbone"], epoch0["backbone"]) == []
    assert weights_changed(start["backbone"], epoch0["backbone"], dims=1) != []
    assert weights_changed(start["head"], epoch0["head"]) != []
    assert weights_changed(epoch0["backbone"], epoch1["backbone"]) != []
    # model.freeze_bn: the pretrained running statistics, through both epochs.
    stats = [k for k in state if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(epoch1["backbone"][k], state[k]) for k in stats)
    # Each group follows the one-cycle schedule, the backbone's at 0.1x the head's rate.
    assert 0 < probe.lrs["head"] <= cfg.optimizer.lr
    assert probe.lrs["backbone"] == pytest.approx(0.1 * probe.lrs["head"], rel=1e-9)

    best = out / "checkpoints" / "best.ckpt"
    stored = torch.load(best, map_location="cpu", weights_only=True)["hyper_parameters"]["tower"]
    assert stored["name"] == ARCH and stored["image_size"] == [32, 32]
    assert stored["input_mean"] == [0.5] and stored["input_std"] == [0.5]  # gray digits
    # The checkpoint alone rebuilds the model: caches emptied, no weights file anywhere.
    for folder in caches.values():
        shutil.rmtree(folder, ignore_errors=True)
    model = siamese.load(best)
    images = torch.rand(3, 1, 32, 32)
    trained = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    assert model.embed(images).shape == (3, 16)
    exported = compose_config("export", [f"ckpt_path={best}", "format=onnx"], tmp_path / "onnx")
    described = run_export(exported)  # checks ONNX against PyTorch on the file itself
    assert described["input"]["shape"][1:] == [1, 32, 32]

    # The trained checkpoint as model.weights of a new tower: its backbone, exactly.
    tower = TimmTower(ARCH, weights=str(best), embedding_dim=4, in_channels=1, image_size=32)
    backbone = {
        k[len("tower.backbone.") :]: v
        for k, v in trained.items()
        if k.startswith("tower.backbone.")
    }
    assert_starts_with(tower.backbone, backbone)


@pytest.mark.slow  # resnet18 at 224 px on the CPU: ~1 min
def test_photos_finetune_trains_on_a_folder_with_the_cached_resnet18(tmp_path, caches):
    put_in_hf_cache(
        caches["hf"], "timm/resnet18.a1_in1k", "model.safetensors", timm_state("resnet18")
    )
    make_image_folder(tmp_path / "photos", {f"c{i}": 12 for i in range(3)})
    out = tmp_path / "run"
    cfg = compose_train(
        [
            *FAST,
            "experiment=photos_finetune",
            f"data.root={tmp_path / 'photos'}",
            "data.batch_size=8",
            "data.num_workers=0",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
        ],
        out,
    )
    metrics = run_training(cfg)
    assert "test/precision_at_1" in metrics
    stored = torch.load(out / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=True)[
        "hyper_parameters"
    ]
    assert stored["tower"]["image_size"] == [224, 224]
    assert stored["tower"]["input_mean"] == [0.485, 0.456, 0.406]  # resnet18.a1_in1k's
    assert stored["backbone_lr_mult"] == 0.1
    assert stored["config"]["data"]["image_size"] == [224, 224]


def test_freeze_bn_keeps_the_pretrained_statistics_while_training(caches):
    state = timm_state(seed=9)
    put_in_hf_cache(caches["hf"], HUB_ID, "model.safetensors", state)
    tower = TimmTower(ARCH, pretrained=True, freeze_bn=True, in_channels=3, image_size=32)
    tower.eval()
    tower.train()  # what a trainer does around validation
    assert tower.training and tower.head.training
    norms = [m for m in tower.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)
    tower(torch.rand(4, 3, 32, 32)).sum().backward()
    own = tower.backbone.state_dict()
    stats = [k for k in own if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(own[k], state[k]) for k in stats)
    # Its BatchNorm scale and shift still get gradients (only the statistics are frozen).
    assert all(m.weight.grad is not None for m in norms)


def test_a_pretrained_small_input_resnet18_rebuilds_from_its_config_alone(tmp_path, caches):
    """Its 7x7 stem at stride 1 is not the random small-input 3x3 stem: the config that
    siamese.load and a resume build (no weights) names it."""
    torch.save(tv_state(), tmp_path / "tv.pth")
    config = {"weights": str(tmp_path / "tv.pth"), "in_channels": 1, "image_size": [28, 28]}
    trained = ResNet18Tower(embedding_dim=8, **config)
    assert trained.net.conv1.kernel_size == (7, 7) and trained.net.conv1.stride == (1, 1)
    rebuilt = without_pretrained({"_target_": "siamese.models.ResNet18Tower", **config})
    assert rebuilt["weights"] is None and rebuilt["stem"] == "7x7"
    rebuilt.pop("_target_")
    again = ResNet18Tower(embedding_dim=8, **rebuilt)
    again.load_state_dict(trained.state_dict())  # the same tensors, the same shapes
    images = torch.rand(2, 1, 28, 28)
    assert torch.equal(again.eval()(images), trained.eval()(images))


def test_a_checkpoint_of_train_py_gives_its_backbone_and_its_input_config(tmp_path):
    tv = tv_state(seed=2)
    ckpt = {
        "hyper_parameters": {
            "tower": {
                "_target_": "siamese.models.ResNet18Tower",
                "image_size": [48, 48],
                "input_mean": [0.25],
                "input_std": [0.5],
            },
        },
        "state_dict": {f"tower.net.{k}": v for k, v in tv.items()},  # fc: its head
    }
    torch.save(ckpt, tmp_path / "run.ckpt")
    weights = str(tmp_path / "run.ckpt")
    tower = ResNet18Tower(weights=weights, in_channels=3, image_size=48)
    assert_starts_with(tower, tv)
    # timm's resnet18 names its tensors as torchvision's does: either tower takes the other's.
    timm_tower = TimmTower("resnet18", weights=weights, in_channels=3, image_size=48)
    assert torch.equal(timm_tower.backbone.conv1.weight, tv["conv1.weight"])
    # The data it was trained on set the size and statistics, not ImageNet's.
    cfg = {"_target_": "siamese.models.TimmTower", "name": "resnet18", "weights": weights}
    assert input_defaults(cfg, 3) == {
        "image_size": [48, 48],
        "input_mean": [0.25, 0.25, 0.25],
        "input_std": [0.5, 0.5, 0.5],
    }


def test_timm_names_tags_and_sizes_it_cannot_take_are_one_line():
    with pytest.raises(
        ConfigError,
        match=r"^model.name='resnet18.foo': resnet18 has no weights "
        r"tagged 'foo'; its weights: resnet18.a1_in1k, ",
    ):
        check_backbone_settings({"_target_": "siamese.models.TimmTower", "name": "resnet18.foo"})
    vit = TimmTower("test_vit", in_channels=1, image_size=32, embedding_dim=4)  # built for 32
    assert vit.backbone.patch_embed.img_size == (32, 32)
    assert vit(torch.rand(2, 1, 32, 32)).shape == (2, 4)
    with pytest.raises(ConfigError, match=r"test_vit .*30.*\(Input height \(30\) should be"):
        TimmTower("test_vit", in_channels=1, image_size=30)


def test_backbone_freeze_unfreezes_a_run_resumed_mid_epoch_past_the_frozen_epochs():
    from types import SimpleNamespace

    from siamese.finetuning import BackboneFreeze

    module = SimpleNamespace(backbone=torch.nn.Linear(2, 2), backbone_lr_mult=1.0)
    trainer = SimpleNamespace(world_size=1, optimizers=[object()], current_epoch=1, strategy=None)
    callback = BackboneFreeze(unfreeze_at_epoch=1)
    callback.setup(trainer, module, "fit")  # frozen as a fresh fit starts
    assert not module.backbone.weight.requires_grad
    callback.on_train_start(trainer, module)  # resumed inside epoch 1: no epoch start hook
    assert module.backbone.weight.requires_grad and not callback.frozen
    early = SimpleNamespace(world_size=1, optimizers=[object()], current_epoch=0, strategy=None)
    callback.setup(early, module, "fit")
    callback.on_train_start(early, module)  # epoch 0: stays frozen
    assert not module.backbone.weight.requires_grad


def test_with_no_network_the_missing_file_is_one_line_at_once(caches, monkeypatch):
    """Downloads allowed but nothing reachable: no retries for a minute, the same one line
    with the reason (a connect that fails, as with no network)."""
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    monkeypatch.delenv("ALL_PROXY", raising=False)
    monkeypatch.delenv("all_proxy", raising=False)

    def no_network(address, timeout=None):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr("siamese.models.weights.socket.create_connection", no_network)
    with pytest.raises(ConfigError) as info:
        ResNet18Tower(pretrained=True, in_channels=3, image_size=64)
    assert (
        f"{TV_FILE} are not in {caches['torch'] / 'hub' / 'checkpoints'} (TORCH_HOME/hub/"
        "checkpoints) and there is no network (download.pytorch.org: Network is unreachable); "
        "download https://download.pytorch.org/models/"
    ) in str(info.value)
    with pytest.raises(ConfigError, match=r"and there is no network \(huggingface.co: Network"):
        check_backbone_settings({"_target_": "siamese.models.TimmTower", "name": ARCH,
                                 "pretrained": True})  # fmt: skip
