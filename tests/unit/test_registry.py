"""Loading is data, never code: a checkpoint's stored config builds only the registry, a
resumed run's saved overrides replay only known keys, and anything that is not a siamese
checkpoint is one line naming the file and what is wrong."""

from __future__ import annotations

import copy
import os
import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import CONF, FAST, Payload, compose_config, compose_train, put_at, resumable_run
from hydra._internal.utils import _locate

import siamese
from siamese.config import build
from siamese.errors import ConfigError
from siamese.pipelines.evaluate import run_evaluation
from siamese.pipelines.export import run_export
from siamese.pipelines.train import run_training
from siamese.registry import REGISTRY, check_checkpoint_config, register, registered
from siamese.resume import TRUST_KEY, replayable, with_saved_overrides


@pytest.mark.parametrize(
    "where",
    [
        "tower",  # the first route
        "config.data.augment",  # evaluate.py builds the stored data config
        "tower.layers.1",  # inside a list
        "config.callbacks.model_checkpoint",  # a part loading never builds: still refused
        "config.scheduler",
    ],
)
def test_a_checkpoint_naming_code_is_refused_before_anything_runs(attack, where):
    evil = attack(put_at(where))
    with pytest.raises(ConfigError) as err:
        siamese.load(evil)
    message = str(err.value)
    assert f"hyper_parameters.{where}._target_='torch.load'" in message
    assert "refused it before building or running anything" in message
    assert not message.startswith("ckpt_path=") or str(evil) in message
    assert "\n" not in message
    assert not attack.marker.exists()


def test_a_partial_target_under_scheduler_is_refused(attack):
    def edit(ckpt, evil):
        ckpt["hyper_parameters"]["scheduler"] = {**evil, "_partial_": True}

    with pytest.raises(ConfigError, match=r"hyper_parameters\.scheduler\._target_='torch\.load'"):
        siamese.load(attack(edit))
    assert not attack.marker.exists()


def test_builtins_open_as_the_tower_leaves_the_file_alone(attack, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")

    def edit(ckpt, _):
        ckpt["hyper_parameters"]["tower"] = {
            "_target_": "builtins.open",
            "file": str(victim),
            "mode": "w",
        }

    with pytest.raises(
        ConfigError,
        match=r"tower\._target_='builtins\.open', which is not among the registry's tower",
    ):
        siamese.load(attack(edit))
    assert victim.read_text() == "precious"


def test_a_registered_class_of_another_kind_is_refused_where_it_does_not_belong(attack):
    def edit(ckpt, _):
        ckpt["hyper_parameters"]["tower"]["_target_"] = "torch.optim.SGD"

    with pytest.raises(
        ConfigError, match="'torch.optim.SGD', which is not among the registry's tower classes"
    ):
        siamese.load(attack(edit))


def test_an_interpolation_that_would_make_a_target_after_the_check_is_refused(attack):
    def edit(ckpt, evil):
        ckpt["hyper_parameters"]["tower"]["dropout"] = "${oc.create:{_target_: torch.load}}"

    with pytest.raises(ConfigError, match=r"interpolation at hyper_parameters\.tower\.dropout"):
        siamese.load(attack(edit))


def test_evaluate_and_export_refuse_it_in_one_line(attack, tmp_path):
    evil = attack(put_at("config.data.augment"))
    cfg = compose_config("evaluate", [f"ckpt_path={evil}"], tmp_path / "eval")
    with pytest.raises(ConfigError, match=r"config\.data\.augment\._target_='torch\.load'"):
        run_evaluation(cfg)
    cfg = compose_config("export", [f"ckpt_path={attack(put_at('tower'))}"], tmp_path / "export")
    with pytest.raises(ConfigError, match=r"hyper_parameters\.tower\._target_='torch\.load'"):
        run_export(cfg)
    assert not attack.marker.exists()


def test_a_real_checkpoint_still_loads_and_embeds(real_ckpt):
    model = siamese.load(real_ckpt["path"])
    assert not model.training
    emb = model.embed(torch.rand(3, 1, 28, 28))
    assert emb.shape == (3, real_ckpt["ckpt"]["hyper_parameters"]["tower"]["embedding_dim"])


def test_a_class_of_ones_own_loads_once_registered(attack, monkeypatch):
    def edit(ckpt, _):
        ckpt["hyper_parameters"]["config"]["callbacks"]["mine"] = {
            "_target_": "pytorch_lightning.callbacks.Timer"
        }

    evil = attack(edit)
    with pytest.raises(ConfigError, match="callbacks.mine._target_='pytorch_lightning"):
        siamese.load(evil)
    monkeypatch.setitem(REGISTRY, "callback", set(REGISTRY["callback"]))  # undone after
    register("callback", "pytorch_lightning.callbacks.Timer")
    assert siamese.load(evil).tower is not None
    with pytest.raises(ConfigError, match="unknown registry kind 'towers'"):
        register("towers", "x.Y")


def test_every_target_the_project_configures_is_registered_and_imports():
    targets = set()
    for file in CONF.rglob("*.yaml"):
        text = file.read_text()
        targets |= {
            line.split("_target_:", 1)[1].strip()
            for line in text.splitlines()
            if "_target_:" in line and not line.lstrip().startswith("#")
        }
    assert targets and targets <= registered(), sorted(targets - registered())
    for name in sorted(registered()):
        assert callable(_locate(name)), name


def test_hydra_blocklist_refusal_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"Hydra refused to build a _target_: .*os\.system"):
        build({"_target_": "os.system", "command": f"touch {tmp_path / 'x'}"})
    cfg = compose_train(
        [*FAST, "+callbacks.x._target_=os.system", f"+callbacks.x.command=touch {tmp_path}/x"],
        tmp_path / "run",
    )
    with pytest.raises(ConfigError, match="blocklisted"):
        run_training(cfg)
    assert not (tmp_path / "x").exists()


