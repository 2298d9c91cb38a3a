"""The registry: every class that a config read from a file may name, by kind.

A checkpoint's hyper-parameters and a resumed run's saved overrides come from files, and a
file can come from a stranger. ``weights_only=True`` keeps pickled code out of a
checkpoint, but the ``_target_`` strings inside it are plain data that Hydra's
``instantiate`` would import and call (``torch.load`` of a pickle, ``builtins.open`` in
write mode). So a stored config is checked here, the whole tree before anything is built:

- every ``_target_`` must be a name this registry holds (an allowlist; Hydra's own
  blocklist only knows the obviously dangerous names);
- no string may hold an interpolation: ``${oc.create:...}`` would make a new node, with a
  ``_target_`` of its own, after the check.

Configs typed on the command line are the user's own and are not limited to this list
(``+callbacks.mine._target_=mypkg.MyCallback`` trains). A class of one's own can be loaded
from a checkpoint after ``register("tower", "mypkg.MyTower")``.
"""

from __future__ import annotations

from typing import Any

from siamese.errors import ConfigError

_PL = "pytorch_lightning"

# kind -> the `_target_` names it may take. The names are the ones conf/ writes (a test
# checks that every `_target_` under conf/ is here) plus the torch optimizers and schedulers
# that a config can pick with plain arguments.
REGISTRY: dict[str, set[str]] = {
    "tower": {
        "siamese.models.ConvTower",
        "siamese.models.ResNet18Tower",
        "siamese.models.TimmTower",
    },
    "distance": {
        "siamese.distances.EuclideanDistance",
        "siamese.distances.CosineSimilarity",
        "siamese.distances.LearnedDistance",
    },
    "loss": {
        "siamese.losses.ContrastiveLoss",
        "siamese.losses.BCELoss",
        "siamese.losses.TripletLoss",
        "siamese.losses.MultiSimilarityLoss",
    },
    "datamodule": {"siamese.data.SiameseDataModule"},
    "source": {
        "siamese.data.sources.MNISTSubset",
        "siamese.data.sources.TorchvisionMNIST",
        "siamese.data.sources.Omniglot",
        "siamese.data.sources.ImageFolder",
    },
    "augment": {"siamese.data.augment.BatchRandomAffine", "siamese.data.augment.BatchPhotoAugment"},
    "optimizer": {
        f"torch.optim.{name}"
        for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "Adamax", "NAdam", "RAdam")
    },
    # Not LambdaLR and its kin: they take a function, which a config cannot hold safely.
    "scheduler": {
        f"torch.optim.lr_scheduler.{name}"
        for name in (
            "OneCycleLR",
            "CosineAnnealingLR",
            "CosineAnnealingWarmRestarts",
            "StepLR",
            "MultiStepLR",
            "ExponentialLR",
            "LinearLR",
            "ConstantLR",
            "PolynomialLR",
            "ReduceLROnPlateau",
        )
    },
    "trainer": {f"{_PL}.Trainer"},
    "callback": {
        "siamese.callbacks.BackboneFreeze",
        "siamese.callbacks.DashboardPlots",
        "siamese.callbacks.DivergenceGuard",
        "siamese.callbacks.StopSignals",
        "siamese.callbacks.Throughput",
        *(
            f"{_PL}.callbacks.{name}"
            for name in (
                "ModelCheckpoint",
                "EarlyStopping",
                "LearningRateMonitor",
                "RichModelSummary",
                "RichProgressBar",
                "ModelSummary",
                "TQDMProgressBar",
                "BackboneFinetuning",
                "StochasticWeightAveraging",
                "GradientAccumulationScheduler",
            )
        ),
    },
    "logger": {
        "siamese.loggers.CSVLogger",
        "siamese.loggers.WandbLogger",
        f"{_PL}.loggers.TensorBoardLogger",
        f"{_PL}.loggers.CSVLogger",
    },
    "profiler": {f"{_PL}.profilers.{n}" for n in ("SimpleProfiler", "AdvancedProfiler")},
    # conf/hydra: Hydra's own callbacks and launchers (never stored in a checkpoint).
    "hydra": {
        "siamese.hydra_callbacks.RunDirGuard",
        "siamese.hydra_callbacks.SweepSummary",
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
    },
}

# Where a stored config may name a class, and the kind it must be: the model's own parts
# (SiameseModule's arguments) and the run config's groups, as conf/ places them. A class
# anywhere else (nested in a tower's arguments, a trainer inside a loss) is refused.
POSITIONS: dict[str, str] = {
    "tower": "tower",
    "distance": "distance",
    "loss": "loss",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
    "config.model": "tower",
    "config.distance": "distance",
    "config.loss": "loss",
    "config.optimizer": "optimizer",
    "config.scheduler": "scheduler",
    "config.data": "datamodule",
    "config.data.source": "source",
    "config.data.augment": "augment",
    "config.trainer": "trainer",
    "config.trainer.profiler": "profiler",
    "config.callbacks.*": "callback",
    "config.logger": "logger",
    "config.logger.*": "logger",
}
# The only Hydra keys a stored config may hold (``_args_``, ``_recursive_`` and the rest
# change how a node is built; conf/ uses none of them).
HYDRA_KEYS = frozenset({"_target_", "_partial_"})
# Deeper than any config siamese writes (a recursion would be a traceback).
MAX_DEPTH = 32


