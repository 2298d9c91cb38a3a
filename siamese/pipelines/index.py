"""Index job: a checkpoint and a folder of images -> a gallery folder (index.py).

``mode=build`` embeds every image of ``gallery`` and saves a ``siamese.Gallery`` into the run
folder (index.faiss, items.csv, gallery.json, embeddings.npy, bad_files.txt). ``mode=add``
adds the images of ``gallery`` that an existing gallery folder does not hold yet, embedding
only those, and saves it back in place; the folder is locked meanwhile, so that two adds
cannot interleave, and its files are replaced together.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from siamese import run_dirs
from siamese.checks import check_int_setting
from siamese.composition import given
from siamese.console import next_steps, say, shown_path
from siamese.errors import ConfigError, DataError
from siamese.gallery import Gallery
from siamese.gallery.gallery import index_settings
from siamese.gallery.items import list_source
from siamese.gallery.store import BAD_FILES
from siamese.inference import load, resolve_device
from siamese.signals import stop_on_sigterm

MODES = ("build", "add")


def check_index_config(cfg: DictConfig) -> None:
    """Fail at start, in one line, on settings that cannot work (nothing is read yet)."""
    mode = cfg.get("mode")
    if mode not in MODES:
        raise ConfigError(
            f"mode={mode!r} is unknown; choose build (a new gallery) or add "
            "(mode=add gallery_dir=<a gallery folder> gallery=<more images>)"
        )
    check_int_setting("batch_size", cfg.get("batch_size"))
    check_int_setting("num_workers", cfg.get("num_workers"), 0)
    if mode == "build" and given(cfg, "ckpt_path") is None:
        raise ConfigError(
            "ckpt_path is required: python index.py "
            "ckpt_path=outputs/evaluate/runs/<time>/model.ckpt gallery=<folder of images>"
        )
    if mode == "add" and given(cfg, "gallery_dir") is None:
        raise ConfigError(
            "mode=add needs gallery_dir: python index.py mode=add "
            "gallery_dir=outputs/index/runs/<time> gallery=<folder of new images>"
        )
    if given(cfg, "gallery") is None:
        example = "mode=add gallery_dir=<a gallery folder> " if mode == "add" else "ckpt_path=... "
        raise ConfigError(
            f"gallery is required: python index.py {example}gallery=<folder of images> "
            "(root/<class>/<image>, or images directly in it)"
        )
    folder = Path(str(cfg.gallery)).expanduser()
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise DataError(
            f"gallery={str(cfg.gallery)!r} {what}; pass a folder of images "
            "(root/<class>/<image>, or images directly in it)"
        )


def check_gallery_dir(folder: Path) -> None:
    """``folder`` must be a gallery folder that index.py made (its run.json says so)."""
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else "is not a folder"
        raise DataError(
            f"gallery_dir={str(folder)!r} {what}; pass the folder index.py wrote "
            "(outputs/index/runs/<time>)"
        )
    task = (run_dirs.read_record(folder) or {}).get("task")
    if task != "index":
        made = f"a run of {run_dirs.SCRIPTS.get(str(task), task)}" if task else "no run of index.py"
        raise ConfigError(
            f"gallery_dir={str(folder)!r} holds {made} (its {run_dirs.RECORD} says so); "
            "mode=add adds to a gallery folder made by index.py: pass one, or build one first"
        )


def run_index(cfg: DictConfig) -> dict[str, Any]:
    """Build a gallery into the run folder, or add to one (``mode=add``); returns counts.
    A SIGTERM on the way is one ``stopped:`` line and exit 143, with no temporary left."""
    check_index_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    with stop_on_sigterm(out_dir, "indexing", "index.py"):
        if cfg.mode == "add":
            return _add(cfg, out_dir)
        return _build(cfg, out_dir)


def _build(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    device = resolve_device(str(cfg.device))
    ckpt_path = Path(str(cfg.ckpt_path)).expanduser()
    settings = OmegaConf.to_container(cfg.index, resolve=True)
    model = load(ckpt_path, map_location=device)
    gallery = Gallery.build(
        model,
        str(cfg.gallery),
        ckpt_path=ckpt_path,
        index=settings,
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        progress=sys.stderr.isatty(),  # a bar in a terminal, none in a log
    )
    gallery.save(out_dir)
    classes = len({it.label for it in gallery.items} - {""})
    in_classes = f"in {classes} classes" if classes else "without labels (no class folders)"
    kind = gallery.info["index"]["kind"]
    say(
        f"indexed {len(gallery)} images of {shown_path(str(cfg.gallery))} {in_classes}, "
        f"index: {kind}" + _skipped(len(gallery.bad_files), out_dir)
    )
    say(_closing(out_dir, out_dir, gallery))
    return {"items": len(gallery), "skipped": len(gallery.bad_files), "gallery_dir": str(out_dir)}


def _add(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    folder = Path(str(cfg.gallery_dir)).expanduser()
    check_gallery_dir(folder)
    device = resolve_device(str(cfg.device))
    run_dirs.lock(folder, "gallery_dir")  # two adds never interleave; search.py refuses meanwhile
    try:
        return _add_locked(cfg, out_dir, folder, device)
    finally:
        run_dirs.unlock(folder)


def _add_locked(
    cfg: DictConfig, out_dir: Path, folder: Path, device: torch.device
) -> dict[str, Any]:
    gallery = Gallery.load(folder, ckpt_path=given(cfg, "ckpt_path"), map_location=device)
    kept = _kept_index(cfg, gallery)
    if kept:
        say(kept)
    listing = list_source(str(cfg.gallery))
    files = {os.path.join(listing.root, p) for p in listing.paths}
    added = gallery.add(
        str(cfg.gallery),
        batch_size=int(cfg.batch_size),
        num_workers=int(cfg.num_workers),
        progress=sys.stderr.isatty(),
    )
    skipped = sum(1 for path, _ in gallery.bad_files if path in files)
    already = len(files) - added - skipped
    gallery.save(folder)
    say(
        f"added {added} images of {shown_path(str(cfg.gallery))} to {shown_path(folder)} "
        f"({already} already indexed; {len(gallery)} in all)" + _skipped(skipped, folder)
    )
    say(_closing(out_dir, folder, gallery))
    return {"items": len(gallery), "added": added, "already": already, "skipped": skipped}


def _kept_index(cfg: DictConfig, gallery: Gallery) -> str | None:
    """A line when ``index=`` asks for other index settings than the gallery was built with:
    an add grows the gallery's own index (a different one needs a new build)."""
    asked = index_settings(OmegaConf.to_container(cfg.index, resolve=True))
    own = gallery.info["index"]
    if asked in (own, index_settings(None)):  # the gallery's own, or index= not given
        return None
    return (
        f"mode=add keeps the gallery's own index ({own['kind']}) and adds to it; "
        f"index={asked['kind']} applies to a new gallery (mode=build)"
    )


def _skipped(count: int, folder: Path) -> str:
    if not count:
        return ""
    return f"; {count} unreadable skipped, listed in {shown_path(folder / BAD_FILES)}"


def _closing(run_dir: Path, gallery_dir: Path, gallery: Gallery) -> str:
    """The run folder and the next commands: search one of the gallery's own images, serve."""
    example = next((gallery.item_file(it.id) for it in gallery.items), None)
    query = shown_path(example) if example is not None else "<an image>"
    where = shown_path(gallery_dir)
    serve = shlex.join(["python", "serve.py", f"gallery_dir={where}"])
    note = f"      {serve}  (a web page and an API)"
    return next_steps(
        run_dir, ["python", "search.py", f"gallery_dir={where}", f"query={query}"], note=note
    )
