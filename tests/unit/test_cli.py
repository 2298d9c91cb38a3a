"""The command line as a user meets it: one-line errors, run directories, resume."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from hydra.conf import HydraConf
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from siamese.cli import hydra_error_line
from siamese.composition import composed
from siamese.errors import ConfigError
from siamese.hydra_callbacks import RunDirGuard
from siamese.pipelines.train import resolve_ckpt_path, run_training
from siamese.resume import with_saved_overrides
from siamese.task import TaskExit


def refusal(*overrides: str, config: str = "train") -> str:
    """The one line siamese.cli makes of Hydra's refusal to compose ``overrides``."""
    with pytest.raises(Exception) as raised:
        composed(config, overrides)
    line = hydra_error_line(raised.value, config, list(overrides))
    assert line is not None and "\n" not in line, raised.value
    return line


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (
            "trainer.max_epoch=3",
            [
                "trainer.max_epoch is not a key of trainer=default",
                "did you mean trainer.max_epochs?",
            ],
        ),
        (
            "model=resnet18 model.hidden_dims=[128]",
            [
                "model.hidden_dims is not a key of model=resnet18",
                "embedding_dim, freeze_bn,",
                "model=convnet or koch has it",
                "(+model.hidden_dims=[128] would add",
            ],
        ),
        (
            "model=resnet18 model.layers.0.out_channels=8",
            [
                "model.layers is not a key of model=resnet18",
                "(+model.layers.0.out_channels=8 would",
            ],
        ),
        (
            "optimizer.learning_rate=0.1",
            [
                "optimizer.learning_rate is not a key of optimizer=adamw",
                "optimizer has: _partial_, _target_, lr, weight_decay",
            ],
        ),
        ("seed2=1", ["seed2 is not a key of train.yaml", "did you mean seed?", "(+seed2=1 would"]),
        (
            "model=transformer",
            ["unknown model=transformer; choose one of: convnet, koch, resnet18, timm"],
        ),
        (
            "loss=tripplet",
            ["unknown loss=tripplet; did you mean loss=triplet? choose one of: bce, "],
        ),
        ("scheduler=null", ["scheduler=null cannot drop a config group; write ~scheduler"]),
        # The keys of train.yaml itself, whole (not cut after the first letter).
        ("foo=1", ["foo is not a key of train.yaml (it has: callbacks, checkpoints, ckpt_path,"]),
        (
            "~model.dropout",
            ["~model.dropout: a key of a typed config cannot be removed", "(model.dropout=...)"],
        ),
        ("~data.augment", ["~data/augment drops the group", "(data.augment=...)"]),
    ],
)
def test_a_key_or_option_no_config_has_is_one_line(args, fragments):
    line = refusal("trainer.max_epochs=2", *args.split(), "seed=1")
    for fragment in fragments:
        assert fragment in line, line


@pytest.mark.parametrize(
    ("arg", "fragments"),
    [
        ("optimizer.lr=abc", ["optimizer.lr=abc is not a number", "write e.g. optimizer.lr=0.01"]),
        ("seed=abc", ["seed=abc is not a whole number", "write e.g. seed=42"]),
        (
            "trainer.max_epochs=ten",
            ["trainer.max_epochs=ten is not a whole number", "e.g. trainer.max_epochs=20"],
        ),
        ("trainer.max_epochs=1.5", ["trainer.max_epochs=1.5 is not a whole number"]),
        ("test=maybe", ["test=maybe is not true or false", "write e.g. test=true"]),
        (
            "model.hidden_dims=128",
            [
                "model.hidden_dims=128 is not a list of whole numbers",
                "e.g. model.hidden_dims=[256]",
            ],
        ),
        ("model.hidden_dims=[128,x]", ["model.hidden_dims=[128,x] is not a list of whole numbers"]),
        ("eval_pairs=[1]", ["eval_pairs=[1] is not a whole number", "e.g. eval_pairs=50000"]),
        (
            "data.augment.degrees=[5,10]",
            ["data.augment.degrees=[5,10] is not a number", "e.g. data.augment.degrees=10.0"],
        ),
    ],
)
def test_a_value_of_the_wrong_type_is_one_line(arg, fragments):
    line = refusal("trainer.max_epochs=2", arg, "seed=1")
    for fragment in fragments:
        assert fragment in line, line


def test_eval_settings_have_types_too():
    assert "eval.oneshot.ways=5 is not a list of whole numbers" in refusal(
        "eval.oneshot.ways=5", config="evaluate"
    )
    assert "export.opset=x is not a whole number" in refusal("export.opset=x", config="export")


