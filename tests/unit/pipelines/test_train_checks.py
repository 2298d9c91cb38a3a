"""siamese.pipelines.train_checks: counts the schemas type but do not bound, refused at start."""

from __future__ import annotations

import pytest

from siamese.errors import ConfigError
from siamese.pipelines import train, train_checks


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["eval_pairs=1"], "eval_pairs must be an integer >= 2, got 1"),
        (
            ["+checkpoints.every_n_train_steps=0"],
            "checkpoints.every_n_train_steps must be a positive integer or null, got 0",
        ),
    ],
)
def test_config_counts_out_of_range_are_one_line(make_cfg, overrides, message):
    with pytest.raises(ConfigError) as err:
        train_checks.check_config(make_cfg(*overrides))
    assert str(err.value) == message


def test_trainer_nodes_below_one_are_refused(make_cfg):
    with pytest.raises(ConfigError) as err:
        train_checks.check_trainer(make_cfg("trainer.num_nodes=0").trainer)
    assert str(err.value) == "trainer.num_nodes must be a positive integer, got 0"
    cfg = make_cfg("trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=3")
    assert train_checks.planned_processes(train_checks.check_trainer(cfg.trainer)) == 3


def test_train_keeps_the_checks_it_runs_under_their_old_import_path():
    assert train.check_config is train_checks.check_config
    assert train.check_trainer is train_checks.check_trainer
    assert train.planned_processes is train_checks.planned_processes
