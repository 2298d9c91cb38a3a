"""Loggers: what CSV, TensorBoard and offline W&B write, resume, offline fallback, bad input."""

from __future__ import annotations

import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import wandb_records

from siamese.errors import ConfigError
from siamese.loggers import build_loggers, git_info, wandb_offline_reason
from siamese.pipelines.train import run_training

# One epoch of three batches; the test split is still scored (test/ metrics).
TINY = ["trainer.log_every_n_steps=1"]


STOP_AFTER_FIRST_EPOCH = [  # a run planned for 2 epochs that stops after one, as if killed
    "+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping",
    "+callbacks.stop.monitor=val/precision_at_1",
    "+callbacks.stop.mode=max",
    "+callbacks.stop.stopping_threshold=0.0",
]


# -- readers for what the loggers wrote ---------------------------------------------------
def csv_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as file:
        return list(csv.DictReader(file))


def logged(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """(step, value) of every CSV row that has ``key``."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def tensorboard_events(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def tensorboard_hparams(acc: Any) -> dict[str, Any]:
    """The hyperparameters of the HPARAMS tab (its session-start summary)."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    hparams: dict[str, Any] = {}
    for content in acc.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        if data.WhichOneof("data") == "session_start_info":
            for key, value in data.session_start_info.hparams.items():
                hparams[key] = getattr(value, value.WhichOneof("kind"))
    return hparams


def wandb_run(run_dir: Path) -> dict[str, Any]:
    """id, merged config, every logged (key -> values) and exit code of the offline runs."""
    import wandb

    # finish() returns before wandb-core has closed the run file; teardown waits for it.
    wandb.teardown()
    dirs = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert dirs, f"no offline W&B run under {run_dir}"
    run: dict[str, Any] = {"ids": [], "config": {}, "history": {}, "exit": []}
    for folder in dirs:
        (wandb_file,) = folder.glob("run-*.wandb")
        for record in wandb_records(wandb_file):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run["ids"].append(record.run.run_id)
            elif kind == "config":
                run["config"].update(
                    {i.key: json.loads(i.value_json) for i in record.config.update}
                )
            elif kind == "history":
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    run["history"].setdefault(key, []).append(json.loads(item.value_json))
            elif kind == "exit":
                run["exit"].append(record.exit.exit_code)
    return run


# -- every logger writes what it should ---------------------------------------------------
@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run with all three loggers."""
    from helpers import FAST, compose_train

    out = tmp_path_factory.mktemp("many") / "run"
    run_training(compose_train([*FAST, *TINY, "logger=many"], out))
    return out


def test_csv_rows_and_config(many):
    rows = csv_rows(many)
    steps = logged(rows, "train/loss_step")
    assert [s for s, _ in steps] == [0, 1, 2]
    # The epoch mean, summed on the device, is the mean of the steps (equal batches).
    (epoch_mean,) = logged(rows, "train/loss_epoch")
    assert epoch_mean[1] == pytest.approx(sum(v for _, v in steps) / 3, rel=1e-6)
    assert len(logged(rows, "val/precision_at_1")) == 1
    assert len(logged(rows, "test/precision_at_1")) == 1
    hparams = yaml.safe_load((many / "csv" / "hparams.yaml").read_text())
    assert hparams["loss"]["_target_"] == "siamese.losses.MultiSimilarityLoss"
    assert hparams["paths"]["output_dir"] == str(many)  # resolved
    assert hparams["git"] == git_info()
    assert len(hparams["git"]["commit"]) == 40


def test_tensorboard_scalars_and_hparams(many):
    acc = tensorboard_events(many)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss_step", "val/precision_at_1", "test/precision_at_1"} <= scalars
    assert "hp_metric" not in scalars
    assert [e.step for e in acc.Scalars("train/loss_step")] == [0, 1, 2]
    hparams = tensorboard_hparams(acc)
    assert hparams["loss/_target_"] == "siamese.losses.MultiSimilarityLoss"
    assert hparams["git/commit"] == git_info()["commit"]


def test_wandb_offline_run_has_metrics_and_config(many):
    run = wandb_run(many)
    assert len(run["ids"]) == 1 and run["exit"] == [0]  # finished when the job ended
    assert len(run["history"]["train/loss_step"]) == 3
    assert len(run["history"]["val/precision_at_1"]) == 1
    assert 0.0 <= run["history"]["test/precision_at_1"][0] <= 1.0
    assert run["config"]["loss"]["_target_"] == "siamese.losses.MultiSimilarityLoss"
    assert run["config"]["git"]["commit"] == git_info()["commit"]


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_each_logger_alone_writes_only_its_own_folder(make_cfg, logger):
    cfg = make_cfg(f"logger={logger}", *TINY, "test=false")
    run_training(cfg)
    out = Path(cfg.paths.output_dir)
    assert {p.name for p in out.iterdir()} & {"csv", "tensorboard", "wandb"} == {logger}
    if logger == "csv":
        assert logged(csv_rows(out), "val/precision_at_1")
    elif logger == "tensorboard":
        assert "val/precision_at_1" in tensorboard_events(out).Tags()["scalars"]
    else:
        assert len(wandb_run(out)["history"]["val/precision_at_1"]) == 1


def test_wandb_keys_are_overridable(make_cfg):
    cfg = make_cfg(
        "logger=wandb",
        "logger.project=x",
        "logger.tags=[a,b]",
        "logger.group=g",
        "logger.entity=me",
    )
    (logger,), _ = build_loggers(cfg)
    assert logger._wandb_init["project"] == "x" and logger._wandb_init["tags"] == ["a", "b"]
    assert logger._wandb_init["group"] == "g" and logger._wandb_init["entity"] == "me"
    (_, _, wandb), _ = build_loggers(make_cfg("logger=many", "logger.wandb.project=y"))
    assert wandb._wandb_init["project"] == "y"


# -- resume ---------------------------------------------------------------------------------
@pytest.mark.slow  # two runs with every logger, ~7 s: default suite under 5 minutes
def test_resume_continues_the_wandb_run_and_appends_to_the_logs(make_cfg):
    first = make_cfg("logger=many", *TINY, "trainer.max_epochs=2", *STOP_AFTER_FIRST_EPOCH)
    run_training(first)
    out = Path(first.paths.output_dir)
    before = csv_rows(out)
    run_training(make_cfg("logger=many", *TINY, "trainer.max_epochs=2", "ckpt_path=last"))

    (run_id,) = set(wandb_run(out)["ids"])  # two offline run folders, one W&B run
    assert len(list((out / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    rows = csv_rows(out)
    assert [s for s, _ in logged(rows, "train/loss_step")] == [0, 1, 2, 3, 4, 5]
    assert [s for s, _ in logged(rows, "val/precision_at_1")] == [2, 5]
    # The first run's rows are kept as written; only its test row (after the checkpoint
    # it resumes from) is replaced by the resumed run's.
    assert logged(rows, "train/loss_step")[:3] == logged(before, "train/loss_step")
    assert [s for s, _ in logged(rows, "test/precision_at_1")] == [6]
    acc = tensorboard_events(out)  # the same story in TensorBoard (purge_step)
    assert [e.step for e in acc.Scalars("train/loss_step")] == [0, 1, 2, 3, 4, 5]
    assert [e.step for e in acc.Scalars("val/precision_at_1")] == [2, 5]
    assert [e.step for e in acc.Scalars("test/precision_at_1")] == [6]


# -- W&B with no account and no network -------------------------------------------------------
@pytest.fixture
def no_wandb_account(monkeypatch, tmp_path):
    """No WANDB_MODE, no API key, no netrc; the W&B host a closed local port."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")