ESCAPED_INTERPOLATION = "data.augment.p=" + re.sub(
    r"([\\(){}\[\]:=, ])",
    r"\\\1",
    "${oc.decode:{_tar${oc.env:NOPE_XYZ,}get_: os.makedirs, name: /tmp/PWNED}}",
)


@pytest.mark.parametrize(
    ("override", "replayed"),
    [
        ("trainer.max_epochs=2", True),
        ("~callbacks.plots", True),
        ("experiment=omniglot_koch", True),
        ("+experiment=mnist_triplet", True),
        ("+callbacks.x._target_=torch.load", False),
        ("+callbacks.x.f=payload.pt", False),  # a key no config file has
        ("data.augment={_target_:torch.load,f:p.pt}", False),
        ("model.layers=[{_target_:builtins.open}]", False),
        ("scheduler._partial_=false", False),
        ("seed=${oc.env:HOME}", False),
        ("data=not_an_option", False),
        ("model.layers=[{type:conv,out_channels:8}]", True),
        ("data.root='/photos/my set'", True),
        # Hydra unescapes \{ to {: an interpolation that spells _target_ only when resolved.
        (ESCAPED_INTERPOLATION, False),
        ("data.root=$\\{oc.env\\:SECRET\\}", False),
        ("trainer.max_epochs=${seed}", False),
        # Hydra's own settings: a log file anywhere, the run-folder guard switched off.
        ("hydra.job_logging.handlers.file.filename=/tmp/elsewhere.log", False),
        ("hydra.callbacks.run_dir_guard=null", False),
        ("~hydra.callbacks.run_dir_guard", False),
        ("model@_global_=convnet", False),
        ("seed=1,2", False),
    ],
)
def test_which_saved_overrides_are_replayed(override, replayed):
    assert replayable(override) is replayed


