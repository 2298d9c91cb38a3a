"""Serve a gallery: ``python serve.py gallery_dir=OUT [host=127.0.0.1 port=8000]``.

Puts a gallery folder of index.py behind a FastAPI app under uvicorn: POST /search,
/identify, /verify and /embed, item thumbnails, /health, FastAPI's /docs and a web page at /
(see conf/serve.yaml for every option, docs/gallery.md for the API and the API key).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from siamese.task import run, task_wrapper


@hydra.main(version_base="1.3", config_path="conf", config_name="serve")
@task_wrapper
def main(cfg: DictConfig) -> None:
    # Imported here so that a typo in the command line is reported before torch loads.
    from siamese.pipelines.serve import run_serve

    run_serve(cfg)


if __name__ == "__main__":
    run(main, "serve")
