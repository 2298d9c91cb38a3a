"""Training end to end on the embedded data: run dir files, metrics.json, checkpoints, load."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
from helpers import assert_fragments, tiny_model

import siamese
from siamese.errors import ConfigError, DataError
from siamese.pipelines.train import REPORTED, run_training

# The embedded digits have 10 classes: 20-way one-shot is left out (DESIGN: "where the
# split has at least 20 classes"); test_presets checks it on 20 Omniglot characters.
CONTRACT_KEYS = {f"test/{k}" for k in REPORTED if k != "oneshot_20way_1shot"}


@pytest.fixture(scope="module")
def trained(fast_run):
    """A short default run (conftest's ``fast_run``, shared with export's tests)."""
    return fast_run


@pytest.fixture(scope="module")
def four_epochs(tmp_path_factory):
    """Four full epochs of the default run, for the slow test that training beats none."""
    from helpers import FAST, compose_train

    out = tmp_path_factory.mktemp("run")
    # Four full epochs: enough for the default loss to clearly beat an untrained tower.
    cfg = compose_train([*FAST, "trainer.max_epochs=4", "trainer.limit_train_batches=null"], out)
    metrics = run_training(cfg)
    return out, metrics


@pytest.fixture(scope="module")
def untrained(tmp_path_factory):
    """Test metrics of the same model, freshly initialised: training must beat them."""
    import pytorch_lightning as pl
    from helpers import FAST, compose_train
    from hydra.utils import instantiate

    from siamese.pipelines.train import build_module

    cfg = compose_train(FAST, tmp_path_factory.mktemp("untrained"))
    pl.seed_everything(cfg.seed)
    dm = instantiate(cfg.data)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (result,) = trainer.test(build_module(cfg, dm), datamodule=dm, verbose=False)
    return result


@pytest.mark.slow  # four full epochs (~40 s); the default suite stays under 5 minutes
def test_default_run_writes_checkpoints_and_metrics(four_epochs, untrained):
    out, metrics = four_epochs
    assert (out / "checkpoints" / "best.ckpt").is_file()
    # last.ckpt is the last epoch's end, whichever epoch was best (Lightning 2.6's own
    # save_last would leave it at the best one).
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (3, 4 * 21)  # 3,500 train images / 160
    report = json.loads((out / "metrics.json").read_text())
    assert CONTRACT_KEYS <= set(report)
    assert report["protocol"].startswith("leave-one-out")
    for key in CONTRACT_KEYS:
        assert isinstance(report[key], float) and math.isfinite(report[key]), key
        assert report[key] == pytest.approx(metrics[key])
    # Random conv features already find a same-class nearest neighbour for most digits
    # (p@1 about 0.78) but rank whole classes poorly (MAP@R about 0.2, ROC-AUC 0.76). Four
    # epochs of a schedule planned for 20 lift the class-level ranking clearly (MAP@R about
    # 0.46, ROC-AUC 0.87); p@1 is still around the random features' (0.75-0.84 by seed) and
    # only passes them later (0.98 after 20 epochs), so it is not asserted here.
    assert report["test/map_at_r"] > untrained["test/map_at_r"] + 0.15
    assert report["test/roc_auc"] > untrained["test/roc_auc"] + 0.08
    assert {"val/precision_at_1", "val/roc_auc", "val/loss", "train/loss"} <= set(metrics)
    # Step values reach the log at Lightning's trainer.log_every_n_steps steps (10 here),
    # epoch means once an epoch; train/loss for callbacks is the last epoch's mean.
    with (out / "csv" / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    steps = list(range(9, 84, 10))
    assert [int(r["step"]) for r in rows if r.get("train/loss_step")] == steps
    assert [int(r["step"]) for r in rows if r.get("train/images_per_sec")] == steps
    epochs = [r for r in rows if r.get("train/loss_epoch")]
    assert [int(r["epoch"]) for r in epochs] == [0, 1, 2, 3]
    assert float(epochs[-1]["train/loss_epoch"]) == pytest.approx(metrics["train/loss"])


def test_checkpoint_rebuilds_the_model_from_the_file_alone(trained):
    out, _ = trained
    model = siamese.load(out / "checkpoints" / "best.ckpt")
    assert not model.training and math.isfinite(float(model.threshold))
    images = torch.rand(6, 1, 28, 28)
    emb = model.embed(images)
    assert emb.shape == (6, 64)
    assert torch.allclose(emb.norm(dim=1), torch.ones(6), atol=1e-5)  # normalised euclidean
    dist = model.compare(images, images.flip(0))
    assert dist.shape == (6,) and torch.allclose(dist, dist.flip(0), atol=1e-5)
    assert torch.allclose(model.compare(images, images), torch.zeros(6), atol=1e-3)
    assert model.same(images, images).all()
    hp = model.hparams
    assert hp.tower["in_channels"] == 1 and hp.tower["image_size"] == [28, 28]
    assert hp.config["data"]["source"]["_target_"].endswith("MNISTSubset")


def test_same_checkpoint_always_scores_the_same(trained):
    """Val/test pairs are fixed: re-testing the checkpoint reproduces metrics.json exactly."""
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    out, _ = trained
    report = json.loads((out / "metrics.json").read_text())
    model = siamese.load(report["checkpoint"])
    cfg = model.hparams.config
    dm = instantiate(cfg["data"])
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False)
    (result,) = trainer.test(model, datamodule=dm, verbose=False)
    for key in CONTRACT_KEYS:
        assert result[key] == pytest.approx(report[key], abs=1e-6), key


@pytest.mark.parametrize(
    "overrides",
    [
        # Three of the variants run with -m slow: the default suite stays under 5 minutes.
        pytest.param(
            ["loss=triplet", "loss.mining=semi_hard", "model.embedding_dim=32"],
            marks=pytest.mark.slow,
        ),
        pytest.param(
            ["distance=cosine", "loss=contrastive", "loss.margin=0.6"], marks=pytest.mark.slow
        ),
        pytest.param(["distance=cosine"], marks=pytest.mark.slow),
        ["distance=learned", "loss=bce"],
        ["loss=contrastive", "data.pair_mode=explicit", "data.batch_size=64"],
        pytest.param(
            [
                "model=resnet18",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
                "data.eval_batch_size=200",
            ],
            marks=pytest.mark.slow,  # ~15 s
        ),
    ],
    ids=[
        "triplet-semihard",
        "cosine-contrastive",
        "cosine-multi-similarity",
        "learned-bce",
        "explicit-pairs",
        "resnet18",
    ],
)
def test_variants_train_and_test(make_cfg, overrides):
    metrics = run_training(make_cfg(*overrides, "trainer.limit_train_batches=2"))
    assert CONTRACT_KEYS <= set(metrics)
    assert all(math.isfinite(metrics[k]) for k in CONTRACT_KEYS)


def test_bad_inputs_fail_with_one_clear_error(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="model.embedding_dim must be a positive integer, got 0"):
        run_training(make_cfg("model.embedding_dim=0"))
    with pytest.raises(ConfigError, match=r"shrinks the .* input"):
        run_training(make_cfg("data.image_size=3"))  # 3 -> 1 -> 0
    with pytest.raises(DataError, match="does not exist"):
        run_training(make_cfg("data=image_folder", f"data.root={tmp_path / 'nope'}"))
    with pytest.raises(ConfigError, match="ckpt_path='last'"):
        run_training(make_cfg("ckpt_path=last"))
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable checkpoint"):
        run_training(make_cfg(f"ckpt_path={bad}"))


def test_a_damaged_last_checkpoint_names_best_ckpt_to_resume_from(tmp_path):
    from siamese.pipelines.train import resolve_ckpt_path

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    (folder / "last.ckpt").write_bytes(b"")
    # What Lightning needs to go on training, and nothing more.
    resumable = {"state_dict": {}, "epoch": 3, "global_step": 9, "loops": {}}
    resumable |= {"optimizer_states": [], "lr_schedulers": [], "pytorch-lightning_version": "2.6"}
    torch.save(resumable, folder / "best.ckpt")
    for mode in ("last", "auto"):
        with pytest.raises(ConfigError) as err:
            resolve_ckpt_path(mode, tmp_path)
        assert_fragments(
            str(err.value),
            f"ckpt_path={mode}: ckpt_path={str(folder / 'last.ckpt')!r}",
            "is not a readable checkpoint",
            "(0 bytes; EOFError)",
            f"resume from the best epoch instead: ckpt_path={folder / 'best.ckpt'}",
        )
    assert resolve_ckpt_path(str(folder / "best.ckpt"), tmp_path) == str(folder / "best.ckpt")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_and_evaluation_steps_skip_the_input_checks(monkeypatch):
    import siamese.module

    def refuse(*args, **kwargs):
        raise AssertionError("a training or evaluation step checked its input")

    model = tiny_model().train()
    monkeypatch.setattr(siamese.module, "check_images", refuse)
    images, labels = torch.rand(4, 1, 6, 6), torch.tensor([0, 0, 1, 1])
    out, count = model._shared_step((images, labels))
    assert count == 4 and math.isfinite(out.loss.item())
    out, count = model._shared_step((images[:2], images[2:], torch.tensor([True, False])))
    assert count == 4 and math.isfinite(out.loss.item())
    model._eval_step((images, labels), "val")
    assert model._outputs[0][0].shape == (4, 4)


@pytest.mark.parametrize("reshuffle", [True, False])
def test_each_epoch_draws_new_batches_unless_reshuffle_is_off(make_cfg, reshuffle, monkeypatch):
    """Lightning gives set_epoch to a loader's sampler only; the module hands it to ours."""
    import pytorch_lightning as pl

    import siamese.pipelines.train as train_pipeline

    firsts: list[torch.Tensor] = []

    class FirstBatch(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx == 0:
                firsts.append(batch[0].detach().clone())

    original = train_pipeline.instantiate_all
    monkeypatch.setattr(
        train_pipeline, "instantiate_all", lambda group: [*original(group), FirstBatch()]
    )
    cfg = make_cfg(
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=1",
        "test=false",
        "data.augment=null",
        f"data.reshuffle={reshuffle}",
    )
    run_training(cfg)
    assert len(firsts) == 3
    repeats = [torch.equal(firsts[0], other) for other in firsts[1:]]
    assert repeats == ([False, False] if reshuffle else [True, True])


def test_trainer_check_refuses_missing_devices_and_moves_fp16_off_the_cpu(make_cfg, caplog):
    import os

    from siamese.pipelines.train import check_trainer

    cfg = make_cfg("trainer.precision=16-mixed", "trainer.accelerator=cpu")
    with caplog.at_level("WARNING", logger="siamese.pipelines.train"):
        checked = check_trainer(cfg.trainer)
    assert checked.precision == "bf16-mixed" and cfg.trainer.precision == "16-mixed"
    assert checked.default_root_dir == cfg.trainer.default_root_dir  # resolved, not lost
    assert [r.getMessage() for r in caplog.records] == [
        "trainer.precision=16-mixed needs a GPU; training in bf16-mixed on the CPU instead"
    ]
    assert check_trainer(make_cfg().trainer).precision == "32-true"
    too_many = (os.cpu_count() or 1) + 1
    with pytest.raises(ConfigError, match=rf"trainer.devices={too_many} but this machine has"):
        check_trainer(make_cfg(f"trainer.devices={too_many}").trainer)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="trainer.accelerator=gpu but no CUDA GPU"):
            check_trainer(make_cfg("trainer.accelerator=gpu").trainer)
        with pytest.raises(
            ConfigError, match=r"devices=\[0, 1\] lists device ids, which only GPUs"
        ):
            check_trainer(make_cfg("trainer.accelerator=cpu", "trainer.devices=[0,1]").trainer)
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=rf"trainer.devices={bad} is not a number of devices"):
            check_trainer(make_cfg(f"trainer.devices={bad}").trainer)


