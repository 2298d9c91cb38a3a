"""Search a gallery: ``python search.py gallery_dir=OUT query=IMG|DIR [k=5] [identify=true]``.

Prints each query's k nearest gallery items (rank, path, label, distance, same at the
calibrated threshold) and writes results.csv and results.png to the run directory; with
``identify=true`` each query gets a known label or unknown (identities.csv, and metrics.json
when the query folder has class folders). See conf/search.yaml and docs/gallery.md.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import hydra
from omegaconf import DictConfig

from siamese.task import run, task_wrapper


def identify_switch(argv: Sequence[str]) -> list[str]:
    """``identify=<value>`` as ``identify.enabled=<value>``: ``identify`` is a switch and a
    group of keys at once (``identify=true identify.by=vote``), which one Hydra key cannot be."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key == "identify" and not value.lstrip().startswith("{"):
            arg = f"identify.enabled={value}"
        out.append(arg)
    return out


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
@task_wrapper
def main(cfg: DictConfig) -> None:
    # Imported here so that a typo in the command line is reported before torch loads.
    from siamese.pipelines.search import run_search

    run_search(cfg)


if __name__ == "__main__":
    sys.argv[1:] = identify_switch(sys.argv[1:])
    run(main, "search")