def test_wandb_without_account_falls_back_offline_with_one_warning(
    make_cfg, no_wandb_account, caplog
):
    cfg = make_cfg("logger=wandb", "logger.offline=false", *TINY, "test=false")
    start = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="siamese.loggers"):
        run_training(cfg)
    assert time.monotonic() - start < 60
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "siamese.loggers"]
    out = Path(cfg.paths.output_dir)
    assert warning.startswith("W&B: no API key (set WANDB_API_KEY or run `wandb login`)")
    assert warning.endswith(f"wandb sync {out / 'wandb' / 'offline-run-*'}")
    assert "\n" not in warning
    assert len(wandb_run(out)["history"]["val/precision_at_1"]) == 1


def test_unreachable_wandb_host_is_reported_within_seconds(no_wandb_account, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    start = time.monotonic()
    reason = wandb_offline_reason()
    assert reason == "http://127.0.0.1:9 did not answer within 3 s"
    assert time.monotonic() - start < 5


def test_wandb_mode_in_the_environment_wins(make_cfg, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_MODE", "offline")
    with caplog.at_level(logging.WARNING, logger="siamese.loggers"):
        (logger,), _ = build_loggers(make_cfg("logger=wandb", "logger.offline=false"))
    assert logger._offline  # chosen offline: nothing to warn about
    assert not [r for r in caplog.records if r.name == "siamese.loggers"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert build_loggers(make_cfg("logger=wandb")) == ([], [])


@pytest.mark.parametrize(("logger", "package"), [("wandb", "wandb"), ("many", "tensorboard")])
def test_missing_package_is_one_line(make_cfg, monkeypatch, logger, package):
    monkeypatch.setitem(sys.modules, package, None)  # makes `import <package>` fail
    with pytest.raises(ConfigError, match=f"needs the {package} package: pip install {package}"):
        build_loggers(make_cfg(f"logger={logger}"))


def test_log_model_offline_is_refused(make_cfg):
    with pytest.raises(ConfigError, match="log_model=True uploads checkpoints"):
        build_loggers(make_cfg("logger=wandb", "logger.offline=true", "logger.log_model=true"))


def test_git_info_outside_a_checkout(tmp_path):
    assert git_info(tmp_path) == {"commit": None, "dirty": None}