def test_trainer_check_on_a_machine_with_two_gpus(make_cfg, monkeypatch):
    from siamese.pipelines.train import check_trainer, planned_processes

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = ["trainer.accelerator=gpu"]
    assert planned_processes(check_trainer(make_cfg(*gpu, "trainer.devices=[1,0]").trainer)) == 2
    assert planned_processes(check_trainer(make_cfg(*gpu, "trainer.devices=-1").trainer)) == 2
    for ids in ("[0,2]", "[1,1]", "[]"):
        with pytest.raises(ConfigError, match="must list distinct GPU ids from 0 to 1"):
            check_trainer(make_cfg(*gpu, f"trainer.devices={ids}").trainer)
    with pytest.raises(ConfigError, match="trainer.devices=3 but this machine has 2 GPUs"):
        check_trainer(make_cfg(*gpu, "trainer.devices=3").trainer)


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ("trainer.precision=foo", "Precision 'foo' is invalid. Allowed precision values"),
        ("trainer.strategy=fsdpx", "You selected an invalid strategy name: `strategy='fsdpx'`"),
        ("trainer.devices=abc", "`devices` selected with `CPUAccelerator` should be an int > 0"),
    ],
)
def test_a_trainer_value_lightning_refuses_is_one_config_error(make_cfg, override, reason):
    from siamese.pipelines.train import build_trainer

    cfg = make_cfg("trainer.accelerator=cpu", override)
    with pytest.raises(ConfigError) as refused:
        build_trainer(cfg.trainer, logger=False)
    message = str(refused.value)
    assert message.startswith("Lightning refused the trainer config: ") and reason in message
    assert "\n" not in message


