"""Pretrained weights read as data: a library cache's file or ``model.weights=PATH`` -> tensors.

Weights come only from the libraries' own caches, at the path their download code writes
(timm: the Hugging Face hub cache under ``HF_HOME``; torchvision: ``TORCH_HOME/hub/
checkpoints``), from a download by that same code when the network is allowed, or from a
file the user names. ``HF_HUB_OFFLINE=1`` forbids every download (tests set it). A file is
read as tensors only (``weights_only`` / safetensors): it cannot name code.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from siamese.errors import ConfigError

WEIGHT_SUFFIXES = ".pth, .pt, .bin, .safetensors or a .ckpt of train.py"
# Containers other programs wrap a state dict in (Lightning, timm's train script, DDP, EMA).
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "state_dict_ema")
# A checkpoint of this project: the backbone's tensors sit under these prefixes (TimmTower's
# backbone; ResNet18Tower's torchvision network, whose fc is the embedding head).
PROJECT_PREFIXES = ("tower.backbone.", "tower.net.")
TRUE = {"1", "true", "yes", "on"}


def offline() -> bool:
    """True when downloads are forbidden (``HF_HUB_OFFLINE=1``, read at each call)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in TRUE


def hf_cache_dir() -> Path:
    """Where huggingface_hub keeps downloads now (``HF_HUB_CACHE``, else ``HF_HOME/hub``).

    Read at each call: huggingface_hub reads it once, at import."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def torch_checkpoints_dir() -> Path:
    """Where torch.hub (and torchvision's weights) keep downloads: TORCH_HOME/hub/checkpoints."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, cut at ``limit`` characters."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__


def read_weights(path: str | os.PathLike[str], key: str = "model.weights") -> dict[str, Tensor]:
    """The tensors of a weights file, or one ConfigError line naming ``key``, the file and why.

    Takes a plain state dict (torch or safetensors), one wrapped by another program
    (``state_dict``, ``model``, ...; a ``module.`` prefix from DDP is dropped), or a
    checkpoint of train.py, whose backbone tensors it returns (a timm ResNet's and
    torchvision's have the same names, so either tower takes the other's)."""
    file = Path(path).expanduser()
    shown = f"{key}={str(path)!r}"
    if not file.is_file():
        what = "is a folder" if file.is_dir() else "does not exist"
        raise ConfigError(f"{shown} {what}; pass a weights file ({WEIGHT_SUFFIXES})")
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            data: Any = load_file(str(file), device="cpu")
        except Exception as exc:  # safetensors raises its own error types for a bad header
            raise ConfigError(
                f"{shown} is not a safetensors weights file ({one_line(exc)}); pass a weights "
                f"file ({WEIGHT_SUFFIXES})"
            ) from None
    else:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle, zip and torch errors: all mean "not weights"
            raise ConfigError(
                f"{shown} is not a weights file torch reads as plain tensors "
                f"({one_line(exc)}); pass a weights file ({WEIGHT_SUFFIXES})"
            ) from None
    state = _unwrap(data, shown)
    if not state:
        raise ConfigError(f"{shown} holds no tensors; pass a weights file ({WEIGHT_SUFFIXES})")
    return state


def _unwrap(data: Any, shown: str) -> dict[str, Tensor]:
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{shown} holds a {type(data).__name__}, not a dict of tensors; pass a weights "
            f"file ({WEIGHT_SUFFIXES})"
        )
    if isinstance(data.get("hyper_parameters"), Mapping) and isinstance(
        data.get("state_dict"), Mapping
    ):  # a checkpoint of train.py: its backbone
        state = {
            k[len(prefix) :]: v
            for prefix in PROJECT_PREFIXES
            for k, v in data["state_dict"].items()
            if isinstance(k, str) and k.startswith(prefix) and not k.startswith(f"{prefix}fc.")
        }
        if not state:
            tower = data["hyper_parameters"].get("tower")
            target = tower.get("_target_") if isinstance(tower, Mapping) else None
            raise ConfigError(
                f"{shown} is a checkpoint of train.py whose model ({target}) has no "
                "pretrained-style backbone; pass a checkpoint of model=timm or model=resnet18, "
                "or a weights file"
            )
        return state
    for key in WRAPPER_KEYS:
        inner = data.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(k, str) for k in inner):
            data = inner
            break
    state: dict[str, Tensor] = {}
    for k, v in data.items():
        if not isinstance(v, Tensor):
            raise ConfigError(
                f"{shown} is not a state dict: its entry {str(k)!r} holds a {type(v).__name__}, "
                f"not a tensor; pass a weights file ({WEIGHT_SUFFIXES})"
            )
        state[str(k)] = v
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP wrapper
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _shape(t: Tensor) -> str:
    return "x".join(str(n) for n in t.shape) or "scalar"


