"""The run-folder guard under torchrun: only rank 0 claims a shared run folder and saves
Hydra's record, every rank refuses another run's folder, and a folder named from the start
time stops every rank (tests/runs/test_multinode_runs.py runs the two launchers)."""

from __future__ import annotations

import pytest
from helpers import CONF
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from siamese import run_dirs
from siamese.hydra_callbacks import RunDirGuard
from siamese.task import report_errors


def _launched_by_torchrun(monkeypatch, rank: int) -> None:
    env = {"TORCHELASTIC_RUN_ID": "none", "WORLD_SIZE": "2", "RANK": str(rank)}
    env |= {"LOCAL_RANK": "0", "GROUP_RANK": str(rank)}
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _hydra_config(run_dir: str | None) -> DictConfig:
    """train.yaml with its hydra node, as RunDirGuard gets it."""
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        cfg = compose("train", overrides=[], return_hydra_config=True)
    if run_dir is not None:
        with open_dict(cfg):
            cfg.hydra.run.dir = run_dir
    return cfg


@pytest.mark.parametrize("rank", [0, 1])
def test_only_rank_0_claims_the_shared_run_folder_and_saves_hydras_record(
    tmp_path, monkeypatch, rank
):
    _launched_by_torchrun(monkeypatch, rank)
    run = tmp_path / "run"
    cfg = _hydra_config(str(run))
    RunDirGuard().on_run_start(cfg)
    try:
        if rank == 0:
            assert cfg.hydra.output_subdir == ".hydra"
            assert run_dirs.read_record(run)["task"] == "train"
        else:  # nothing written, nothing locked; Hydra will not save .hydra/ either
            assert cfg.hydra.output_subdir is None
            assert not run.exists()
    finally:
        run_dirs.unlock(run)


@pytest.mark.parametrize("rank", [0, 1])
def test_every_rank_refuses_a_folder_that_holds_another_run(tmp_path, monkeypatch, capsys, rank):
    """Rank 0 alone claims, but all refuse: one left running would wait for rank 0."""
    _launched_by_torchrun(monkeypatch, rank)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text("{}")
    with pytest.raises(SystemExit) as stop:
        report_errors(RunDirGuard().on_run_start)(_hydra_config(str(run)))
    assert stop.value.code == 2
    assert "already holds a run (metrics.json)" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.json"]


@pytest.mark.parametrize("rank", [0, 1])
def test_torchrun_with_a_run_folder_from_the_start_time_stops_every_rank(
    tmp_path, monkeypatch, capsys, rank
):
    _launched_by_torchrun(monkeypatch, rank)
    cfg = _hydra_config(None)  # the default: outputs/train/runs/<start time>
    with pytest.raises(SystemExit) as stop:
        report_errors(RunDirGuard().on_run_start)(cfg)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: torchrun started 2 processes, and hydra.run.dir=")
    assert "give every node the same hydra.run.dir" in err
