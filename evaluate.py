"""Evaluate a checkpoint: ``python evaluate.py ckpt_path=PATH [data=...] [index=...] [eval.k=...]``.

Retrieval (faiss), verification with a calibrated threshold and N-way one-shot accuracy,
written with the embeddings, the index, a thresholded model.ckpt and plots to the run
directory (see conf/evaluate.yaml for every option).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from siamese.task import run, task_wrapper


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
@task_wrapper
def main(cfg: DictConfig) -> None:
    # Imported here so that a typo in the command line is reported before torch loads.
    from siamese.pipelines.evaluate import run_evaluation

    run_evaluation(cfg)


if __name__ == "__main__":
    run(main, "evaluate")
