"""The command line as a user meets it: one-line errors, run directories, resume, multirun."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import FAST, one_line_error, run_scripts
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from siamese.cli import check_group_overrides, with_saved_overrides
from siamese.errors import ConfigError
from siamese.hydra_callbacks import RunDirGuard
from siamese.pipelines.train import resolve_ckpt_path, run_training

BAD_INPUT = {
    "unknown-option": (
        ["model=transformer"],
        "unknown model=transformer; choose one of: convnet, koch, resnet18",
    ),
    "unknown-in-sweep": (
        ["-m", "loss=contrastive,tripplet"],
        "unknown loss=tripplet; choose one of: bce, ",
    ),
    "bce-euclidean": (
        ["loss=bce"],
        "loss=bce needs the logits of distance=learned, but distance=euclidean",
    ),
    "group-null": (
        ["scheduler=null"],
        "scheduler=null cannot drop a config group; write ~scheduler",
    ),
}
# A missing data folder, a bad model value and settings torch's optimizer refuses take the
# same path to one line as bce-euclidean (tests/test_train.py and tests/test_config.py check
# their messages in-process).


def flat_keys(node, prefix=""):
    """Every dotted key of a composed config (list items by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for name, value in items:
        key = f"{prefix}.{name}" if prefix else str(name)
        yield key
        if isinstance(value, dict | list):
            yield from flat_keys(value, key)


def flat_items(node, prefix=""):
    """Every (dotted key, leaf value) of a composed config."""
    items = node.items() if isinstance(node, dict) else enumerate(node)
    for name, value in items:
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, dict) or (isinstance(value, list) and value and not is_text(value)):
            yield from flat_items(value, key)
        yield key, value


def is_text(value):
    return isinstance(value, str) or (
        isinstance(value, list) and any(isinstance(v, str | dict) for v in value)
    )


