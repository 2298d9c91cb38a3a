"""Values that used to pass the start and crash later (or never be checked) stop the run at
start in one line: the config checks of run_training and the command-line grammar check."""

from __future__ import annotations

import pytest
from helpers import CONF
from omegaconf import DictConfig

from siamese.cli import hydra_error_line
from siamese.composition import composed, group_options
from siamese.data.augment import BatchRandomAffine
from siamese.errors import ConfigError
from siamese.models import ConvTower
from siamese.models.layers import layer_from_spec
from siamese.pipelines.train import check_config, check_trainer


def start_checks(cfg: DictConfig) -> None:
    """What run_training checks before it builds anything or reads any data."""
    check_config(cfg)
    check_trainer(cfg.trainer)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "seed=-1 is not a seed; use an integer from 0 to 4294967295, e.g. seed=0"),
        (
            "seed=1180591620717411303424",  # 2**70
            "seed=1180591620717411303424 is not a seed; use an integer from 0 to 4294967295",
        ),
        (
            "eval_seed=-1",
            "eval_seed=-1 is not a seed; use an integer from 0 to 18446744073709551615",
        ),
        ("model.dropout=1.5", "model.dropout must be in [0, 1), got 1.5; e.g. model.dropout=0.3"),
        (
            "trainer.limit_train_batches=0",
            "trainer.limit_train_batches=0 would train on no batches; give a number of batches",
        ),
        ("trainer.limit_train_batches=0.0", "trainer.limit_train_batches=0.0 would train on no"),
        # trainer.max_epochs=1.5 is not an int: Hydra's schema refuses it (tests/unit/test_cli.py).
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be a positive whole number of"),
        (
            "trainer.max_epochs=-1",
            "trainer.max_epochs=-1 (Lightning's no epoch limit) with trainer.max_steps=-1 would "
            "train forever",
        ),
        ("trainer.max_steps=0", "trainer.max_steps=0 must be a positive whole number of"),
        (
            "callbacks.model_checkpoint.monitor=val/precison_at_1",
            "callbacks.model_checkpoint.monitor='val/precison_at_1' is not a metric this run "
            "logs while fitting; did you mean val/precision_at_1? choose one of: val/loss, ",
        ),
        (  # test/ metrics are logged after the fit: Lightning's checkpoint never sees them
            "callbacks.model_checkpoint.monitor=test/map_at_r",
            "callbacks.model_checkpoint.monitor='test/map_at_r' is not a metric this run logs "
            "while fitting; did you mean val/map_at_r?",
        ),
        ("scheduler.max_lr=-1", "scheduler.max_lr=-1.0 must be positive (the one cycle's peak"),
        ("data.augment.p=5", "data.augment.p=5.0 must be in [0, 1] (a probability, e.g. 1.0"),
        ("data.augment.degrees=-400", "data.augment.degrees=-400.0 must be >= 0 (degrees, e.g. 10"),
        ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val=-1.0 must be >= 0 (Lightning"),
    ],
)
def test_values_that_crashed_later_or_passed_silently_fail_at_start(make_cfg, override, message):
    # A float key holds the value as a float (Hydra's schema): -1 reads back as -1.0.
    with pytest.raises(ConfigError) as refused:
        start_checks(make_cfg(override))
    assert str(refused.value).startswith(message)
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["scheduler=cosine", "scheduler.eta_min=-0.1"], "scheduler.eta_min=-0.1 must be >= 0"),
        (["model.layers=[{type: dropout, p: 1.5}]"], "model.layers.0.p must be in [0, 1)"),
        (["model=resnet18", "model.dropout=1"], "model.dropout must be in [0, 1), got 1.0;"),
        (
            [
                "+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping",
                "+callbacks.stop.monitor=val/rocauc",
            ],
            "callbacks.stop.monitor='val/rocauc' is not a metric this run logs while fitting; "
            "did you mean val/roc_auc?",
        ),
        (["data.augment.shear=90"], "data.augment.shear=90.0 must be in [0, 90)"),
        (["data.augment.hflip=-0.5"], "data.augment.hflip=-0.5 must be in [0, 1]"),
        (["data.augment.translate=2"], "data.augment.translate=2.0 must be in [0, 1]"),
        (["data.augment.scale=[1.1,0.9]"], "data.augment.scale must be [low, high]"),
        (["trainer.limit_train_batches=2.5"], "trainer.limit_train_batches=2.5 is not a number"),
    ],
)
def test_their_neighbours_fail_at_start_too(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as refused:
        start_checks(make_cfg(*overrides))
    assert str(refused.value).startswith(message)


@pytest.mark.parametrize(
    "overrides",
    [
        ["seed=0", "eval_seed=0"],
        ["seed=4294967295", "eval_seed=18446744073709551615"],
        ["seed=null"],
        ["trainer.max_epochs=-1", "trainer.max_steps=50"],  # ends at max_steps
        ["trainer.max_epochs=null"],  # Lightning's 1000 epochs
        ["trainer.limit_train_batches=0.25"],
        ["trainer.limit_train_batches=1.0"],
        ["trainer.limit_train_batches=null"],
        ["trainer.gradient_clip_val=0"],
        ["trainer.gradient_clip_val=0.5"],
        ["callbacks.model_checkpoint.monitor=train/loss", "callbacks.model_checkpoint.mode=min"],
        ["callbacks.model_checkpoint.monitor=null"],
        ["callbacks.model_checkpoint.monitor=val/tar_at_far_1e-3"],
        ["scheduler=cosine", "scheduler.eta_min=0"],
        ["model.dropout=0"],
        ["data.augment=null"],
        ["data.augment.p=0", "data.augment.degrees=0", "data.augment.hflip=1"],
    ],
)
def test_valid_neighbours_pass_the_start_checks(make_cfg, overrides):
    start_checks(make_cfg(*overrides))


@pytest.mark.parametrize(
    "preset",
    [
        *(f"experiment={o}" for o in group_options("experiment", CONF)),
        *(f"debug={o}" for o in group_options("debug", CONF)),
        *(f"data={o}" for o in group_options("data", CONF)),
        *(f"model={o}" for o in group_options("model", CONF)),
        "hparams_search=optuna",
    ],
)
def test_every_preset_and_option_passes_the_start_checks(make_cfg, preset, tmp_path):
    extra = []
    if preset == "experiment=photos_finetune":  # it needs its weights (the caches are empty)
        (tmp_path / "resnet18.pth").touch()  # the start checks look for the file only
        extra = [f"model.weights={tmp_path / 'resnet18.pth'}"]
    cfg = make_cfg(preset, f"data.root={tmp_path}", *extra, fast=False)
    start_checks(cfg)


def test_the_constructors_refuse_the_same_values_for_the_python_api():
    with pytest.raises(ConfigError, match=r"^data.augment.p=5 must be in \[0, 1\]"):
        BatchRandomAffine(p=5)
    with pytest.raises(ConfigError, match=r"^data.augment.degrees=-400 must be >= 0"):
        BatchRandomAffine(degrees=-400)
    with pytest.raises(ConfigError, match=r"^data.augment.scale must be \[low, high\]"):
        BatchRandomAffine(scale=(1.1, 0.9))
    with pytest.raises(ConfigError, match=r"^model.dropout must be in \[0, 1\), got 1.5"):
        ConvTower([], dropout=1.5, hidden_dims=[8], in_channels=1, image_size=4)
    with pytest.raises(ConfigError, match=r"^model.layers.2.p must be in \[0, 1\), got 1.5"):
        layer_from_spec({"type": "dropout", "p": 1.5}, (1, 4, 4), 2)


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (  # Lightning's own checkpoint name: '=' ends Hydra's unquoted value
            ["ckpt_path=epoch=0-step=5.ckpt"],
            "error: ckpt_path=epoch=0-step=5.ckpt: Hydra's override grammar refuses it (it "
            "cannot read '=' unquoted); quote it: ckpt_path='epoch=0-step=5.ckpt', typed in a "
            """shell as 'ckpt_path="epoch=0-step=5.ckpt"'""",
        ),
        (
            ["ckpt_path=modèle.ckpt"],
            "error: ckpt_path=modèle.ckpt: Hydra's override grammar refuses it (it cannot read "
            "'è' unquoted); quote it: ckpt_path='modèle.ckpt', typed in a shell as "
            """'ckpt_path="modèle.ckpt"'""",
        ),
        (  # Hydra reads a comma as a sweep, which a single run refuses in five lines
            ["ckpt_path=a,b.ckpt"],
            "error: ckpt_path=a,b.ckpt is a sweep over a, b.ckpt (a comma separates sweep "
            "values), which runs only with -m; for one value, quote it: ckpt_path='a,b.ckpt', "
            """typed in a shell as 'ckpt_path="a,b.ckpt"'""",
        ),
        (
            ["hparams_search=optuna", "hydra.mode=RUN", "ckpt_path=a,b.ckpt"],
            "error: ckpt_path=a,b.ckpt is a sweep over a, b.ckpt (a comma",
        ),
        (  # a group takes one option: no quoting hint
            ["loss=contrastive,triplet"],
            "error: loss=contrastive,triplet is a sweep over contrastive, triplet (a comma "
            "separates sweep values), which runs only with -m",
        ),
        (["seed=range(1,3)"], "error: seed=range(1,3) is a sweep, which runs only with -m"),
    ],
)
def test_overrides_hydra_cannot_read_are_one_line_with_the_quoting(args, line):
    with pytest.raises(Exception) as refused:
        composed("train", tuple(args))
    assert f"error: {hydra_error_line(refused.value, 'train', args)}".startswith(line)


@pytest.mark.parametrize(
    "args",
    [
        ["ckpt_path='epoch=0-step=5.ckpt'"],  # what the shell passes on from the hint
        ['ckpt_path="modèle.ckpt"'],
        ["hydra.run.dir=outputs/${now:%Y-%m-%d}/${now:%H-%M-%S}", "data.root=/tmp/a b"],
    ],
)
def test_overrides_hydra_reads_compose(args):
    composed("train", tuple(args))
