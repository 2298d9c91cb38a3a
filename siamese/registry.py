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

from collections.abc import Iterator
from typing import Any

from siamese.errors import ConfigError

_PL = "pytorch_lightning"

# kind -> the `_target_` names it may take. The names are the ones conf/ writes (a test
# checks that every `_target_` under conf/ is here) plus the torch optimizers and schedulers
# that a config can pick with plain arguments.
REGISTRY: dict[str, set[str]] = {
    "tower": {"siamese.models.ConvTower", "siamese.models.ResNet18Tower"},
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
    "data": {
        "siamese.data.SiameseDataModule",
        "siamese.data.sources.MNISTSubset",
        "siamese.data.sources.TorchvisionMNIST",
        "siamese.data.sources.Omniglot",
        "siamese.data.sources.ImageFolder",
    },
    "augment": {"siamese.data.augment.BatchRandomAffine"},
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
        "siamese.callbacks.DashboardPlots",
        "siamese.callbacks.DivergenceGuard",
        "siamese.callbacks.LastCheckpoint",
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

# What the model's own constructor arguments in a checkpoint must be (SiameseModule).
MODULE_ARGUMENT_KINDS = {
    "tower": "tower",
    "distance": "distance",
    "loss": "loss",
    "optimizer": "optimizer",
    "scheduler": "scheduler",
}


def register(kind: str, target: str) -> None:
    """Let stored configs name ``target`` (``"mypkg.towers.MyTower"``) as a ``kind``: for a
    class of one's own in a checkpoint loaded with ``siamese.load``."""
    if kind not in REGISTRY:
        raise ConfigError(f"unknown registry kind {kind!r}; choose one of: {', '.join(REGISTRY)}")
    if not isinstance(target, str) or not target or "${" in target:
        raise ConfigError(f"register() takes an import path such as 'pkg.Class', got {target!r}")
    REGISTRY[kind].add(target)


def registered(kind: str | None = None) -> frozenset[str]:
    """The names a stored config may use (of one ``kind``, or of any)."""
    if kind is not None:
        return frozenset(REGISTRY[kind])
    return frozenset().union(*REGISTRY.values())


def _walk(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every leaf and ``_target_`` under ``node``."""
    if isinstance(node, dict):
        for key, value in node.items():
            child = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield child, value
            else:
                yield from _walk(value, child)
    elif isinstance(node, list | tuple):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}.{i}" if path else str(i))
    else:
        yield path, node


def check_stored_config(tree: Any, where: str, source: str, kind: str | None = None) -> None:
    """Refuse a stored config that would build or call anything besides the registry.

    Args:
        tree: the stored config (dicts, lists and plain values, as ``torch.load`` gives).
        where: the dotted path of ``tree`` in its file, for the message
            (``hyper_parameters.tower``).
        source: what the file is, for the message (``ckpt_path='evil.ckpt'``).
        kind: the registry kind that ``tree``'s own ``_target_`` must have, or None.
    """
    for path, value in _walk(tree, where):
        if path.endswith("._target_") or path == "_target_":
            top = path == f"{where}._target_"
            allowed = registered(kind if top and kind else None)
            if not isinstance(value, str) or value not in allowed:
                what = f"a {kind}" if top and kind else "one of siamese's own classes"
                raise ConfigError(
                    f"{source} names {path}={value!r}, which is not {what}: siamese builds "
                    "only what its registry holds and refused it before building or running "
                    "anything; pass a checkpoint written by train.py (a class of your own "
                    "loads after siamese.registry.register(kind, 'pkg.Class'))"
                )
        elif isinstance(value, str) and "${" in value:
            raise ConfigError(
                f"{source} holds an interpolation at {path}={value!r}; stored configs are "
                "saved resolved, so siamese refused it before building or running anything; "
                "pass a checkpoint written by train.py"
            )


def check_checkpoint_config(hparams: Any, source: str) -> None:
    """A checkpoint's ``hyper_parameters``, checked whole: the model's own parts against
    their kinds, then everything (the run config under ``config`` too) against the registry."""
    if not isinstance(hparams, dict):
        return
    for name, kind in MODULE_ARGUMENT_KINDS.items():
        part = hparams.get(name)
        if isinstance(part, dict):
            check_stored_config(part, f"hyper_parameters.{name}", source, kind=kind)
    check_stored_config(hparams, "hyper_parameters", source)
