"""experiment= and debug= presets: each composes and trains on tiny data in its own format."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from helpers import CONF, compose_train, make_mnist_family, make_omniglot_set
from omegaconf import DictConfig

from siamese.config import build
from siamese.data.pairs import PairBatchSampler
from siamese.data.samplers import ClassBalancedBatchSampler
from siamese.errors import ConfigError
from siamese.evaluation import oneshot_metrics
from siamese.models import ConvTower
from siamese.pipelines.train import build_module, run_training, split_model_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


DEBUGS = sorted(p.stem for p in (CONF / "debug").glob("*.yaml"))


# Every run on one CPU device; few verification pairs, so tiny splits score at once. No
# dashboard pictures: they were most of each run's time, and tests/unit/callbacks/test_plots.py
# checks them.
CPU = [
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.enable_progress_bar=false",
    "eval_pairs=200",
    "data.num_workers=0",
    "~callbacks.plots",
]


# Not a key of conf/trainer: added for these runs only.
FAST_DEV_RUN = "+trainer.fast_dev_run=true"


MNIST_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "kmnist": "KMNIST"}


# 20 test characters of two images in one alphabet: enough for the 20-way one-shot metric
# within an alphabet (omniglot_koch's oneshot_within=alphabet).
BACKGROUND = {"Alpha": [3] * 4, "Beta": [3] * 4}


EVALUATION = {"Gamma": [2] * 20, "Delta": [2] * 5}


def tiny_data(cfg: DictConfig, root: Path) -> list[str]:
    """Write tiny files for the preset's source under ``root``; return overrides that use them.

    The batch settings are overridden too: a preset's batches are sized for the full set.
    """
    target = cfg.data.source._target_
    common = [f"data.root={root}", "data.source.download=false"]
    if target.endswith("TorchvisionMNIST"):
        make_mnist_family(root, MNIST_FOLDERS[cfg.data.source.name], per_class=8, n_test=20)
        # 80 train digits, 20 held out: 60 left, three class-balanced batches of 10 x 2.
        return [
            *common,
            "data.source.val_size=20",
            "data.batch_size=20",
            "data.samples_per_class=2",
        ]
    if target.endswith("Omniglot"):
        make_omniglot_set(root, "images_background", BACKGROUND, size=105)
        make_omniglot_set(root, "images_evaluation", EVALUATION, size=105)
        return [
            *common,
            "data.source.val_classes=2",
            "data.batch_size=8",
            "data.samples_per_class=2",
            "data.pairs_per_epoch=16",
            "data.eval_batch_size=64",
        ]
    raise AssertionError(f"no tiny data for {target}: add it to tiny_data")


def compose_preset(overrides: list[str], tmp_path: Path) -> DictConfig:
    """A preset on tiny data in its own format (the embedded digits need no files)."""
    cfg = compose_train(overrides, tmp_path / "run")
    if cfg.data.source._target_.endswith("MNISTSubset"):
        return cfg
    return compose_train([*overrides, *tiny_data(cfg, tmp_path / "data")], tmp_path / "run")


def check_test_metrics(metrics: dict[str, float]) -> None:
    for key in ("test/precision_at_1", "test/roc_auc"):
        assert math.isfinite(metrics[key]), key


# -- every preset composes and trains -------------------------------------------------------
def test_every_preset_is_found():
    assert EXPERIMENTS == [
        "fashion_mnist_triplet",
        "mnist_contrastive",
        "mnist_triplet",
        "omniglot_koch",
        "photos_finetune",
    ]
    assert DEBUGS == ["fast", "overfit", "profile"]


@pytest.mark.parametrize(
    "name",
    # Only fashion_mnist_triplet in the default suite (under 5 minutes): omniglot_koch's
    # tower and 105x105 images take ~6 s, the digit ones ~2 s each; all run with -m slow.
    # photos_finetune needs a pretrained weights file: tests/unit/models/test_backbones.py
    # writes one.
    [
        n if n == "fashion_mnist_triplet" else pytest.param(n, marks=pytest.mark.slow)
        for n in EXPERIMENTS
        if n != "photos_finetune"
    ],
)
def test_experiment_runs_fast_dev_run(name, tmp_path):
    cfg = compose_preset([f"experiment={name}", *CPU, FAST_DEV_RUN], tmp_path)
    metrics = run_training(cfg)
    check_test_metrics(metrics)
    if name == "omniglot_koch":  # the paper's figure: 20-way one-shot on unseen alphabets
        assert 0.0 <= metrics["test/oneshot_20way_1shot"] <= 1.0
        report = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
        assert report["oneshot_within"] == "alphabet"


def test_omniglot_koch_draws_one_shot_episodes_within_an_alphabet(tmp_path):
    cfg = compose_preset(["experiment=omniglot_koch", *CPU], tmp_path)
    datamodule = build(cfg.data)
    module = build_module(cfg, datamodule)
    test = datamodule.load_splits().test
    # One class list for all splits: background Alpha, Beta, then evaluation Delta, Gamma
    # (folders in sorted order), numbered by alphabet name in sorted order.
    assert module.oneshot_groups.tolist() == [0] * 4 + [1] * 4 + [2] * 5 + [3] * 20
    assert test.classes[8].startswith("Delta/") and test.classes[13].startswith("Gamma/")
    labels = test.targets
    emb = torch.randn(len(labels), 8, generator=torch.Generator().manual_seed(0))
    module.distance = build({"_target_": "siamese.distances.EuclideanDistance"})
    module._outputs.append((emb, labels, None))  # a test epoch's embeddings
    metrics = module._epoch_metrics("test")
    want = oneshot_metrics(
        emb.numpy(),
        labels.numpy(),
        ways=(5, 20),
        episodes=1000,
        seed=cfg.eval_seed,
        groups=module.oneshot_groups[labels.numpy()],
    )
    assert metrics["oneshot_5way_1shot"] == want["oneshot_5way_1shot"]
    assert metrics["oneshot_20way_1shot"] == want["oneshot_20way_1shot"]
    # Across the split the same episodes would differ (different classes drawn).
    across = oneshot_metrics(emb.numpy(), labels.numpy(), ways=(5,), episodes=1000)
    assert across["oneshot_5way_1shot"] != want["oneshot_5way_1shot"]


def test_one_shot_within_alphabet_on_data_without_alphabets_is_one_line(tmp_path):
    cfg = compose_train(["oneshot_within=alphabet", *CPU], tmp_path / "run")
    with pytest.raises(
        ConfigError,
        match=r"^oneshot_within=alphabet needs .* 10 of the 10 .*"
        r"use oneshot_within=null for this data$",
    ):
        build_module(cfg, build(cfg.data))


# debug=fast runs in full below (test_debug_fast_trains_five_batches_and_tests).
@pytest.mark.parametrize(
    "name",  # profile (~2 s) with -m slow: the default suite stays under 5 minutes
    [
        pytest.param(d, marks=pytest.mark.slow) if d == "profile" else d
        for d in DEBUGS
        if d != "fast"
    ],
)
def test_debug_preset_runs_fast_dev_run(name, tmp_path):
    cfg = compose_train([f"debug={name}", *CPU, FAST_DEV_RUN], tmp_path / "run")
    assert cfg.task_name == "debug"  # runs land in outputs/debug/, not among real runs
    run_training(cfg)
    if name == "profile":  # SimpleProfiler's report, in the run directory
        report = Path(cfg.paths.output_dir) / "fit-profile.txt"
        assert report.is_file(), sorted(p.name for p in report.parent.iterdir())
        text = report.read_text()
        assert "run_training_epoch" in text and "training_step" in text


def test_debug_preset_applies_over_an_experiment(tmp_path):
    """A debug preset applies on top of an experiment (the order in train.yaml)."""
    cfg = compose_train(["experiment=omniglot_koch", "debug=overfit"], tmp_path)
    assert cfg.trainer.overfit_batches == 1 and cfg.trainer.limit_test_batches == 2
    assert cfg.data.reshuffle is False and cfg.data.pair_mode == "explicit"
    assert cfg.model.embedding_dim == 4096


# -- what each preset sets ------------------------------------------------------------------
def test_experiments_pick_their_data_loss_and_distance(tmp_path):
    expected = {
        "mnist_contrastive": ("mnist", "ContrastiveLoss", "EuclideanDistance"),
        "mnist_triplet": ("mnist", "TripletLoss", "EuclideanDistance"),
        "fashion_mnist_triplet": ("fashion_mnist", "TripletLoss", "EuclideanDistance"),
    }
    for name, (data, loss, distance) in expected.items():
        cfg = compose_train([f"experiment={name}"], tmp_path)
        assert cfg.data.source.name == data
        assert cfg.loss._target_.endswith(loss) and cfg.distance._target_.endswith(distance)
        assert cfg.data.pair_mode == "in_batch" and cfg.trainer.max_epochs == 20
    koch = compose_train(["experiment=omniglot_koch"], tmp_path)
    assert koch.data.source._target_.endswith("Omniglot") and koch.data.image_size == 105
    assert koch.data.pair_mode == "explicit" and koch.data.batch_size == 128
    assert koch.loss._target_.endswith("BCELoss")
    assert koch.distance._target_.endswith("LearnedDistance")
    assert koch.distance.embedding_dim == 4096
    assert koch.optimizer._target_ == "torch.optim.SGD"


def test_koch_tower_is_the_papers():
    """64@10x10, 128@7x7, 128@4x4, 256@4x4 -> 256x6x6 at 105x105 -> 4096 sigmoid units."""
    cfg = compose_train(["model=koch"], Path("unused"))
    spec = {k: v for k, v in split_model_config(cfg.model)[0].items() if k != "_target_"}
    tower = ConvTower(**{**spec, "in_channels": 1, "image_size": 105})
    assert tower.feature_shape == (256, 6, 6)
    convs = [m for m in tower.features if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [
        (64, (10, 10)),
        (128, (7, 7)),
        (128, (4, 4)),
        (256, (4, 4)),
    ]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in tower.features) == 3
    linear = [m for m in tower.head if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linear] == [(9216, 4096)]
    assert sum(p.numel() for p in tower.parameters()) == 38_947_648
    emb = tower(torch.rand(2, 1, 105, 105))  # (2, 4096)
    assert emb.shape == (2, 4096) and bool(((emb > 0) & (emb < 1)).all())


def test_conv_tower_output_activation():
    layers = [{"type": "conv", "out_channels": 4, "kernel_size": 3}]
    kwargs = {"embedding_dim": 16, "in_channels": 1, "image_size": 8}
    torch.manual_seed(0)
    plain = ConvTower(layers, **kwargs)
    torch.manual_seed(0)
    squashed = ConvTower(layers, output_activation="sigmoid", **kwargs)
    x = torch.rand(5, 1, 8, 8)
    raw = plain(x)
    assert isinstance(plain.head[-1], torch.nn.Linear)  # default: unchanged
    assert bool((raw < 0).any())
    torch.testing.assert_close(squashed(x), torch.sigmoid(raw))
    with pytest.raises(ConfigError, match=r"model.output_activation 'softmax' is unknown"):
        ConvTower(layers, output_activation="softmax", **kwargs)


def test_debug_fast_trains_five_batches_and_tests(tmp_path):
    cfg = compose_train(["debug=fast", *CPU], tmp_path / "run")
    metrics = run_training(cfg)
    check_test_metrics(metrics)
    out = Path(cfg.paths.output_dir)
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["global_step"] == 5 and last["epoch"] == 0
    assert (out / "metrics.json").is_file()


# -- debug=overfit: one fixed batch, loss to zero -------------------------------------------
def test_samplers_without_reshuffle_repeat_the_first_epoch():
    targets = torch.arange(40) % 5
    balanced = ClassBalancedBatchSampler(targets, 10, 2, seed=1, reshuffle=False)
    pairs = PairBatchSampler(targets, 8, 16, seed=1, reshuffle=False)
    for sampler in (balanced, pairs):
        first = list(sampler)
        sampler.set_epoch(7)  # what a Lightning that calls set_epoch would do
        assert list(sampler) == first
    reshuffled = ClassBalancedBatchSampler(targets, 10, 2, seed=1)
    first = list(reshuffled)
    reshuffled.set_epoch(7)
    assert list(reshuffled) != first


def test_debug_overfit_holds_one_batch(tmp_path):
    cfg = compose_train(["debug=overfit", *CPU], tmp_path / "run")
    assert cfg.trainer.overfit_batches == 1 and cfg.data.augment is None
    dm = build(cfg.data)
    sampler = dm.train_dataloader().batch_sampler
    first = next(iter(sampler))
    sampler.set_epoch(3)
    assert next(iter(sampler)) == first


def _first_batch_loss(cfg: DictConfig) -> float:
    """The loss of a freshly built model on the batch debug=overfit trains on."""
    pl.seed_everything(cfg.seed, verbose=False)
    dm = build(cfg.data)
    module = build_module(cfg, dm)
    batch = next(iter(dm.train_dataloader().batch_sampler))
    images, labels = dm.load_splits().train.__getitems__(batch)
    with torch.no_grad():
        return float(module.loss_fn(module(images), labels).loss)


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_debug_overfit_loss_falls_fast(tmp_path):
    """25 one-batch epochs (~5 s): the loss falls by two orders of magnitude."""
    cfg = compose_train(["debug=overfit", *CPU, "trainer.max_epochs=25"], tmp_path / "run")
    before = _first_batch_loss(cfg)
    after = run_training(cfg)["train/loss"]
    assert before > 1.0
    assert after < before / 100


@pytest.mark.slow
def test_debug_overfit_loss_reaches_zero(tmp_path):
    """The preset as it is (150 one-batch epochs, 25-35 s on 2 cores): multi-similarity hits 0."""
    cfg = compose_train(["debug=overfit", *CPU], tmp_path / "run")
    assert run_training(cfg)["train/loss"] < 1e-3