def test_a_resume_leaves_out_saved_overrides_that_name_code(tmp_path, real_ckpt, capsys):
    evil = ["+callbacks.x._target_=torch.load", "+callbacks.x.f=payload.pt"]
    run = resumable_run(tmp_path, real_ckpt, ["trainer.max_epochs=2", *evil])
    argv = with_saved_overrides([f"hydra.run.dir={run}", "ckpt_path=last"])
    expected = ["trainer.max_epochs=2", f"hydra.run.dir={run}", "ckpt_path=last", "hydra.mode=RUN"]
    assert argv == expected
    lines = capsys.readouterr().err.strip().splitlines()
    left = next(line for line in lines if "left out" in line)
    assert "left out 2 of the overrides saved in last.ckpt" in left
    assert " ".join(evil) in left and f"{TRUST_KEY}=true" in left
    # Deleting what was left out is moot (Hydra would stop on a key that is not there).
    dropped = with_saved_overrides([f"hydra.run.dir={run}", "ckpt_path=last", "~callbacks.x"])
    assert dropped == expected
    # Saved overrides that are not a list of strings: none is replayed.
    for odd in ("trainer.max_epochs=2", {"trainer.max_epochs": 2}, [1, 2]):
        odd_run = resumable_run(tmp_path / str(type(odd).__name__), real_ckpt, odd)
        args = [f"hydra.run.dir={odd_run}", "ckpt_path=last"]
        assert with_saved_overrides(args) == args
    # Only the command's own say-so replays them.
    trusted = with_saved_overrides([f"hydra.run.dir={run}", "ckpt_path=last", f"{TRUST_KEY}=true"])
    assert trusted[:3] == ["trainer.max_epochs=2", *evil]


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (yaml.safe_dump({"model": {"embedding_dim": 64}}), "not a readable checkpoint"),
        ("id,path,label\n0,a.png,cat\n", "not a readable checkpoint"),
        ("just some text\n", "not a readable checkpoint"),
    ],
)
def test_a_text_file_is_not_a_checkpoint(tmp_path, content, reason):
    path = tmp_path / "file.ckpt"
    path.write_text(content)
    with pytest.raises(ConfigError, match=reason) as err:
        siamese.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_dev_null_is_named_for_what_it_is():
    with pytest.raises(ConfigError, match="'/dev/null' is a character device, not a checkpoint"):
        siamese.load("/dev/null")


@pytest.mark.skipif(sys.platform == "win32", reason="FIFOs are POSIX")
def test_a_fifo_is_never_opened(tmp_path):
    fifo = tmp_path / "x.ckpt"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"is a named pipe \(FIFO\), not a checkpoint"):
        siamese.load(fifo)  # opening it would block forever


def _edited(tmp_path: Path, real_ckpt: dict, edit) -> Path:
    ckpt = copy.deepcopy(real_ckpt["ckpt"])
    edit(ckpt)
    path = tmp_path / "edited.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda c: c["state_dict"].pop(
                next(k for k in c["state_dict"] if k.startswith("tower."))
            ),
            r"weights do not fit the model its config describes \(tower\..* is not in it",
        ),
        (
            lambda c: c["state_dict"].update(extra=torch.zeros(2)),
            r"weights do not fit .*it has extra, which this model lacks",
        ),
        (
            lambda c: c["state_dict"].update(
                {k: torch.zeros(3) for k in list(c["state_dict"])[:1]}
            ),
            r"weights do not fit .* is 3 there and",
        ),
        (lambda c: c.pop("hyper_parameters"), "holds no hyper_parameters"),
        (
            lambda c: c.update(hyper_parameters={"lr": 0.1, "hidden_size": 32}),
            r"not a checkpoint of siamese's model \(its hyper_parameters lack tower",
        ),
        (
            lambda c: c["hyper_parameters"].update(learning_rate=0.1),
            "have learning_rate, which siamese's model lacks",
        ),
        (
            lambda c: c.update({"pytorch-lightning_version": "0.5.0"}),
            "written by Lightning '0.5.0'",
        ),
        (
            lambda c: c["hyper_parameters"]["tower"].update(embedding_dim="wide"),
            r"its stored config does not rebuild a model \(model.embedding_dim must be",
        ),
        (
            lambda c: c["hyper_parameters"]["distance"].update(sharpness=3),
            r"its stored config does not rebuild a model \(\w+Exception: .*sharpness",
        ),
    ],
    ids=[
        "missing-key",
        "extra-key",
        "wrong-shape",
        "no-hparams",
        "other-project",
        "unknown-hparam",
        "old-lightning",
        "bad-value",
        "bad-layer",
    ],
)
def test_a_damaged_or_foreign_checkpoint_is_one_line(tmp_path, real_ckpt, edit, message):
    load_refuses(_edited(tmp_path, real_ckpt, edit), message)


