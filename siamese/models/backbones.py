"""Backbone towers: a timm or torchvision network's pooled features -> a Linear embedding head.

``pretrained=true`` takes the weights from the library's own cache (``siamese.models.weights``)
and ``weights=PATH`` from a file; either way the input statistics and default image size are
the weights' own (``input_defaults``, from ``siamese.models.preprocessing``), and the
checkpoint carries the architecture and that input config, so ``siamese.load`` rebuilds the
model without the cache or the file.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from siamese.checks import is_number
from siamese.errors import ConfigError
from siamese.models.layers import check_dropout
from siamese.models.preprocessing import check_forward, checkpoint_input, stats_for
from siamese.models.preprocessing import input_defaults as input_defaults  # re-exported
from siamese.models.towers import Tower
from siamese.models.weights import (
    download_hf,
    download_url,
    hf_cache_dir,
    one_line,
    read_weights,
    torch_checkpoints_dir,
    weights_mismatch,
)

log = logging.getLogger(__name__)

# Images smaller than this (a side, in pixels) take ResNet-18's small-input stem by default.
SMALL_INPUT_BELOW = 96
STEMS = ("3x3", "7x7")  # ResNet18Tower's first conv
HF_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm asks the hub for, in order


def _flag(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    return value


def check_lr_mult(value: Any) -> float:
    """``model.backbone_lr_mult`` as a float, or one line: it must be a positive number."""
    if not is_number(value) or value <= 0:
        raise ConfigError(
            f"model.backbone_lr_mult={value!r} must be a positive number (the backbone's "
            "learning rate relative to the head's), e.g. 0.1; to keep the backbone fixed for "
            "some epochs use callbacks.backbone_freeze.unfreeze_at_epoch=N"
        )
    return float(value)


class BackboneTower(Tower):
    """A backbone's pooled features (B, F) -> [Dropout] -> Linear(F, D) -> [BatchNorm1d(D)].

    Subclasses set ``self.backbone`` (everything but the head: what
    ``model.backbone_lr_mult`` and the BackboneFreeze callback act on). ``freeze_bn`` keeps
    the backbone's BatchNorm layers in eval mode while training: their running statistics
    stay the pretrained ones (their scale and shift still train).
    """

    freeze_bn: bool

    def _make_head(self, features: int, dropout: float, head_bn: bool) -> nn.Module:
        dropout = check_dropout(dropout, "model.dropout")
        layers: list[nn.Module] = [nn.Dropout(dropout)] if dropout > 0 else []
        layers.append(nn.Linear(features, self.embedding_dim))
        if _flag(head_bn, "model.head_bn"):
            layers.append(nn.BatchNorm1d(self.embedding_dim))
        return layers[0] if len(layers) == 1 else nn.Sequential(*layers)

    def train(self, mode: bool = True) -> BackboneTower:
        super().train(mode)
        if mode and self.freeze_bn:
            self.freeze_batchnorm()
        return self

    def freeze_batchnorm(self) -> None:
        """Put the backbone's BatchNorm layers in eval mode (``freeze_bn``). Lightning does not
        call ``train()`` when fitting starts, and restores each module's own mode after
        validation, so the tower applies it when built and SiameseModule at each epoch start
        (DDP's SyncBatchNorm conversion makes new layers)."""
        for module in self.backbone.modules():
            if isinstance(module, _BatchNorm):
                module.eval()


# -- timm --------------------------------------------------------------------------------
def check_timm_name(name: Any) -> str:
    """``name`` if timm has that model (``resnet18``, ``convnext_nano.in12k``), else one line
    with the closest names."""
    import timm

    if isinstance(name, str) and timm.is_model(name):
        arch, _, tag = name.partition(".")
        if tag and name not in timm.list_pretrained(name):
            tags = timm.list_pretrained(f"{arch}.*")
            hint = f"its weights: {', '.join(tags[:6])}" if tags else "timm has no weights for it"
            raise ConfigError(
                f"model.name={name!r}: {arch} has no weights tagged {tag!r}; {hint} (or drop "
                "the tag)"
            )
        return name
    names = timm.list_models()
    base = str(name).split(".")[0].lower()
    close = difflib.get_close_matches(base, names, n=3, cutoff=0.5)
    hint = f"closest: {', '.join(close)}; " if close else ""
    family = re.sub(r"[\d_]+$", "", base)[:12] or base
    raise ConfigError(
        f'model.name={name!r} is not a timm model; {hint}python -c "import timm; '
        f"print(timm.list_models('*{family}*'))\" lists names like it (timm has "
        f"{len(names)} architectures)"
    )


def timm_pretrained_cfg(name: str) -> Any:
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(check_timm_name(name), allow_unregistered=False)
    if cfg is None:
        raise ConfigError(
            f"timm has no pretrained weights for model.name={name!r}; use model.pretrained=false, "
            "or model.weights=PATH"
        )
    return cfg


def timm_weights_file(name: str) -> Path:
    """The cached file of timm's pretrained ``name`` (downloaded by huggingface_hub when the
    network is allowed), or one ConfigError line saying what to put where."""
    from huggingface_hub import try_to_load_from_cache

    cfg = timm_pretrained_cfg(name)
    cache = hf_cache_dir()
    files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else HF_FILES
    if cfg.hf_hub_id:
        for filename in files:
            found = try_to_load_from_cache(cfg.hf_hub_id, filename, cache_dir=cache)
            if isinstance(found, str):
                return Path(found)
    legacy = torch_checkpoints_dir() / Path(cfg.url).name if cfg.url else None
    if legacy is not None and legacy.is_file():  # timm's older cache (TIMM_USE_OLD_CACHE)
        return legacy
    if cfg.hf_hub_id:
        file, why = download_hf(cfg.hf_hub_id, files)
        if file is not None:
            return file
        folder = cache / f"models--{cfg.hf_hub_id.replace('/', '--')}"
        raise ConfigError(
            f"model.pretrained=true: timm's {name} weights ({files[0]} of {cfg.hf_hub_id}) are "
            f"not in the Hugging Face cache {folder} and {why}; where there is network, "
            f"`hf download {cfg.hf_hub_id} {files[0]}` fills that cache folder: copy it here "
            "(or point HF_HOME at a copy), or pass model.weights=PATH to a weights file"
        )
    if legacy is None:
        raise ConfigError(
            f"model.pretrained=true: timm lists no downloadable weights for {name}; use "
            "model.pretrained=false, or model.weights=PATH to a weights file"
        )
    file, why = download_url(cfg.url, legacy)
    if file is not None:
        return file
    raise ConfigError(
        f"model.pretrained=true: timm's {name} weights {legacy.name} are not in "
        f"{legacy.parent} and {why}; download {cfg.url} into that folder, or pass "
        "model.weights=PATH to a weights file"
    )


def _timm_net(
    name: str,
    channels: int,
    state: dict[str, Tensor] | None,
    source: str,
    image_size: tuple[int, int],
) -> nn.Module:
    """timm's ``name`` without its classifier (pooled features), with ``state`` loaded
    through timm's own pretrained path (its filters, ``in_chans`` adaptation, classifier
    removal). A model built for one input size (a ViT) is built for ``image_size``: timm
    resamples its position embeddings when it loads weights of another size."""
    import timm
    from timm.models import get_pretrained_cfg

    extra: dict[str, Any] = {}
    cfg = get_pretrained_cfg(name)
    if cfg is not None and cfg.fixed_input_size:
        extra["img_size"] = tuple(image_size)

    def plain() -> nn.Module:
        try:
            return timm.create_model(
                name, pretrained=False, num_classes=0, in_chans=channels, **extra
            )
        except (RuntimeError, AssertionError, ValueError, TypeError) as exc:
            reason = one_line(exc, 160)
            size = "x".join(map(str, image_size))
            raise ConfigError(
                f"timm cannot build {name} for {channels}-channel {size} images ({reason}); "
                "set model.image_size=[H,W] to a size it takes"
            ) from None

    if state is None:
        return plain()
    try:
        return timm.create_model(
            name,
            pretrained=True,
            num_classes=0,
            in_chans=channels,
            pretrained_cfg_overlay={"state_dict": dict(state)},
            **extra,
        )
    except (RuntimeError, KeyError, ValueError) as exc:  # load_state_dict(strict) and filters
        net = plain()
        classifier = net.pretrained_cfg.get("classifier") or ()
        ignore = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        why = weights_mismatch(net, state, ignore) or one_line(exc)
        raise ConfigError(
            f"{source} does not fit timm's {name}: {why}; pass weights of this architecture "
            "or the model.name they were saved from"
        ) from None


class TimmTower(BackboneTower):
    """Any timm model as the backbone (``num_classes=0``: its pooled features), then a head.

    Args:
        name: a timm model name (``timm.list_models()``), optionally with a weights tag.
        pretrained: start from timm's weights for ``name``, read from the Hugging Face cache.
        weights: a weights file to start from instead (a state dict, a timm or torchvision
            weights file, or a checkpoint of train.py); its architecture must be ``name``'s.
        embedding_dim: D, the size of the embedding.
        head_bn: a BatchNorm1d after the embedding Linear.
        dropout: dropout on the pooled features, before the Linear.
        freeze_bn: keep the backbone's BatchNorm statistics frozen while training.
        in_channels: input channels; a 3-channel pretrained stem is adapted (timm's in_chans).
    """

    def __init__(
        self,
        name: str = "resnet18",
        pretrained: bool = False,
        weights: str | None = None,
        embedding_dim: int = 128,
        head_bn: bool = False,
        dropout: float = 0.0,
        freeze_bn: bool = False,
        in_channels: int | None = None,
        image_size: int | Sequence[int] | None = None,
        input_mean: float | Sequence[float] | None = None,
        input_std: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__(embedding_dim, in_channels, image_size, input_mean, input_std)
        self.name = check_timm_name(name)
        self.freeze_bn = _flag(freeze_bn, "model.freeze_bn")
        state, source = None, ""
        if weights:
            state, source = read_weights(weights), f"model.weights={str(weights)!r}"
        elif _flag(pretrained, "model.pretrained"):
            file = timm_weights_file(self.name)
            state, source = read_weights(file, "the cached weights"), f"the cached file {file}"
        self.backbone = _timm_net(self.name, self.in_channels, state, source, self.image_size)
        self.head = self._make_head(self.backbone.num_features, dropout, head_bn)
        self.train()  # freeze_bn
        check_forward(self, f"timm's {self.name}")

    @staticmethod
    def input_defaults(config: Mapping[str, Any], channels: int) -> dict[str, Any]:
        """Image size and input statistics of the weights that ``config`` starts from (none
        for random weights: the data's own)."""
        if not (config.get("pretrained") or config.get("weights")):
            return {}
        cfg = timm_pretrained_cfg(str(config.get("name")))
        defaults = {
            "image_size": list(cfg.input_size[1:]),
            "input_mean": stats_for(cfg.mean, channels),
            "input_std": stats_for(cfg.std, channels),
        }
        return {**defaults, **checkpoint_input(config.get("weights"), channels)}

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(self.normalize_input(x)))  # (B, D)


# -- torchvision ResNet-18 -----------------------------------------------------------------
def _torchvision_weights() -> Any:
    from torchvision.models import ResNet18_Weights

    return ResNet18_Weights.IMAGENET1K_V1


def resnet18_weights_file() -> Path:
    """torchvision's cached ImageNet ResNet-18 file (downloaded by torch.hub when the network
    is allowed), or one ConfigError line saying what to put where."""
    url = _torchvision_weights().url
    file = torch_checkpoints_dir() / Path(url).name
    if file.is_file():
        return file
    found, why = download_url(url, file)
    if found is not None:
        return found
    raise ConfigError(
        f"model.pretrained=true: torchvision's ResNet-18 weights {file.name} are not in "
        f"{file.parent} (TORCH_HOME/hub/checkpoints) and {why}; download {url} into that "
        "folder, or pass model.weights=PATH to a weights file"
    )


class ResNet18Tower(BackboneTower):
    """torchvision's ResNet-18 with its fc replaced by the embedding head.

    ``pretrained`` loads torchvision's ImageNet weights from ``TORCH_HOME``; ``weights`` a
    file. ``small_input`` (null: for images under 96 px) drops the stem's stride and
    max-pool, the usual choice for 28x28 or 32x32 images; with random weights it also uses a
    3x3 stem conv, with pretrained ones it keeps the pretrained 7x7 conv at stride 1.
    ``stem`` (null: ``7x7`` when starting from weights, else ``3x3`` for small input) names
    the first conv, so a checkpoint rebuilds the same network without its weights file.
    ``dropout`` applies to the pooled features before the Linear.
    """

    def __init__(
        self,
        embedding_dim: int = 64,
        small_input: bool | None = None,
        stem: str | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        head_bn: bool = False,
        dropout: float = 0.0,
        freeze_bn: bool = False,
        in_channels: int | None = None,
        image_size: int | Sequence[int] | None = None,
        input_mean: float | Sequence[float] | None = None,
        input_std: float | Sequence[float] | None = None,
    ) -> None:
        super().__init__(embedding_dim, in_channels, image_size, input_mean, input_std)
        from torchvision.models import resnet18

        self.freeze_bn = _flag(freeze_bn, "model.freeze_bn")
        if small_input is None:
            small_input = min(self.image_size) < SMALL_INPUT_BELOW
        small_input = _flag(small_input, "model.small_input")
        state, source = None, ""
        if weights:
            state, source = read_weights(weights), f"model.weights={str(weights)!r}"
        elif _flag(pretrained, "model.pretrained"):
            file = resnet18_weights_file()
            state, source = read_weights(file, "the cached weights"), f"the cached file {file}"
        if stem is None:
            stem = "3x3" if small_input and state is None else "7x7"
        if stem not in STEMS:
            raise ConfigError(f"model.stem={stem!r} is unknown; expected null, 3x3 or 7x7")
        if stem == "3x3" and state is not None:
            raise ConfigError(
                "model.stem=3x3 cannot take pretrained weights (their first conv is 7x7); "
                "leave model.stem null"
            )
        net = resnet18(weights=None)
        stride = 1 if small_input else 2
        if stem == "3x3":
            net.conv1 = nn.Conv2d(self.in_channels, 64, 3, stride, 1, bias=False)
        else:
            net.conv1 = nn.Conv2d(self.in_channels, 64, 7, stride, 3, bias=False)
        if state is not None:
            _load_resnet(net, dict(state), self.in_channels, source)
        if small_input:
            net.maxpool = nn.Identity()
        # The head is net.fc: a checkpoint of the earlier random-init tower (a bare Linear, or
        # Dropout + Linear) keeps its keys.
        net.fc = self._make_head(net.fc.in_features, dropout, head_bn)
        self.net = net
        self.train()  # freeze_bn

    @property
    def backbone(self) -> nn.Module:
        """Everything but the head (a view: the same modules, not a copy)."""
        return nn.ModuleList(m for n, m in self.net.named_children() if n != "fc")

    @staticmethod
    def input_defaults(config: Mapping[str, Any], channels: int) -> dict[str, Any]:
        """ImageNet's statistics and 224 px for torchvision's (or a file's) weights."""
        if not (config.get("pretrained") or config.get("weights")):
            return {}
        preset = _torchvision_weights().transforms()
        defaults = {
            "image_size": [int(preset.crop_size[0])] * 2,
            "input_mean": stats_for(preset.mean, channels),
            "input_std": stats_for(preset.std, channels),
        }
        return {**defaults, **checkpoint_input(config.get("weights"), channels)}

    def forward(self, x: Tensor) -> Tensor:
        return self.net(self.normalize_input(x))  # (B, D)


def _load_resnet(net: nn.Module, state: dict[str, Tensor], channels: int, source: str) -> None:
    """torchvision-format ResNet-18 tensors into ``net`` (its fc dropped, conv1 adapted to
    ``channels`` as timm does), or one line naming the first tensor that does not fit."""
    conv = state.get("conv1.weight")
    if conv is not None and conv.dim() == 4 and conv.shape[1] != channels:
        from timm.models import adapt_input_conv

        state["conv1.weight"] = adapt_input_conv(channels, conv)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    why = weights_mismatch(net, state, ignore=("fc",))
    if why is not None:
        raise ConfigError(
            f"{source} does not fit torchvision's ResNet-18: {why}; pass ResNet-18 weights, or "
            "model=timm model.name=<their architecture>"
        )
    with torch.no_grad():
        net.load_state_dict(state, strict=False)  # fc is the head, trained from scratch


def without_pretrained(tower: Mapping[str, Any]) -> dict[str, Any]:
    """A tower config that builds the same architecture without reading any weights (a
    checkpoint's state dict fills it): ``pretrained`` false and ``weights`` null."""
    tower = dict(tower)
    from_weights = bool(tower.get("pretrained") or tower.get("weights"))
    if "pretrained" in tower:
        tower["pretrained"] = False
    if "weights" in tower:
        tower["weights"] = None
    if from_weights and tower.get("_target_") == "siamese.models.ResNet18Tower":
        tower["stem"] = tower.get("stem") or "7x7"  # the pretrained stem, not a 3x3 one
    return tower


def check_backbone_settings(model_cfg: Mapping[str, Any], resuming: bool = False) -> None:
    """The backbone settings a run can refuse before reading data: ``backbone_lr_mult``, a
    timm ``name``, and (unless ``resuming``: the checkpoint holds the weights) that
    ``weights`` is a file and pretrained weights are in the cache."""
    if "backbone_lr_mult" in model_cfg:
        check_lr_mult(model_cfg["backbone_lr_mult"])
    target = model_cfg.get("_target_")
    if target == "siamese.models.TimmTower":
        check_timm_name(model_cfg.get("name"))
    weights = model_cfg.get("weights")
    if resuming:
        return
    if weights and not Path(str(weights)).expanduser().is_file():
        what = "is a folder" if Path(str(weights)).expanduser().is_dir() else "does not exist"
        raise ConfigError(
            f"model.weights={str(weights)!r} {what}; pass a weights file (.pth, .pt, .bin, "
            ".safetensors or a .ckpt of train.py), or model.weights=null"
        )
    if model_cfg.get("pretrained") is True and not weights:  # found (or fetched) now
        if target == "siamese.models.TimmTower":
            timm_weights_file(str(model_cfg.get("name")))
        elif target == "siamese.models.ResNet18Tower":
            resnet18_weights_file()
