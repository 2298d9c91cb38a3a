"""Every config group composes and instantiates; impossible combinations fail at start."""

from __future__ import annotations

import pytest
from helpers import CONF, assert_fragments
from hydra.utils import instantiate
from omegaconf import OmegaConf

from siamese.composition import group_options
from siamese.errors import ConfigError
from siamese.pipelines.train import check_config, split_model_config


def test_default_config_matches_the_contract(make_cfg):
    cfg = make_cfg(fast=False)
    assert cfg.data.source._target_.endswith("MNISTSubset")
    assert cfg.model._target_.endswith("ConvTower")
    assert cfg.distance._target_.endswith("EuclideanDistance")
    # Multi-similarity, not contrastive: it is what reaches the default run's ROC-AUC goal.
    assert cfg.loss._target_.endswith("MultiSimilarityLoss")
    for key in (
        "data.root",
        "data.batch_size",
        "data.num_workers",
        "model.embedding_dim",
        "trainer.max_epochs",
        "trainer.accelerator",
        "trainer.devices",
        "trainer.precision",
        "seed",
        "ckpt_path",
    ):
        assert OmegaConf.select(cfg, key, default="missing") != "missing", key
    assert cfg.callbacks.model_checkpoint.filename == "best"
    assert cfg.callbacks.last_checkpoint.filename == "last"


def test_groups_have_the_options_the_design_names():
    expected = {
        "data": {"mnist_subset", "mnist", "fashion_mnist", "kmnist", "omniglot", "image_folder"},
        "model": {"convnet", "resnet18"},
        "distance": {"euclidean", "cosine", "learned"},
        "loss": {"contrastive", "triplet", "bce", "multi_similarity"},
        "trainer": {"default", "cpu", "gpu", "ddp"},
        "logger": {"csv", "tensorboard", "wandb", "many"},
    }
    for group, options in expected.items():
        assert options <= set(group_options(group, CONF)), group


@pytest.mark.parametrize("data", group_options("data", CONF))
def test_every_data_config_instantiates(make_cfg, data, tmp_path):
    cfg = make_cfg(f"data={data}", f"data.root={tmp_path}")
    dm = instantiate(cfg.data)
    assert dm.batch_size == cfg.data.batch_size  # nothing is loaded until setup()


# Koch et al.'s tower is made for Omniglot's 105x105 characters (28x28 shrinks below 1x1).
SIZES = {"koch": 105}


@pytest.mark.parametrize("model", group_options("model", CONF))
def test_every_model_config_builds_for_its_image_size(make_cfg, model):
    import torch

    size = SIZES.get(model, 28)
    cfg = make_cfg(f"model={model}", "model.in_channels=1", f"model.image_size=[{size},{size}]")
    tower = instantiate(split_model_config(cfg.model)[0])
    assert tower(torch.rand(2, 1, size, size)).shape == (2, cfg.model.embedding_dim)


@pytest.mark.parametrize(
    ("distance", "loss"),
    [(d, lo) for d in ("euclidean", "cosine", "learned") for lo in ("contrastive", "triplet")]
    + [("learned", "bce"), ("euclidean", "multi_similarity"), ("cosine", "multi_similarity")],
)
def test_valid_distance_loss_pairs_instantiate(make_cfg, distance, loss):
    cfg = make_cfg(f"distance={distance}", f"loss={loss}")
    check_config(cfg)
    built = instantiate(cfg.loss, distance=instantiate(cfg.distance))
    assert built.distance.name == distance


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_bce_with_a_plain_distance_fails_at_start(make_cfg, distance):
    with pytest.raises(ConfigError, match=f"loss=bce needs .*distance=learned.*{distance}"):
        check_config(make_cfg("loss=bce", f"distance={distance}"))


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_one_dimensional_normalised_embeddings_fail_at_start(make_cfg, distance):
    with pytest.raises(ConfigError) as err:
        check_config(make_cfg("model.embedding_dim=1", f"distance={distance}"))
    assert_fragments(
        str(err.value),
        f"model.embedding_dim=1 with distance={distance}",
        "every image collapses",
        "use model.embedding_dim >= 2",
    )
    # Unnormalised, one dimension is a line, not two points: allowed.
    plain = ["distance=euclidean", "distance.normalize_embeddings=false", "loss=contrastive"]
    check_config(make_cfg("model.embedding_dim=1", *plain))
    check_config(make_cfg("model.embedding_dim=2", f"distance={distance}"))


