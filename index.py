"""Index a folder of images: ``python index.py ckpt_path=CKPT gallery=DIR [index=ivf|hnsw]``.

Embeds every image below DIR with the checkpoint's model and writes a gallery folder
(index.faiss, items.csv, gallery.json, embeddings.npy, bad_files.txt) that search.py and
serve.py use; ``mode=add gallery_dir=OUT gallery=DIR2`` adds DIR2's new images to OUT
(see conf/index.yaml for every option, docs/gallery.md for the rest).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from siamese.task import run, task_wrapper


@hydra.main(version_base="1.3", config_path="conf", config_name="index")
@task_wrapper
def main(cfg: DictConfig) -> None:
    # Imported here so that a typo in the command line is reported before torch loads.
    from siamese.pipelines.index import run_index

    run_index(cfg)


if __name__ == "__main__":
    run(main, "index")