def load_refuses(path: Path, message: str) -> None:
    """``siamese.load(path)`` is one ConfigError line naming the file and matching ``message``."""
    with pytest.raises(ConfigError, match=message) as err:
        siamese.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_evaluate_and_export_refuse_a_text_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("a: 1\n")
    cfg = compose_config("evaluate", [f"ckpt_path={path}"], tmp_path / "eval")
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        run_evaluation(cfg)
    cfg = compose_config("export", [f"ckpt_path={path}"], tmp_path / "export")
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        run_export(cfg)


def test_a_wandb_run_id_from_a_checkpoint_must_be_an_id_not_a_path(tmp_path, real_ckpt):
    from siamese.loggers import WANDB_RUN_ID, _resume_state

    ckpt = copy.deepcopy(real_ckpt["ckpt"])
    ckpt[WANDB_RUN_ID] = "abc-123_x"
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    assert _resume_state(str(path))[WANDB_RUN_ID] == "abc-123_x"
    ckpt[WANDB_RUN_ID] = "../../elsewhere"
    torch.save(ckpt, path)
    with pytest.raises(ConfigError, match="W&B run id '../../elsewhere' that is not a plain id"):
        _resume_state(str(path))


def test_lightning_reads_checkpoints_as_plain_data_when_resuming_or_testing(tmp_path, monkeypatch):
    """train.py's resume and its test of best.ckpt go through AtomicCheckpointIO: a pickled
    object is refused there too, even with torch's default turned off by the environment."""
    from siamese.checkpointing import AtomicCheckpointIO

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "x": Payload(marker)}, path)
    with pytest.raises(Exception, match="Weights only load failed|weights_only"):
        AtomicCheckpointIO().load_checkpoint(path)
    assert not marker.exists()


def test_lightnings_load_from_checkpoint_is_the_safe_loader(attack, real_ckpt):
    from siamese.module import SiameseModule

    with pytest.raises(ConfigError, match=r"hyper_parameters\.tower\._target_='torch\.load'"):
        SiameseModule.load_from_checkpoint(attack(put_at("tower")))
    assert not attack.marker.exists()
    model = SiameseModule.load_from_checkpoint(real_ckpt["path"])
    assert isinstance(model, SiameseModule) and not model.training
    with pytest.raises(ConfigError, match="use siamese.load"):
        SiameseModule.load_from_checkpoint(real_ckpt["path"], embedding_dim=3)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (  # a registered class where siamese builds nothing: Hydra builds nested nodes first
            lambda c: c["hyper_parameters"]["tower"].update(
                x={"_target_": "pytorch_lightning.Trainer", "detect_anomaly": True}
            ),
            r"names hyper_parameters\.tower\.x\._target_='pytorch_lightning\.Trainer' where "
            "siamese builds nothing",
        ),
        (  # evaluate.py builds config.data: only the data module may sit there
            lambda c: c["hyper_parameters"]["config"]["data"].update(
                _target_="siamese.hydra_callbacks.SweepSummary"
            ),
            r"config\.data\._target_='siamese\.hydra_callbacks\.SweepSummary', which is not "
            "among the registry's datamodule classes",
        ),
        (
            lambda c: c["hyper_parameters"]["config"]["data"]["source"].update(
                _target_="siamese.data.augment.BatchRandomAffine"
            ),
            "which is not among the registry's source classes",
        ),
        (
            lambda c: c["hyper_parameters"]["tower"].update(_args_=["x"]),
            r"sets Hydra's _args_ at hyper_parameters\.tower",
        ),
        (
            lambda c: c["hyper_parameters"]["config"].update(deep=_nested(200)),
            "nests its config more than 32 levels deep",
        ),
        (
            lambda c: c["hyper_parameters"]["tower"].update({3: "x"}),
            "has a key 3 that is not a name",
        ),
        (  # a dotted key would spell a path where a registered callback may sit
            lambda c: c["hyper_parameters"]["config"]["data"].update(
                {"callbacks.x": {"_target_": "pytorch_lightning.callbacks.ModelCheckpoint"}}
            ),
            "has a key 'callbacks.x' that is not a name",
        ),
        (  # torch.compile's options can name a compiler to run
            lambda c: c["hyper_parameters"].update(
                compile={"backend": "inductor", "options": {"max_autotune": True}}
            ),
            "a checkpoint may hold true, false or a dict of dynamic, fullgraph, mode only",
        ),
        (
            lambda c: c.pop("pytorch-lightning_version"),
            "has no pytorch-lightning_version, so Lightning did not write it",
        ),
    ],
    ids=[
        "nested-target",
        "data-kind",
        "source-kind",
        "args",
        "deep",
        "int-key",
        "dotted-key",
        "compile",
        "no-version",
    ],
)
def test_what_a_registered_name_may_not_do_either(tmp_path, real_ckpt, edit, message):
    load_refuses(_edited(tmp_path, real_ckpt, edit), message)