def test_the_trainer_is_checked_before_any_data_is_read(make_cfg, tmp_path):
    """A folder that does not exist would be refused too, but only once it is read: the
    trainer's refusal comes first, without waiting for the data."""
    from siamese.pipelines.train import run_training

    cfg = make_cfg(
        "trainer.precision=foo", "data=image_folder", f"data.root={tmp_path / 'missing'}"
    )
    with pytest.raises(ConfigError, match="^Lightning refused the trainer config: Precision"):
        run_training(cfg)


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_same_config_and_seed_give_identical_results_twice_in_a_row(tmp_path):
    # The default trainer (deterministic=false) on the CPU, with augmentation and shuffling:
    # the same numbers to the last bit, not merely close ones.
    from helpers import FAST, compose_train

    runs = []
    for name in ("first", "second"):
        cfg = compose_train(
            [*FAST, "trainer.max_epochs=2", "trainer.limit_train_batches=4"], tmp_path / name
        )
        metrics = run_training(cfg)
        ckpt = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)
        runs.append((metrics, ckpt["state_dict"]))
    (first, weights1), (second, weights2) = runs
    tested = sorted(k for k in first if k.startswith(("test/", "val/")))
    assert len(tested) >= 20
    assert {k: first[k] for k in tested} == {k: second[k] for k in tested}
    for name, value in weights1.items():
        assert torch.equal(value, weights2[name]), name
