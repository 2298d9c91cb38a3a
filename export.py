"""Export a checkpoint's tower: ``python export.py ckpt_path=PATH format=onnx|torchscript|export``.

Writes ``model.onnx`` / ``model.ts`` / ``model.pt2`` (images (B, C, H, W) in [0, 1] ->
embeddings (B, D), dynamic batch) and ``model.json`` (input shape, normalisation, distance,
calibrated threshold) to the run directory (see conf/export.yaml for every option).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from siamese.task import run, task_wrapper


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
@task_wrapper
def main(cfg: DictConfig) -> None:
    # Imported here so that a typo in the command line is reported before torch loads.
    from siamese.pipelines.export import run_export

    run_export(cfg)


if __name__ == "__main__":
    run(main, "export")