def weights_mismatch(
    net: nn.Module, state: Mapping[str, Tensor], ignore: Iterable[str] = ()
) -> str | None:
    """The first tensor of ``net`` that ``state`` lacks or holds in another shape (then the
    first one ``state`` has and ``net`` lacks), in words with the count; None when they fit.

    Keys under any prefix in ``ignore`` (the classifier a backbone drops) do not count, nor
    BatchNorm's ``num_batches_tracked`` counters, which older files lack."""
    prefixes = tuple(f"{p}." for p in ignore)
    own = {
        k: v
        for k, v in net.state_dict().items()
        if not k.endswith("num_batches_tracked") and not k.startswith(prefixes)
    }
    theirs = {
        k: v
        for k, v in state.items()
        if not k.endswith("num_batches_tracked") and not k.startswith(prefixes)
    }
    missing = [k for k in own if k not in theirs]
    resized = [k for k in own if k in theirs and theirs[k].shape != own[k].shape]
    extra = [k for k in theirs if k not in own]
    count = len(missing) + len(resized) + len(extra)
    if not count:
        return None
    first = next(k for k in own if k in missing or k in resized) if missing or resized else None
    if first in resized:
        what = (
            f"{first} is {_shape(theirs[first])} in the file and {_shape(own[first])} in the model"
        )
    elif first is not None:
        what = f"{first} ({_shape(own[first])}) is not in the file"
    else:
        what = f"the file has {extra[0]} ({_shape(theirs[extra[0]])}), which the model lacks"
    return f"{what}; {count} tensor{'s differ' if count > 1 else ' differs'}"


PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def unreachable(url: str) -> str | None:
    """Why ``url``'s host cannot be reached (no network), in words, or None. One connect
    with a 5 s limit: huggingface_hub would otherwise retry for over a minute. Behind a
    proxy the download itself is the test."""
    if any(os.environ.get(k) for k in PROXY_ENV):
        return None
    parsed = urlparse(url)
    host = parsed.hostname or url
    try:
        socket.create_connection((host, parsed.port or 443), timeout=5).close()
    except OSError as exc:
        return f"there is no network ({host}: {exc.strerror or exc})"
    return None


def download_hf(repo_id: str, filenames: Iterable[str]) -> tuple[Path | None, str]:
    """The first of ``filenames`` that huggingface_hub downloads into its cache, or (None,
    why not)."""
    if offline():
        return None, "HF_HUB_OFFLINE=1 forbids downloads"
    why = unreachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    if why is not None:
        return None, why
    from huggingface_hub import hf_hub_download

    reason = "no such file in the repository"
    for name in filenames:
        try:
            return Path(hf_hub_download(repo_id, name, cache_dir=hf_cache_dir())), ""
        except Exception as exc:  # network, missing file, auth: the one line says which
            reason = f"the download failed: {one_line(exc)[:120]}"
    return None, reason


def download_url(url: str, file: Path) -> tuple[Path | None, str]:
    """``url`` downloaded to ``file`` by torch.hub (torchvision's own download), or (None, why)."""
    if offline():
        return None, "HF_HUB_OFFLINE=1 forbids downloads"
    why = unreachable(url)
    if why is not None:
        return None, why
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url, str(file), progress=False)
    except Exception as exc:  # network or disk
        return None, f"the download failed: {one_line(exc)[:120]}"
    return file, ""