@pytest.mark.parametrize("loss", ["triplet", "multi_similarity"])
def test_batch_losses_with_explicit_pairs_fail_at_start(make_cfg, loss):
    with pytest.raises(ConfigError, match="cannot use data.pair_mode=explicit"):
        check_config(make_cfg(f"loss={loss}", "data.pair_mode=explicit"))


def test_learned_distance_with_the_default_loss_says_what_to_use(make_cfg):
    with pytest.raises(ConfigError, match="use distance=cosine or distance=euclidean"):
        check_config(make_cfg("distance=learned"))


@pytest.mark.parametrize("trainer", group_options("trainer", CONF))
def test_every_trainer_config_composes(make_cfg, trainer):
    cfg = make_cfg(f"trainer={trainer}")
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "many"])
def test_loggers_instantiate(make_cfg, logger):
    from siamese.loggers import build_loggers

    loggers, callbacks = build_loggers(make_cfg(f"logger={logger}"))
    assert len(loggers) == (3 if logger == "many" else 1) and len(callbacks) == 1


def test_many_logger_has_all_three(make_cfg):
    assert set(make_cfg("logger=many").logger) == {"csv", "tensorboard", "wandb"}


def test_optimizer_and_schedulers_instantiate(make_cfg):
    import torch

    for scheduler in group_options("scheduler", CONF):
        cfg = make_cfg(f"scheduler={scheduler}", "optimizer=sgd")
        opt = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(1))])
        assert isinstance(opt, torch.optim.SGD)
        make = instantiate(cfg.scheduler)
        kw = {"total_steps": 10} if scheduler == "onecycle" else {"T_max": 10}
        assert make(opt, **kw) is not None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["optimizer.lr=-1"],
            "torch.optim.AdamW refused its settings (Invalid learning rate: -1.0); fix one of: "
            "optimizer.lr=-1.0, optimizer.weight_decay=0.0001",
        ),
        (
            ["optimizer=sgd", "optimizer.momentum=0"],
            "torch.optim.SGD refused its settings (Nesterov momentum requires a momentum and "
            "zero dampening); fix one of: optimizer.lr=0.05, optimizer.momentum=0.0, "
            "optimizer.nesterov=True, optimizer.weight_decay=0.0005",
        ),
        (
            ["scheduler.pct_start=2"],
            "torch.optim.lr_scheduler.OneCycleLR refused its settings (Expected float between 0 "
            "and 1 pct_start, but got 2.0); fix one of: scheduler.max_lr=0.01, "
            "scheduler.pct_start=2.0",
        ),
        (
            ["scheduler._partial_=false"],  # (a schema's key cannot be deleted)
            "scheduler needs scheduler._partial_=true: it is built later, given the optimizer",
        ),
        (
            ["+optimizer.betas=[0.9]"],
            "torch.optim.AdamW refused its settings (list index out of range); fix one of: "
            "optimizer.lr=0.01, optimizer.weight_decay=0.0001, optimizer.betas=[0.9]",
        ),
    ],
)
def test_optimizer_and_scheduler_values_torch_refuses_fail_at_start(make_cfg, overrides, message):
    # Float keys hold floats (Hydra's schema): -1 reads back as -1.0.
    with pytest.raises(ConfigError) as refused:
        check_config(make_cfg(*overrides))
    assert str(refused.value) == message


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["optimizer=sgd", "scheduler=cosine"],
        ["~scheduler"],
        ["scheduler.pct_start=0.01"],  # 0.01 x 100 probe steps: the one-step warm-up case
        ["+scheduler.total_steps=1000"],
    ],
)
def test_every_optimizer_and_scheduler_config_passes_the_start_check(make_cfg, overrides):
    check_config(make_cfg(*overrides))
