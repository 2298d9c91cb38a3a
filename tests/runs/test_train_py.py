"""train.py run as a user runs it: bad input is one line and exit 2, end to end, multirun."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
import timm
import torch
from helpers import (
    ARCH,
    FAST,
    assert_fragments,
    compose_eval,
    one_line_error,
    run_scripts,
    timm_state,
    tv_state,
    write_folder_with_bad_files,
)

from siamese.pipelines.evaluate import run_evaluation

BAD_INPUT = {
    "unknown-option": (
        ["model=transformer"],
        "unknown model=transformer; choose one of: convnet, koch, resnet18",
    ),
    "unknown-in-sweep": (
        ["-m", "loss=contrastive,tripplet"],
        "unknown loss=tripplet; did you mean loss=triplet? choose one of: bce, ",
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


@pytest.mark.slow  # default suite under 5 minutes: CI runs -m slow too
def test_train_py_skips_or_refuses_bad_files(tmp_path):
    bad = write_folder_with_bad_files(
        tmp_path / "data",
        {"a": (8, ["broken.png"]), "b": (8, []), "c": (8, ["empty.jpg"]), "d": (8, ["x.gif"])},
    )
    (tmp_path / "data" / "c" / "empty.jpg").write_bytes(b"")
    # A FIFO named like an image: reading it used to block train.py and evaluate.py forever.
    os.mkfifo(tmp_path / "data" / "b" / "x.png")
    bad.append(tmp_path / "data" / "b" / "x.png")
    common = [
        *FAST,
        "trainer.limit_train_batches=2",
        "data=image_folder",
        f"data.root={tmp_path / 'data'}",
        "data.image_size=16",
        "data.source.val_fraction=0.25",
        "data.source.test_fraction=0.25",
        "data.batch_size=8",
        "data.samples_per_class=2",
        "data.num_workers=2",
        "model.hidden_dims=[32]",
        "model.embedding_dim=16",
    ]
    # Given input statistics, nothing is read before training: the first read is in
    # Lightning's loaders, in a worker process.
    stats = ["model.input_mean=[0.5,0.5,0.5]", "model.input_std=[0.25,0.25,0.25]"]
    skipped, refused = run_scripts(
        [
            ("train.py", [*common, "data.skip_bad_files=true", f"hydra.run.dir={tmp_path / 'a'}"]),
            ("train.py", [*common, *stats, f"hydra.run.dir={tmp_path / 'b'}"]),
        ]
    )
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    lines = (tmp_path / "a" / "bad_files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(str(p) for p in bad)
    assert (tmp_path / "a" / "metrics.json").is_file()

    # evaluate.py on that checkpoint (its stored data config skips): the unreadable files
    # are left out of every split and listed in the evaluation's own run directory.
    cfg = compose_eval(
        [
            f"ckpt_path={tmp_path / 'a' / 'checkpoints' / 'best.ckpt'}",
            "eval.split=all",
            "eval.k=5",
            "eval.pairs=200",
            "eval.plots=false",
        ],
        tmp_path / "e",
    )
    run_evaluation(cfg)
    lines = (tmp_path / "e" / "bad_files.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in lines] == sorted(str(p) for p in bad)
    report = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert report["num_queries"] == 4 * 8  # every readable image, none of the bad ones
    assert np.load(tmp_path / "e" / "embeddings" / "query.npy").shape[0] == 4 * 8

    line = one_line_error(refused)
    assert any(f"cannot read image {str(p)!r} (" in line for p in bad), line
    assert line.endswith(f"skip unreadable images and list them in {tmp_path / 'b'}/bad_files.txt")
    assert not (tmp_path / "b" / "bad_files.txt").exists()


@pytest.mark.slow  # two train.py starts, ~8 s; the in-process checks stay
def test_train_py_stops_at_start_in_one_line(tmp_path):
    # A monitor typo used to surface after a whole epoch; the path through Hydra's grammar
    # check runs before Hydra. Both as a user types them, side by side.
    typo, comma = run_scripts(
        [
            (
                "train.py",
                [
                    *FAST,
                    "callbacks.model_checkpoint.monitor=val/precison_at_1",
                    f"hydra.run.dir={tmp_path / 'a'}",
                ],
            ),
            ("train.py", [*FAST, "ckpt_path=a,b.ckpt", f"hydra.run.dir={tmp_path / 'b'}"]),
        ]
    )
    assert "did you mean val/precision_at_1?" in one_line_error(typo)
    assert not (tmp_path / "a" / "checkpoints").exists()  # stopped before the fit
    assert "quote it: ckpt_path='a,b.ckpt'" in one_line_error(comma)


# -- bad input --------------------------------------------------------------------------------
def test_unknown_logger_is_one_line():
    from helpers import one_line_error, run_script

    line = one_line_error(run_script("train.py", "logger=foo"))
    assert_fragments(
        line,
        "unknown logger=foo",
        "choose one of: csv, many, tensorboard, wandb",
    )


@pytest.mark.slow  # five train.py processes (~15 s each, two at a time)
def test_bad_backbone_input_is_one_line_and_a_non_zero_exit(tmp_path):
    state = timm_state()
    torch.save(tv_state(), tmp_path / "resnet18.pth")  # another architecture
    (tmp_path / "notes.pth").write_text("not weights")
    base = [*FAST, "model=timm", f"model.name={ARCH}"]
    runs = [
        ["model.name=resnet19"],
        [f"model.weights={tmp_path / 'resnet18.pth'}"],
        [f"model.weights={tmp_path / 'notes.pth'}"],
        ["model.pretrained=true"],  # conftest: empty caches, HF_HUB_OFFLINE=1
        ["model.backbone_lr_mult=0"],
    ]
    procs = run_scripts(
        [
            ("train.py", [*base, *extra, f"hydra.run.dir={tmp_path / str(i)}"])
            for i, extra in enumerate(runs)
        ]
    )
    lines = [one_line_error(p) for p in procs]
    assert lines[0].startswith("error: model.name='resnet19' is not a timm model; closest: ")
    own = timm.create_model(ARCH, num_classes=0).state_dict()
    first = next(iter(own))
    assert f"does not fit timm's {ARCH}: {first} (" in lines[1]
    assert "is not a weights file torch reads as plain tensors" in lines[2]
    assert "model.pretrained=true: timm's test_resnet weights (model.safetensors of " in lines[3]
    assert "model.weights=PATH" in lines[3]
    assert lines[4].startswith("error: model.backbone_lr_mult=0")  # 0.0: a float key
    assert "must be a positive number" in lines[4]
    assert len(state)  # the weights the good runs would use exist
