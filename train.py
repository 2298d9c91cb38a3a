"""Train a Siamese network: ``python train.py [group=option ...] [key=value ...]``."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from siamese.task import run, task_wrapper


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
@task_wrapper
def main(cfg: DictConfig) -> float | None:
    # Imported here so that a typo in the command line is reported before torch loads.
    from siamese.console import in_sweep
    from siamese.pipelines.train import run_training
    from siamese.sweeps import optimized_value

    metrics = run_training(cfg)
    # A sweeper (Optuna) maximises or minimises this value; a single run only reports it.
    return optimized_value(cfg.get("optimized_metric"), metrics, sweeping=in_sweep())


if __name__ == "__main__":
    import sys

    from siamese.resume import with_saved_overrides

    # Resuming (hydra.run.dir=RUN ckpt_path=last): the run's own overrides first, then the
    # command's, composed together (a run's +key=v makes the command's key=v valid).
    sys.argv[1:] = with_saved_overrides(sys.argv[1:])
    run(main, "train")