def register(kind: str, target: str) -> None:
    """Let stored configs name ``target`` (``"mypkg.towers.MyTower"``) as a ``kind``: for a
    class of one's own in a checkpoint loaded with ``siamese.load``."""
    if kind not in REGISTRY:
        raise ConfigError(f"unknown registry kind {kind!r}; choose one of: {', '.join(REGISTRY)}")
    if not isinstance(target, str) or not target or "${" in target:
        raise ConfigError(f"register() takes an import path such as 'pkg.Class', got {target!r}")
    REGISTRY[kind].add(target)


# Names that stored configs of earlier checkpoints hold for classes that no longer exist.
# A checkpoint's callbacks are never built (train.py takes them from conf/), so these only let
# such a checkpoint load (evaluate.py, export.py, siamese.load); nothing imports them.
RETIRED = {
    # last.ckpt's writer until it became two ModelCheckpoint entries (2026-12-03).
    "callback": {"siamese.callbacks.LastCheckpoint"},
}


def registered(kind: str | None = None) -> frozenset[str]:
    """The names a stored config may use (of one ``kind``, or of any)."""
    if kind is not None:
        return frozenset(REGISTRY[kind])
    return frozenset().union(*REGISTRY.values())


def tower_class(config: Any) -> type | None:
    """The class a tower config names when the registry holds it (imported then), else None."""
    target = config.get("_target_") if hasattr(config, "get") else None
    if not isinstance(target, str) or target not in REGISTRY["tower"]:
        return None
    from hydra.utils import get_class

    return get_class(target)


def position_kind(path: str) -> str | None:
    """The kind a ``_target_`` at ``path`` (dotted, under hyper_parameters) must have, or
    None where siamese builds nothing."""
    if path in POSITIONS:
        return POSITIONS[path]
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    return POSITIONS.get(f"{parent}.*")


def check_checkpoint_config(hparams: Any, source: str) -> None:
    """Refuse a checkpoint's ``hyper_parameters`` that would build or call anything besides
    the registry: the whole tree is checked before anything is built.

    Every ``_target_`` must sit where siamese builds something (``POSITIONS``) and name a
    class of that kind; no other ``_..._`` key of Hydra's; no string holding an
    interpolation (``${oc.create:...}`` would make a node, with a ``_target_`` of its own,
    after this check); nothing nested deeper than any config siamese writes.

    Args:
        hparams: the stored hyper-parameters (dicts, lists and plain values).
        source: what the file is, for the message (``ckpt_path='evil.ckpt'``).
    """

    def refuse(what: str) -> ConfigError:
        return ConfigError(
            f"{source} {what}: siamese builds only what its registry holds and refused it "
            "before building or running anything; pass a checkpoint written by train.py (a "
            "class of your own loads after siamese.registry.register(kind, 'pkg.Class'))"
        )

    stack: list[tuple[Any, str, int]] = [(hparams, "", 0)]
    while stack:  # iterative: a crafted nesting cannot overflow the interpreter's stack
        node, path, depth = stack.pop()
        shown = f"hyper_parameters.{path}" if path else "hyper_parameters"
        if depth > MAX_DEPTH:
            raise refuse(f"nests its config more than {MAX_DEPTH} levels deep at {shown}")
        if isinstance(node, dict):
            children: list[tuple[Any, str, int]] = []
            for key, value in node.items():
                child = f"{path}.{key}" if path else str(key)
                if not isinstance(key, str) or "." in key:
                    # A dotted key would spoof a path (POSITIONS are dotted paths).
                    raise refuse(f"has a key {key!r} that is not a name at {shown}")
                if key.startswith("_") and key.endswith("_") and key not in HYDRA_KEYS:
                    raise refuse(f"sets Hydra's {key} at {shown}")
                if key != "_target_":
                    children.append((value, child, depth + 1))
                    continue
                kind = position_kind(path)
                if kind is None:
                    raise refuse(f"names {shown}._target_={value!r} where siamese builds nothing")
                if not isinstance(value, str) or (
                    value not in REGISTRY[kind] and value not in RETIRED.get(kind, ())
                ):
                    raise refuse(
                        f"names {shown}._target_={value!r}, which is not among the registry's "
                        f"{kind} classes"
                    )
            stack.extend(reversed(children))  # the first key is looked at first
        elif isinstance(node, list | tuple):
            stack.extend((v, f"{path}.{i}", depth + 1) for i, v in reversed(list(enumerate(node))))
        elif isinstance(node, str) and "${" in node:
            raise refuse(f"holds an interpolation at {shown}={node!r}")
