"""Typed schemas of conf/: dataclasses in Hydra's ConfigStore that each group file extends.

Each option file names its schema first in its defaults list (``/schema/model/conv_tower@_here_``)
and the main configs theirs (``train_schema``), so Hydra itself refuses a key no schema has and a
value of the wrong type (``optimizer.lr=abc``). A key that takes more than one kind of value
(``trainer.devices``: 2 or auto; an image size: 28 or [28, 28]) is ``Any``: its owner checks it.
No torch here: the schemas are registered on ``import siamese``, before any typo is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

# OmegaConf reads the annotations at runtime: Optional[...] (not "X | None") is what it knows.
# ruff: noqa: UP045


@dataclass
class TrainerConf:
    _target_: str = "pytorch_lightning.Trainer"
    default_root_dir: Optional[str] = None
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_epochs: Optional[int] = None
    max_steps: int = -1
    check_val_every_n_epoch: Optional[int] = 1
    log_every_n_steps: Optional[int] = None
    num_sanity_val_steps: Optional[int] = None
    deterministic: Any = False  # also "warn"
    gradient_clip_val: Optional[float] = None
    detect_anomaly: bool = False
    enable_model_summary: bool = True
    enable_progress_bar: bool = True
    limit_train_batches: Any = None  # a number of batches, or a fraction
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    use_distributed_sampler: bool = False
    # Set by trainer=ddp, debug=overfit and debug=profile (Lightning's defaults otherwise).
    sync_batchnorm: bool = False
    overfit_batches: Any = 0.0
    profiler: Any = None


@dataclass
class _TowerConf:
    _target_: str = ""
    embedding_dim: int = 64
    dropout: float = 0.0
    in_channels: Optional[int] = None
    image_size: Any = None  # 28 or [H, W]
    input_mean: Any = None
    input_std: Any = None
    channels_last: bool = False
    compile: Any = False  # also torch.compile's options ({mode: max-autotune})


@dataclass
class ConvTowerConf(_TowerConf):
    layers: list[Any] = field(default_factory=list)
    hidden_dims: list[int] = field(default_factory=list)
    activation: str = "relu"
    output_activation: Optional[str] = None


@dataclass
class _PretrainedConf(_TowerConf):
    pretrained: bool = False
    weights: Optional[str] = None
    head_bn: bool = False
    freeze_bn: bool = False
    backbone_lr_mult: float = 1.0


@dataclass
class ResNet18Conf(_PretrainedConf):
    small_input: Optional[bool] = None
    stem: Optional[str] = None


@dataclass
class TimmConf(_PretrainedConf):
    name: str = "resnet18"


@dataclass
class DataModuleConf:
    _target_: str = "siamese.data.SiameseDataModule"
    source: Any = None  # each source kind has keys of its own
    augment: Any = None  # the data/augment group
    root: Optional[str] = None
    batch_size: int = 160
    samples_per_class: int = 16
    pair_mode: str = "in_batch"
    pairs_per_epoch: Optional[int] = None
    eval_batch_size: int = 1000
    num_workers: int = 0
    pin_memory: bool = False
    image_size: Any = None  # 28 or [H, W]
    skip_bad_files: bool = False
    bad_files: Optional[str] = None
    seed: Optional[int] = None
    reshuffle: bool = True
    on_device: Any = "auto"  # auto, true or false


@dataclass
class AffineConf:
    _target_: str = "siamese.data.augment.BatchRandomAffine"
    degrees: float = 10.0
    translate: float = 0.1
    scale: list[float] = field(default_factory=lambda: [0.9, 1.1])
    shear: float = 5.0
    hflip: float = 0.0
    p: float = 1.0
    padding_mode: str = "zeros"
    elastic_alpha: float = 0.0
    elastic_sigma: float = 4.0


@dataclass
class PhotoConf:
    _target_: str = "siamese.data.augment.BatchPhotoAugment"
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    ratio: list[float] = field(default_factory=lambda: [0.75, 4 / 3])
    hflip: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    p_jitter: float = 0.8
    size: Any = None  # None, 224 or [H, W]


@dataclass
class EuclideanConf:
    _target_: str = "siamese.distances.EuclideanDistance"
    normalize_embeddings: bool = True


@dataclass
class CosineConf:
    _target_: str = "siamese.distances.CosineSimilarity"


@dataclass
class LearnedConf:
    _target_: str = "siamese.distances.LearnedDistance"
    embedding_dim: int = 64
    normalize_embeddings: bool = False


@dataclass
class ContrastiveConf:
    _target_: str = "siamese.losses.ContrastiveLoss"
    margin: float = 1.0
    pos_margin: float = 0.0
    reduction: str = "mean"


@dataclass
class MultiSimilarityConf:
    _target_: str = "siamese.losses.MultiSimilarityLoss"
    alpha: float = 2.0
    beta: float = 50.0
    base: float = 0.5
    epsilon: float = 0.1


@dataclass
class TripletConf:
    _target_: str = "siamese.losses.TripletLoss"
    margin: float = 0.2
    mining: str = "batch_hard"


@dataclass
class BCEConf:
    _target_: str = "siamese.losses.BCELoss"


@dataclass
class AdamWConf:
    _target_: str = "torch.optim.AdamW"
    _partial_: bool = True
    lr: float = 0.01
    weight_decay: float = 0.0


@dataclass
class SGDConf:
    _target_: str = "torch.optim.SGD"
    _partial_: bool = True
    lr: float = 0.05
    momentum: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0


@dataclass
class CosineAnnealingConf:
    _target_: str = "torch.optim.lr_scheduler.CosineAnnealingLR"
    _partial_: bool = True
    eta_min: float = 0.0


@dataclass
class OneCycleConf:
    _target_: str = "torch.optim.lr_scheduler.OneCycleLR"
    _partial_: bool = True
    max_lr: float = 0.01
    pct_start: float = 0.3


@dataclass
class CSVLoggerConf:
    _target_: str = "siamese.loggers.CSVLogger"
    save_dir: str = "."
    name: Optional[str] = None
    version: Any = ""


@dataclass
class TensorBoardConf(CSVLoggerConf):
    _target_: str = "pytorch_lightning.loggers.TensorBoardLogger"
    default_hp_metric: bool = False


@dataclass
class WandbConf:
    _target_: str = "siamese.loggers.WandbLogger"
    project: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    name: Optional[str] = None
    offline: bool = False
    log_model: Any = False  # also "all"
    save_dir: str = "."


@dataclass
class FlatIndexConf:
    kind: str = "flat"


@dataclass
class IVFIndexConf:
    kind: str = "ivf"
    nlist: Optional[int] = None
    nprobe: Optional[int] = None


@dataclass
class HNSWIndexConf:
    kind: str = "hnsw"
    hnsw_m: int = 32
    ef_construction: Optional[int] = None
    ef_search: Optional[int] = None


@dataclass
class ResumeConf:
    trust_overrides: bool = False


@dataclass
class TrainConf:
    task_name: str = "train"
    seed: Optional[int] = None
    ckpt_path: Optional[str] = None
    resume: ResumeConf = field(default_factory=ResumeConf)
    checkpoints: Any = None
    test: bool = True
    eval_pairs: int = 50000
    eval_seed: int = 0
    oneshot_within: Optional[str] = None
    optimized_metric: Optional[str] = None
    # The groups: each option's file brings its own schema.
    data: Any = None
    model: Any = None
    distance: Any = None
    loss: Any = None
    optimizer: Any = None
    scheduler: Any = None
    trainer: Any = None
    logger: Any = None
    callbacks: Any = None
    paths: Any = None


@dataclass
class OneShotConf:
    ways: list[int] = field(default_factory=lambda: [5, 20])
    shot: int = 1
    episodes: int = 1000
    seed: int = 0
    within: Optional[str] = None


@dataclass
class EvalConf:
    split: str = "test"
    gallery: str = "test"
    k: int = 10
    rank_by: str = "index"
    batch_size: int = 1024
    device: str = "auto"
    pairs: int = 50000
    pairs_seed: int = 0
    target_far: Optional[float] = None
    oneshot: OneShotConf = field(default_factory=OneShotConf)
    from_run: Optional[str] = None
    save_embeddings: bool = True
    save_index: bool = True
    plots: bool = True
    projection: str = "pca"
    projection_points: int = 5000
    grid_queries: int = 8


@dataclass
class EvaluateConf:
    task_name: str = "evaluate"
    ckpt_path: Optional[str] = None
    seed: Optional[int] = None
    eval: EvalConf = field(default_factory=EvalConf)
    data: Any = None
    index: Any = None
    paths: Any = None


@dataclass
class ExportSettingsConf:
    opset: int = 18
    check: bool = True
    check_batch: int = 7


@dataclass
class ExportConf:
    task_name: str = "export"
    ckpt_path: Optional[str] = None
    format: str = "onnx"
    export: ExportSettingsConf = field(default_factory=ExportSettingsConf)
    paths: Any = None


@dataclass
class IndexJobConf:
    task_name: str = "index"
    ckpt_path: Optional[str] = None
    gallery: Optional[str] = None
    mode: str = "build"
    gallery_dir: Optional[str] = None
    batch_size: int = 256
    num_workers: int = 2
    device: str = "auto"
    index: Any = None
    paths: Any = None


@dataclass
class IdentifyConf:
    enabled: bool = False  # identify=true on the command line (search.py rewrites it)
    by: str = "nearest"
    k: int = 5


@dataclass
class SearchJobConf:
    task_name: str = "search"
    gallery_dir: Optional[str] = None
    query: Optional[str] = None
    k: int = 5
    ckpt_path: Optional[str] = None
    threshold: Optional[float] = None
    identify: IdentifyConf = field(default_factory=IdentifyConf)
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    printed_queries: int = 10
    plot_queries: int = 16
    paths: Any = None


@dataclass
class ServeIdentifyConf:
    by: str = "nearest"
    k: int = 5


@dataclass
class ServeBatchConf:
    max_size: int = 32
    max_wait_ms: float = 1.0


@dataclass
class ServeSettingsConf:
    api_key: Optional[str] = None
    max_upload_mb: float = 10.0
    max_image_pixels: int = 40_000_000
    k: int = 5
    max_k: int = 100
    batch: ServeBatchConf = field(default_factory=ServeBatchConf)
    thumbnail_size: int = 128
    thumbnail_cache: int = 1024
    log_level: str = "info"
    access_log: bool = True
    max_connections: Optional[int] = 100


@dataclass
class ServeJobConf:
    task_name: str = "serve"
    gallery_dir: Optional[str] = None
    ckpt_path: Optional[str] = None
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"
    threshold: Optional[float] = None
    identify: ServeIdentifyConf = field(default_factory=ServeIdentifyConf)
    serve: ServeSettingsConf = field(default_factory=ServeSettingsConf)
    paths: Any = None


# group -> {name: schema}; a file of conf/<group>/ names /schema/<group>/<name>@_here_.
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "trainer": {"trainer": TrainerConf},
    "model": {"conv_tower": ConvTowerConf, "resnet18": ResNet18Conf, "timm": TimmConf},
    "data": {"datamodule": DataModuleConf},
    "data/augment": {"affine": AffineConf, "photo": PhotoConf},
    "distance": {"euclidean": EuclideanConf, "cosine": CosineConf, "learned": LearnedConf},
    "loss": {
        "contrastive": ContrastiveConf,
        "multi_similarity": MultiSimilarityConf,
        "triplet": TripletConf,
        "bce": BCEConf,
    },
    "optimizer": {"adamw": AdamWConf, "sgd": SGDConf},
    "scheduler": {"cosine": CosineAnnealingConf, "onecycle": OneCycleConf},
    "logger": {"csv": CSVLoggerConf, "tensorboard": TensorBoardConf, "wandb": WandbConf},
    "index": {"flat": FlatIndexConf, "ivf": IVFIndexConf, "hnsw": HNSWIndexConf},
}
# The main configs: conf/<name>.yaml names <name>_schema first in its defaults list.
MAIN_SCHEMAS: dict[str, type] = {
    "train": TrainConf,
    "evaluate": EvaluateConf,
    "export": ExportConf,
    "index": IndexJobConf,
    "search": SearchJobConf,
    "serve": ServeJobConf,
}


def register(store: ConfigStore | None = None) -> None:
    """Put every schema into Hydra's ConfigStore (idempotent: a second call replaces them)."""
    store = store or ConfigStore.instance()
    for name, node in MAIN_SCHEMAS.items():
        store.store(name=f"{name}_schema", node=node)
    for group, schemas in GROUP_SCHEMAS.items():
        for name, node in schemas.items():
            store.store(group=f"schema/{group}", name=name, node=node)


register()