def test_keys_of_the_chosen_option_values_of_the_right_type_and_added_keys_compose():
    for overrides in [
        ["trainer=cpu", "trainer.max_epochs=3"],  # from trainer/default.yaml
        ["logger=many", "logger.wandb.project=x", "logger.csv.name=x"],
        # A key added earlier on the line (a resumed run's own +key) may then be changed.
        ["+trainer.val_check_interval=1.0", "trainer.val_check_interval=0.5"],
        ["model=convnet", "model.hidden_dims=[64]"],
        ["model=resnet18", "model.small_input=false"],
        ["experiment=mnist_triplet", "model=resnet18"],
        ["data=image_folder", "data/augment=photo", "data.augment.hue=0.05"],
        ["experiment=photos_finetune", "data.augment.hue=0.05"],
        [
            "optimizer.lr=1e-3",  # an int where a float is, null, interpolations
            "trainer.max_epochs=null",
            "trainer.limit_train_batches=0.25",
            "optimizer.lr=${seed}",
            "model.hidden_dims=[]",
            "trainer.devices=auto",  # 2 or auto: more than one kind, left to Lightning
            "+seed2=abc",
            "data.source.val_size=3",
            "data.image_size=[28,32]",  # a number, or a list of numbers ([H, W])
            "model.hidden_dims=[${model.embedding_dim},128]",  # interpolated items
            "model.compile={mode:max-autotune}",  # bools whose owner takes more
            "trainer.deterministic=warn",
            "callbacks.model_checkpoint.save_last=link",
        ],
        ["logger=wandb", "logger.log_model=all"],
    ]:
        composed("train", tuple(overrides))
    assert composed("train", ("optimizer.lr=1",)).optimizer.lr == 1.0  # as a float


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
    with pytest.raises(TaskExit, match="already holds a run"):
        guard(None)


def test_a_used_run_directory_is_refused_with_a_hint_for_the_task(tmp_path):
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
        ("train", "ev"): f"hydra.run.dir={str(tmp_path / 'ev')!r} already holds a run "
        "(metrics.json); choose another hydra.run.dir, or pass ckpt_path=last to resume that "
        "run (nothing in it was changed)",
        ("evaluate", "ev"): f"hydra.run.dir={str(tmp_path / 'ev')!r} already holds a run "
        "(metrics.json); choose another hydra.run.dir (nothing in it was changed)",
        ("export", "ex"): f"hydra.run.dir={str(tmp_path / 'ex')!r} already holds a run "
        "(model.json); choose another hydra.run.dir (nothing in it was changed)",
    }
    for (task, folder), line in expected.items():
        with pytest.raises(TaskExit) as refused:  # Hydra would swallow an Exception
            guard(task, tmp_path / folder)
        assert refused.value.line == f"error: {line}"
    guard("export", tmp_path / "ex", str(tmp_path / "ex" / "checkpoints" / "best.ckpt"))
    assert (tmp_path / "ex" / "model.json").read_text() == "{}"


@pytest.mark.slow  # ~4 s: a fit then a resume (default suite under 5 minutes)
def test_resume_with_another_schedule_length_is_refused(make_cfg):
    run_training(make_cfg())
    with pytest.raises(ConfigError, match="planned for 3 steps, but this run plans 6"):
        run_training(make_cfg("ckpt_path=last", "trainer.max_epochs=2"))


def test_ctrl_c_outside_training_is_one_line_and_exit_130(capsys):
    """evaluate.py, export.py, or train.py before fitting: no traceback wall."""
    from siamese.task import run, task_wrapper

    @task_wrapper
    def job() -> None:
        raise KeyboardInterrupt

    with pytest.raises(SystemExit) as stopped:
        run(job, "train", [])
    assert stopped.value.code == 130
    assert capsys.readouterr().err.splitlines() == [
        "stopped: Ctrl-C (SIGINT) before the run finished; run it again to start over"
    ]


def test_the_task_wrapper_makes_user_errors_and_hydra_refusals_one_line(capsys):
    from siamese.task import run, task_wrapper

    @task_wrapper
    def job() -> None:
        raise ConfigError("seed=-1 is not a seed; use an integer from 0 to 4294967295")

    def main() -> None:  # as hydra.main: the composition refuses the command line first
        composed("train", ("optimizer.lr=abc",))

    for fn, argv, line in [
        (job, [], "error: seed=-1 is not a seed; use an integer from 0 to 4294967295"),
        (main, ["optimizer.lr=abc"], "error: optimizer.lr=abc is not a number"),
    ]:
        with pytest.raises(SystemExit) as stopped:
            run(fn, "train", argv)
        assert stopped.value.code == 2
        [printed] = capsys.readouterr().err.splitlines()
        assert printed.startswith(line)

    def bug() -> None:
        raise RuntimeError("a bug keeps its traceback")

    with pytest.raises(RuntimeError):
        run(bug, "train", [])


@pytest.mark.parametrize(
    ("argv", "fragments"),
    [
        (
            ["data.augment.brightness=0.3"],  # the default data's augment is the affine one
            [
                "data.augment.brightness is not a key of data/augment=affine_digits",
                "data.augment has: _target_, degrees, elastic_alpha, elastic_sigma, hflip, p,",
                "; data/augment=photo has it",
            ],
        ),
        (
            ["data=image_folder", "data/augment=photo", "data.augment.degrees=3"],
            [
                "data.augment.degrees is not a key of data/augment=photo",
                "data.augment has: _target_, brightness, contrast, hflip, hue, p_jitter, ratio,",
                "data/augment=affine_digits or affine_omniglot or affine_photos has it",
            ],
        ),
    ],
)
def test_a_key_of_another_option_of_a_nested_group_is_one_line(argv, fragments):
    line = refusal(*argv)
    for fragment in fragments:
        assert fragment in line, line


def test_a_word_split_off_by_an_unquoted_space_names_the_argument_to_quote():
    line = refusal("data.root=my", "photos")
    assert (
        line
        == "photos: not key=value; if it belongs to data.root=my, quote both: 'data.root=my photos'"
    )
