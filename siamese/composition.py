"""Hydra's Compose API for the command line: a composed config, a group's options, its keys."""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, ListConfig, OmegaConf

import siamese.schemas  # noqa: F401  (the schemas the group files name)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _fresh() -> None:
    """Compose on our own: hydra.main leaves its GlobalHydra behind when it fails."""
    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()


@functools.cache
def composed(
    config_name: str, overrides: tuple[str, ...] = (), conf_dir: Path = CONF_DIR
) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, as Hydra composes it (with its
    ``hydra`` node); Hydra's own exception when it refuses them. Cached: read it, never
    change it."""
    _fresh()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)


@functools.cache
def group_options(group: str, conf_dir: Path = CONF_DIR) -> list[str] | None:
    """The options of a config group (``model``, ``data/augment``), or None when ``group``
    is not one."""
    _fresh()
    with initialize_config_dir(version_base="1.3", config_dir=str(conf_dir)):
        loader = GlobalHydra.instance().config_loader()
        if group.startswith("schema") or not loader.repository.group_exists(group):
            return None
        return sorted(loader.get_group_options(group))


def flat_keys(node: Any, prefix: str = "") -> Iterator[str]:
    """Every dotted key under ``node`` (list items by index), without resolving anything."""
    if isinstance(node, DictConfig):
        names = list(node.keys())
    elif isinstance(node, ListConfig):
        names = list(range(len(node)))
    else:
        return
    for name in names:
        key = f"{prefix}.{name}" if prefix else str(name)
        if key == "hydra":
            continue
        yield key
        child = node._get_node(name)
        if isinstance(child, DictConfig | ListConfig) and not child._is_none():
            yield from flat_keys(child, key)


def config_keys(config_name: str, overrides: Sequence[str] = ()) -> frozenset[str]:
    """The dotted keys of the config ``overrides`` compose (the default one when Hydra
    refuses them)."""
    try:
        cfg = composed(config_name, tuple(overrides))
    except Exception:  # any refusal: what the defaults have still helps
        cfg = composed(config_name)
    return frozenset(flat_keys(cfg))


def choices(cfg: DictConfig) -> dict[str, str]:
    """``group -> option`` of a config composed with its hydra node (``data/augment``
    included; Hydra's own groups and the schemas left out)."""
    picked = OmegaConf.to_container(cfg.hydra.runtime.choices)
    return {
        g: str(o)
        for g, o in picked.items()
        if o is not None and not g.startswith(("hydra/", "schema/"))
    }


def group_set_as_value(overrides: Sequence[str], conf_dir: Path = CONF_DIR) -> str | None:
    """The line for ``data.augment=photo``: a nested group's option written as a key's value
    would set that key to the text 'photo' (and fail later, at instantiation); the option is
    chosen with ``data/augment=photo``. None when no override does that."""
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep or key.startswith(("+", "~")) or "." not in key:
            continue
        group = key.replace(".", "/")
        if (conf_dir / group / f"{value}.yaml").is_file():
            return (
                f"{key}={value} would set the key to the text {value!r}; choose the option "
                f"with {group}={value}"
            )
    return None


def given(cfg: DictConfig, key: str) -> str | None:
    """A path setting as given on the command line: None when missing or empty."""
    value = None if OmegaConf.is_missing(cfg, key) else cfg.get(key)
    return None if value is None or not str(value).strip() else str(value)