def _nested(depth: int) -> list:
    node: list = []
    for _ in range(depth):
        node = [node]
    return node


def test_a_resume_needs_what_lightning_reads_to_go_on(tmp_path, real_ckpt):
    from siamese.inference import check_checkpoint

    path = _edited(tmp_path, real_ckpt, lambda c: c.pop("loops"))
    assert check_checkpoint(path)  # loading the model needs no loop state
    with pytest.raises(ConfigError, match="lacks loops, which a resume needs"):
        check_checkpoint(path, for_resume=True)


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_every_config_siamese_composes_passes_the_stored_config_check(tmp_path):
    """No false alarm: each group option, experiment and preset, stored as train.py stores
    it (resolved), passes check_checkpoint_config."""
    from omegaconf import OmegaConf

    from siamese.registry import check_checkpoint_config

    choices = [[]]
    for group in ("data", "model", "distance", "loss", "optimizer", "scheduler", "trainer"):
        choices += [[f"{group}={f.stem}"] for f in sorted((CONF / group).glob("*.yaml"))]
    for group in ("logger", "experiment", "debug"):
        choices += [[f"{group}={f.stem}"] for f in sorted((CONF / group).glob("*.yaml"))]
    choices.append(["+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping"])
    for overrides in choices:
        if overrides == ["distance=learned"]:
            overrides = [*overrides, "loss=bce"]
        cfg = compose_train(overrides, tmp_path)
        config = OmegaConf.to_container(cfg, resolve=True)
        model = dict(config["model"])
        hparams = {
            "tower": {k: v for k, v in model.items() if k not in ("channels_last", "compile")},
            **{k: config[k] for k in ("distance", "loss", "optimizer", "scheduler")},
            "config": config,
        }
        check_checkpoint_config(hparams, f"the config of {overrides}")


def test_an_earlier_checkpoint_naming_a_retired_callback_still_loads_but_no_stranger():
    # Checkpoints written before last.ckpt became two ModelCheckpoint entries name
    # siamese.callbacks.LastCheckpoint in their stored config; nothing builds it.
    retired = {"config": {"callbacks": {"last": {"_target_": "siamese.callbacks.LastCheckpoint"}}}}
    check_checkpoint_config(retired, "old.ckpt")
    assert "siamese.callbacks.LastCheckpoint" not in registered()
    for target in ("siamese.callbacks.NoSuchThing", "os.system"):
        crafted = {"config": {"callbacks": {"last": {"_target_": target}}}}
        with pytest.raises(ConfigError, match="not among the registry's callback classes"):
            check_checkpoint_config(crafted, "old.ckpt")