def as_override(value):
    """A value as the command line writes it."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, list):
        return f"[{','.join(as_override(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{as_override(v)}" for k, v in value.items()) + "}"
    return str(value)


RESNET18_KEYS = (
    "backbone_lr_mult, channels_last, compile, dropout, embedding_dim, freeze_bn, head_bn, "
    "image_size, in_channels, input_mean, input_std, pretrained, small_input, stem, weights"
)


@pytest.mark.parametrize(
    ("arg", "line"),
    [
        (
            "trainer.max_epoch=3",
            "error: trainer.max_epoch is not a key of any config; did you mean "
            "trainer.max_epochs? (+trainer.max_epoch=3 would add it as a new key)",
        ),
        (
            "model=resnet18 model.hidden_dims=[128]",
            "error: model.hidden_dims is not a key of model=resnet18; model has: _target_, "
            f"{RESNET18_KEYS} (+model.hidden_dims=[128] would add it as a new key)",
        ),
        (
            "model=resnet18 model.layers.0.out_channels=8",
            "error: model.layers is not a key of model=resnet18; model has: _target_, "
            f"{RESNET18_KEYS} (+model.layers.0.out_channels=8 would add it as a new key)",
        ),
        (
            "optimizer.learning_rate=0.1",
            "error: optimizer.learning_rate is not a key of any config; optimizer has: "
            "_partial_, _target_, lr, momentum, nesterov, weight_decay "
            "(+optimizer.learning_rate=0.1 would add it as a new key)",
        ),
    ],
)
def test_a_key_no_config_has_is_one_line_before_hydra(capsys, arg, line):
    from siamese.cli import check_group_overrides

    with pytest.raises(SystemExit) as stopped:
        check_group_overrides(["trainer.max_epochs=2", *arg.split(), "seed=1"])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines() == [line]


@pytest.mark.parametrize(
    ("arg", "line"),
    [
        ("optimizer.lr=abc", "optimizer.lr=abc is not a number; write e.g. optimizer.lr=0.01"),
        ("seed=abc", "seed=abc is not a number; write e.g. seed=0"),
        ("trainer.max_epochs=ten", "trainer.max_epochs=ten is not a number; write e.g. "),
        ("data.image_size='28'", "data.image_size='28' is not a number; write e.g. "),
        ("test=maybe", "test=maybe is not true or false; write e.g. test=true"),
        (
            "model.hidden_dims=128",
            "model.hidden_dims=128 is not a list of numbers; write e.g. model.hidden_dims=[",
        ),
        ("model.hidden_dims=[128,x]", "model.hidden_dims=[128,x] is not a list of numbers"),
        ("seed=1,2,x", "seed=x (in seed=1,2,x) is not a number; write e.g. seed=0"),
        ("eval.oneshot.ways=5", "eval.oneshot.ways=5 is not a list of numbers; write e.g. "),
        ("data.augment.degrees=[5,10]", "data.augment.degrees=[5,10] is not a number; write e.g."),
    ],
)
def test_a_value_of_the_wrong_kind_is_one_line_before_hydra(capsys, arg, line):
    from siamese.cli import check_group_overrides

    with pytest.raises(SystemExit) as stopped:
        check_group_overrides(["trainer.max_epochs=2", arg, "seed=1"])
    assert stopped.value.code == 2
    [printed] = capsys.readouterr().err.splitlines()
    assert printed.startswith(f"error: {line}")


def test_keys_of_the_chosen_option_pass_and_presets_may_add_keys():
    from siamese.cli import check_group_overrides

    check_group_overrides(["trainer=cpu", "trainer.max_epochs=3"])  # from trainer/default.yaml
    check_group_overrides(["logger=many", "logger.wandb.project=x"])
    # A key added earlier on the line (a resumed run's own +key) may then be changed.
    check_group_overrides(["+trainer.val_check_interval=1.0", "trainer.val_check_interval=0.5"])

    check_group_overrides(["model=convnet", "model.hidden_dims=[64]"])
    check_group_overrides(["model=resnet18", "model.small_input=false"])
    check_group_overrides(["logger=many", "logger.csv.name=x"])  # its files come with it
    check_group_overrides(["experiment=mnist_triplet", "model=resnet18", "model.hidden_dims=[1]"])


def test_values_of_the_right_kind_pass_the_value_check():
    from siamese.cli import check_value_overrides

    check_value_overrides(
        [
            "optimizer.lr=1e-3",  # an int where a float is, null, interpolations, sweeps
            "trainer.max_epochs=null",
            "trainer.limit_train_batches=0.25",
            "optimizer.lr=${seed}",
            "seed=range(1,4)",
            "optimizer.lr=tag(log,interval(1e-4,1e-1))",
            "model.hidden_dims=[]",
            "trainer.devices=auto",  # 2 or auto: more than one kind, left to Lightning
            "+seed2=abc",
            "data.source.val_classes=3",
            "data.image_size=[28,32]",  # a number, or a list of numbers ([H, W])
            "model.hidden_dims=[${model.embedding_dim},128]",  # interpolated items
            "model.compile={mode:max-autotune}",  # bools whose owner takes more (NOT_ONLY_BOOL)
            "logger.log_model=all",
            "trainer.deterministic=warn",
            "callbacks.model_checkpoint.save_last=link",
        ]
    )


@pytest.mark.slow  # ~8 s: composes every config (default suite under 5 minutes)
def test_every_key_a_composed_config_has_passes_the_key_check():
    """No false alarm: every key of the train, evaluate and export configs, with each
    experiment and preset, is accepted (new keys with +, hydra.* and groups are Hydra's)."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from siamese.cli import check_key_overrides, check_value_overrides

    # Every option of every group at least once, in as few compositions as that takes.
    choices = [("train", []), ("evaluate", ["index=ivf"]), ("evaluate", ["index=hnsw"])]
    choices += [("export", [])]
    for group in ("experiment", "debug"):
        choices += [("train", [f"{group}={p.stem}"]) for p in sorted((CONF / group).glob("*.yaml"))]
    choices += [
        ("train", ["model=koch", "loss=contrastive", "distance=cosine", "data=omniglot"]),
        ("train", ["model=resnet18", "loss=triplet", "data=fashion_mnist", "logger=many"]),
        ("train", ["loss=bce", "distance=learned", "data=kmnist", "logger=tensorboard"]),
        ("train", ["data=image_folder", "logger=wandb", "optimizer=sgd", "scheduler=cosine"]),
        ("train", ["data=mnist", "model=convnet"]),
        ("train", ["trainer=ddp", "logger=many"]),  # options with defaults
        ("train", ["trainer=cpu"]),
        ("train", ["trainer=gpu", "loss=multi_similarity"]),
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        for name, overrides in choices:
            cfg = OmegaConf.to_container(compose(name, overrides=overrides))
            keys = list(flat_keys(cfg))
            assert len(keys) > 5, (name, overrides)
            check_key_overrides([*overrides, *(f"{k}=1" for k in keys)])  # exits on a false alarm
            values = [f"{k}={as_override(v)}" for k, v in flat_items(cfg) if not is_text(v)]
            check_value_overrides(values)  # the values the configs hold pass too
    check_key_overrides(["+trainer.foo=1", "++x.y=2", "~logger", "hydra.run.dir=d", "-m"])


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_bad_input_is_one_line_and_exit_2(tmp_path):
    # Independent commands, run side by side (start-up is most of each one's time).
    procs = run_scripts(
        [
            (
                "train.py",
                [
                    *args,
                    f"hydra.run.dir={tmp_path / name}",
                    f"hydra.sweep.dir={tmp_path / name / 'sweep'}",
                ],
            )
            for name, (args, _) in BAD_INPUT.items()
        ]
    )
    for (name, (_, expected)), proc in zip(BAD_INPUT.items(), procs, strict=True):
        assert expected in one_line_error(proc), name


@pytest.mark.slow  # two train.py runs and a 2-job sweep, ~15 s
def test_train_py_end_to_end_multirun_and_never_overwriting_a_run(tmp_path):
    # Independent commands side by side: one run, and a two-job sweep.
    run_dir, sweep = tmp_path / "run", tmp_path / "sweep"
    proc, swept = run_scripts(
        [
            ("train.py", [*FAST, f"hydra.run.dir={run_dir}"]),
            (
                "train.py",
                [
                    "-m",
                    "loss=contrastive,triplet",
                    *FAST,
                    "trainer.limit_train_batches=1",
                    f"hydra.sweep.dir={sweep}",
                ],
            ),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "precision_at_1" in proc.stdout and "roc_auc" in proc.stdout  # the printed table
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    first = (run_dir / "metrics.json").read_text()
    config = (run_dir / ".hydra" / "config.yaml").read_text()

    # A second run there, and one started from another run's weights (a new run too), are
    # both refused; run side by side.
    again, other = run_scripts(
        [
            ("train.py", [*FAST, "seed=7", f"hydra.run.dir={run_dir}"]),
            ("train.py", [f"ckpt_path={tmp_path / 'other.ckpt'}", f"hydra.run.dir={run_dir}"]),
        ]
    )
    assert "already holds a run" in one_line_error(again)
    assert "already holds a run" in one_line_error(other)
    assert (run_dir / "metrics.json").read_text() == first
    assert (run_dir / ".hydra" / "config.yaml").read_text() == config

    # The sweep: each job in its own directory, and a summary with one row per run.
    assert swept.returncode == 0, swept.stderr[-3000:]
    for job in ("0", "1"):
        report = json.loads((sweep / job / "metrics.json").read_text())
        assert 0.0 <= report["test/precision_at_1"] <= 1.0
    overrides = (sweep / "1" / ".hydra" / "overrides.yaml").read_text()
    assert "loss=triplet" in overrides
    with (sweep / "sweep_summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["loss"], r["status"]) for r in rows] == [
        ("0", "contrastive", "done"),
        ("1", "triplet", "done"),
    ]
    for row in rows:
        report = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row["test/map_at_r"]) == pytest.approx(report["test/map_at_r"])
        assert float(row["val/precision_at_1"]) == pytest.approx(report["val/precision_at_1"])
    assert "sweep summary (2 runs" in swept.stdout


def test_resume_continues_at_the_saved_epoch_and_auto_picks_the_newest(make_cfg, tmp_path):
    # The first run is planned for 2 epochs but stops after one, as a killed run would.
    # ckpt_path=auto (what a requeued job runs every time) finds nothing yet: a fresh start.
    stop_after_first_epoch = [
        "+callbacks.stop._target_=pytorch_lightning.callbacks.EarlyStopping",
        "+callbacks.stop.monitor=val/precision_at_1",
        "+callbacks.stop.mode=max",
        "+callbacks.stop.stopping_threshold=0.0",
    ]
    first = make_cfg("ckpt_path=auto", "trainer.max_epochs=2", *stop_after_first_epoch)
    # As train.py runs it: Hydra knows the command's overrides, and each checkpoint keeps them.
    command = ["trainer.max_epochs=2", "~callbacks.plots", "model.hidden_dims=[64]"]
    command += ["+callbacks.extra.x=1", "ckpt_path=auto", "hydra.run.dir=RUN"]
    hydra_node = OmegaConf.structured(HydraConf)
    hydra_node.overrides.task = command
    HydraConfig.instance().set_config(OmegaConf.create({"hydra": hydra_node}))
    try:
        run_training(first)
    finally:
        HydraConfig.instance().cfg = None
    out = Path(first.paths.output_dir)
    last = out / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 3
    assert saved["run_overrides"] == command
    # train.py hydra.run.dir=RUN ckpt_path=last composes them again (the command's own win).
    # +callbacks.extra.x is a key no config file has: replayed only with the command's say-so.
    untrusted = [f"hydra.run.dir={out}", "ckpt_path=last", "seed=3"]
    max2, no_plots, hidden, extra = command[:4]
    assert with_saved_overrides(untrusted) == [max2, no_plots, hidden, *untrusted, "hydra.mode=RUN"]
    resume = [*untrusted, "resume.trust_overrides=true"]
    one_run = "hydra.mode=RUN"  # a sweep's job resumes as one run
    assert with_saved_overrides(resume) == [max2, no_plots, hidden, extra, *resume, one_run]
    five = [*resume, "trainer.max_epochs=5"]
    assert with_saved_overrides(five) == [no_plots, hidden, extra, *five, one_run]
    assert with_saved_overrides(["-m", *resume]) == ["-m", *resume]  # sweeps: as given
    # Another option of a group keeps the run's keys that it has too (trainer/cpu.yaml
    # extends default) and drops those it lacks (resnet18 has no hidden_dims).
    cpu = [*resume, "trainer=cpu"]
    assert with_saved_overrides(cpu) == [max2, no_plots, hidden, extra, *cpu, one_run]
    resnet = [*resume, "model=resnet18"]
    assert with_saved_overrides(resnet) == [max2, no_plots, extra, *resnet, one_run]
    # The run's +key stays before the command's plain key (added, then changed); the
    # command's own +key replaces it.
    change = [*resume, "callbacks.extra.x=2"]
    assert with_saved_overrides(change) == [max2, no_plots, hidden, extra, *change, one_run]
    add = [*resume, "+callbacks.extra.x=2"]
    assert with_saved_overrides(add) == [max2, no_plots, hidden, *add, one_run]
    # A deletion applies after the run's overrides; one the command repeats is not made twice.
    drop = [*resume, "~trainer"]
    assert with_saved_overrides(drop) == [max2, no_plots, hidden, extra, *drop, one_run]
    again = [*resume, "~callbacks.plots"]
    assert with_saved_overrides(again) == [max2, hidden, extra, *again, one_run]
    # A group choice keeps the run's keys (and deletions) under it that the option has, and
    # drops the rest: +callbacks.extra is not in callbacks/default.yaml.
    assert with_saved_overrides([*resume, "callbacks=default"]) == [
        max2,
        no_plots,
        hidden,
        *resume,
        "callbacks=default",
        one_run,
    ]
    assert with_saved_overrides([f"hydra.run.dir={out}", "seed=3"]) == [
        f"hydra.run.dir={out}",
        "seed=3",
    ]

    # auto takes the newest checkpoint there: last.ckpt, or the hpc_ckpt_N.ckpt that
    # Lightning's SLURM requeue signal writes.
    hpc = out / "hpc_ckpt_1.ckpt"
    shutil.copy(last, hpc)
    os.utime(last, ns=(1, 1))
    assert resolve_ckpt_path("auto", out) == str(hpc)
    hpc.unlink()
    assert resolve_ckpt_path("auto", out) == str(last)
    assert resolve_ckpt_path("auto", tmp_path / "empty") is None

    run_training(make_cfg("ckpt_path=last", "trainer.max_epochs=2"))
    resumed = torch.load(last, weights_only=True)
    # Three more steps, not six: the resumed run picked up after its first epoch.
    assert resumed["global_step"] == 6
    # Saved at the second epoch's end (LastCheckpoint, in on_train_epoch_end: Lightning
    # counts the epoch processed there and completed just after).
    assert resumed["epoch"] == 1
    assert resumed["loops"]["fit_loop"]["epoch_progress"]["total"]["processed"] == 2
    assert resumed["lr_schedulers"][0]["total_steps"] == 6  # the same one-cycle plan

    # The run-directory guard lets ckpt_path=auto and last into a directory with a run.
    def guard(ckpt_path: str | None) -> None:
        config = {"hydra": {"run": {"dir": str(out)}}, "ckpt_path": ckpt_path}
        RunDirGuard().on_run_start(OmegaConf.create(config))

    guard("auto")
    guard("last")
    with pytest.raises(SystemExit):
        guard(None)


def test_a_used_run_directory_is_refused_with_a_hint_for_the_task(tmp_path, capsys):
    """evaluate.py and export.py have nothing to resume: their line offers no ckpt_path=last.
    An export's folder (model.json) is a used directory too, unless the checkpoint is in it."""
    (tmp_path / "ev").mkdir()
    (tmp_path / "ev" / "metrics.json").write_text("{}")
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "model.json").write_text("{}")

    def guard(task: str, run_dir: Path, ckpt_path: str | None = "/elsewhere/best.ckpt"):
        config = {"hydra": {"run": {"dir": str(run_dir)}}, "task_name": task}
        RunDirGuard().on_run_start(OmegaConf.create({**config, "ckpt_path": ckpt_path}))

    expected = {
        ("train", "ev"): f"error: hydra.run.dir={str(tmp_path / 'ev')!r} already holds a run "
        "(metrics.json); choose another hydra.run.dir, or pass ckpt_path=last to resume that "
        "run (nothing in it was changed)",
        ("evaluate", "ev"): f"error: hydra.run.dir={str(tmp_path / 'ev')!r} already holds a run "
        "(metrics.json); choose another hydra.run.dir (nothing in it was changed)",
        ("export", "ex"): f"error: hydra.run.dir={str(tmp_path / 'ex')!r} already holds a run "
        "(model.json); choose another hydra.run.dir (nothing in it was changed)",
    }
    for (task, folder), line in expected.items():
        with pytest.raises(SystemExit) as stopped:
            guard(task, tmp_path / folder)
        assert stopped.value.code == 2
        assert capsys.readouterr().err.splitlines() == [line]
    guard("export", tmp_path / "ex", str(tmp_path / "ex" / "checkpoints" / "best.ckpt"))
    assert (tmp_path / "ex" / "model.json").read_text() == "{}"


@pytest.mark.slow  # ~4 s: a fit then a resume (default suite under 5 minutes)
def test_resume_with_another_schedule_length_is_refused(make_cfg):
    run_training(make_cfg())
    with pytest.raises(ConfigError, match="planned for 3 steps, but this run plans 6"):
        run_training(make_cfg("ckpt_path=last", "trainer.max_epochs=2"))


def test_ctrl_c_outside_training_is_one_line_and_exit_130(capsys):
    """evaluate.py, export.py, or train.py before fitting: no traceback wall."""
    from siamese.cli import report_errors

    def job() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        report_errors(job)()
    assert stopped.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "stopped: Ctrl-C (SIGINT) before the run finished; run it again to start over"
    ]


@pytest.mark.parametrize(
    ("argv", "line"),
    [
        (
            ["data.augment.brightness=0.3"],  # the default data's augment is the affine one
            "data.augment.brightness is not a key of data/augment=affine_digits (data.augment "
            "has: _target_, degrees, elastic_alpha, elastic_sigma, hflip, p, padding_mode, "
            "scale, shear, translate); data/augment=photo has it",
        ),
        (
            ["data=image_folder", "data/augment=photo", "data.augment.degrees=3"],
            "data.augment.degrees is not a key of data/augment=photo (data.augment has: "
            "_target_, brightness, contrast, hflip, hue, p_jitter, ratio, saturation, scale, "
            "size); data/augment=affine_digits or affine_omniglot or affine_photos has it",
        ),
    ],
)
def test_a_key_of_another_option_of_a_nested_group_is_one_line(argv, line, capsys):
    with pytest.raises(SystemExit):
        check_group_overrides(argv)
    assert capsys.readouterr().err.strip() == f"error: {line}"
    # The keys of the chosen option pass (the check leaves values to the next checks).
    check_group_overrides(["data=image_folder", "data/augment=photo", "data.augment.hue=0.05"])
    check_group_overrides(["experiment=photos_finetune", "data.augment.hue=0.05"])
