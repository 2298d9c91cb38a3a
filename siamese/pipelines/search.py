"""Search job: query images against a gallery folder of index.py (search.py).

Loads the gallery (a damaged folder stops here, in one line naming the file), embeds the
queries (one image, or every image below a folder; unreadable ones are skipped and listed),
finds each query's k nearest items and prints them, with ``same`` at the calibrated threshold
(or ``threshold=``). ``identify.enabled`` (``identify=true``) also gives each query a known
label or unknown; where the query folder has class folders, the decisions are scored as
open-set identification (DIR, FAR, rejection rate). Everything is written into the run folder:
results.csv, results.png, identities.csv, metrics.json, bad_files.txt.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from siamese import run_dirs
from siamese.checks import check_int_setting, is_number
from siamese.composition import given
from siamese.console import next_steps, say, shown_path
from siamese.data.datasets import UndecodableImage, decode_image
from siamese.errors import ConfigError, DataError
from siamese.evaluation.identification import open_set_metrics
from siamese.evaluation.search_plots import save_search_results
from siamese.exports import atomic_write, written_together
from siamese.gallery import IDENTIFY_BY, Gallery, Identity, Neighbour
from siamese.gallery.items import list_source
from siamese.gallery.reading import embed_files
from siamese.inference import resolve_device
from siamese.pipelines.report import print_table, write_metrics
from siamese.signals import stop_on_sigterm

RESULTS_COLUMNS = ["query", "rank", "id", "path", "label", "distance", "same"]
IDENTITY_COLUMNS = ["query", "label", "known", "distance", "nearest", "truth"]
# The open-set numbers in the order they are printed.
REPORTED = (
    "identification_rate",
    "dir",
    "far",
    "rejection_rate",
    "dir_at_far_1e-2",
    "dir_at_far_1e-1",
    "known_queries",
    "unknown_queries",
    "threshold",
)


@dataclass
class Queries:
    """The readable query images: their shown names, files, labels and embeddings (Q, D)."""

    names: list[str]  # relative to the query folder; a single file as given
    files: list[str]  # absolute
    labels: list[str]  # class folder's name, "" where none
    emb: np.ndarray
    bad: list[tuple[str, str]]  # (file, reason) skipped


def check_search_config(cfg: DictConfig) -> None:
    """Fail at start, in one line, on settings that cannot work (nothing is read yet)."""
    if given(cfg, "gallery_dir") is None:
        raise ConfigError(
            "gallery_dir is required: python search.py gallery_dir=outputs/index/runs/<time> "
            "query=<an image or a folder>"
        )
    query = given(cfg, "query")
    if query is None:
        raise ConfigError(
            f"query is required: python search.py gallery_dir={cfg.gallery_dir} "
            "query=<an image or a folder of images>"
        )
    if not Path(query).expanduser().exists():
        raise DataError(f"query={query!r} does not exist; pass an image file or a folder of images")
    check_int_setting("k", cfg.get("k"), note=", e.g. k=5")
    check_int_setting("batch_size", cfg.get("batch_size"))
    check_int_setting("num_workers", cfg.get("num_workers"), 0)
    check_int_setting("printed_queries", cfg.get("printed_queries"), 0)
    check_int_setting("plot_queries", cfg.get("plot_queries"), 0, " (0: no results.png)")
    threshold = cfg.get("threshold")
    if threshold is not None and not is_number(threshold):
        raise ConfigError(f"threshold must be a finite distance, or null, got {threshold!r}")
    ident = cfg.identify
    if ident.by not in IDENTIFY_BY:
        raise ConfigError(
            f"identify.by={ident.by!r} is unknown; choose one of {', '.join(IDENTIFY_BY)}"
        )
    check_int_setting("identify.k", ident.get("k"), note=", e.g. identify.k=5")


def load_gallery(cfg: DictConfig) -> Gallery:
    """The gallery of ``gallery_dir`` with its checked model; refused while index.py adds."""
    folder = Path(str(cfg.gallery_dir)).expanduser()
    who = run_dirs.holder(folder) if folder.is_dir() else None
    if who is not None:
        raise ConfigError(
            f"gallery_dir={str(folder)!r} is being written by a running job ({who}); "
            "search it once that ends"
        )
    device = resolve_device(str(cfg.device))
    return Gallery.load(folder, ckpt_path=given(cfg, "ckpt_path"), map_location=device)


def read_queries(gallery: Gallery, query: str, batch_size: int, num_workers: int) -> Queries:
    """Embed the query image, or every image below the query folder; skip unreadable ones."""
    path = Path(query).expanduser()
    listing = list_source(str(path) if path.is_dir() else [str(path)], key="query")
    files = [str(Path(listing.root) / p) for p in listing.paths]
    names = listing.paths if path.is_dir() else [query]
    emb, kept, failed = embed_files(
        gallery.model, files, batch_size=batch_size, num_workers=num_workers
    )
    bad = [(files[i], reason) for i, reason in failed]
    if not kept:
        file, reason = bad[0]
        raise DataError(
            f"none of the {len(files)} query images could be read (e.g. {file!r}: {reason}); "
            "pass image files"
        )
    names = [names[i] for i in kept]
    return Queries(names, [files[i] for i in kept], [listing.labels[i] for i in kept], emb, bad)


def run_search(cfg: DictConfig) -> dict[str, Any]:
    """Search (and identify) the queries; write the results into the run folder; return
    the rows and metrics. A SIGTERM is one ``stopped:`` line and exit 143."""
    check_search_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    with stop_on_sigterm(out_dir, "searching", "search.py"):
        return _search(cfg, out_dir)


def _search(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    gallery = load_gallery(cfg)
    threshold = None if cfg.threshold is None else float(cfg.threshold)
    queries = read_queries(gallery, str(cfg.query), int(cfg.batch_size), int(cfg.num_workers))
    found = gallery.search_embeddings(queries.emb, int(cfg.k), threshold=threshold)
    ident, metrics = None, None
    if cfg.identify.enabled:
        by, k = str(cfg.identify.by), int(cfg.identify.k)
        ident = gallery.identify_embeddings(queries.emb, by=by, k=k, threshold=threshold)
        metrics = score_identities(gallery, queries, ident, threshold, by)

    with written_together(then="run search.py again"):
        write_csv(out_dir / "results.csv", RESULTS_COLUMNS, result_rows(queries, found))
        if int(cfg.plot_queries):
            draw_results(out_dir / "results.png", gallery, queries, found, int(cfg.plot_queries))
        if ident is not None:
            write_csv(out_dir / "identities.csv", IDENTITY_COLUMNS, identity_rows(queries, ident))
        if metrics is not None:
            write_metrics(out_dir / "metrics.json", metrics)
        if queries.bad:
            lines = "".join(f"{p}\t{r}\n" for p, r in sorted(queries.bad))
            with atomic_write(out_dir / "bad_files.txt", what="bad files list") as f:
                f.write(lines.encode())

    used = gallery.threshold if threshold is None else threshold
    say(header(gallery, queries, int(cfg.k), used, threshold is not None, out_dir))
    shown = int(cfg.printed_queries)
    if shown and ident is None:
        say(search_tables(queries, found, shown))
    elif shown:
        say(identity_table(queries, ident, shown))
    if len(queries.names) > shown:
        what = "results.csv" if ident is None else "identities.csv and results.csv"
        say(f"... {len(queries.names) - shown} more queries: all of them are in {what}")
    if metrics is not None:
        print_table(
            {name: metrics[name] for name in REPORTED if name in metrics},
            prefix="",
            order=REPORTED,
            title="open-set identification",
        )
    say(closing(cfg, gallery, out_dir, ident is not None))
    return {"results": found, "identities": ident, "metrics": metrics, "queries": queries}


def score_identities(
    gallery: Gallery,
    queries: Queries,
    ident: list[Identity],
    threshold: float | None,
    by: str,
) -> dict[str, Any] | None:
    """metrics.json of the labelled queries' decisions (None when no query has a class)."""
    rows = [i for i, label in enumerate(queries.labels) if label]
    if not rows:
        return None
    used = gallery.threshold if threshold is None else threshold
    numbers = open_set_metrics(
        [ident[i].distance for i in rows],
        [ident[i].nearest or None for i in rows],
        [queries.labels[i] for i in rows],
        [it.label for it in gallery.items],
        float(used),
    )
    return {
        "protocol": (
            "open-set identification: a query is known when its class folder's name is a "
            "label of the gallery, unknown otherwise"
        ),
        "identify_by": by,
        "threshold_from": "threshold=" if threshold is not None else "gallery.json",
        "unlabelled_queries_left_out": len(queries.labels) - len(rows),
        **numbers,
    }


def result_rows(queries: Queries, found: list[list[Neighbour]]) -> list[list[Any]]:
    """results.csv: one row per query and rank."""
    return [
        [name, rank, nb.id, nb.path, nb.label or "", nb.distance, _same(nb.same)]
        for name, row in zip(queries.names, found, strict=True)
        for rank, nb in enumerate(row, start=1)
    ]


def identity_rows(queries: Queries, ident: list[Identity]) -> list[list[Any]]:
    """identities.csv: the decision per query (label empty and known false: unknown)."""
    return [
        [name, d.label or "", d.known, d.distance, d.nearest, truth]
        for name, d, truth in zip(queries.names, ident, queries.labels, strict=True)
    ]


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    text = io.StringIO(newline="")
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)
    with atomic_write(path, what=path.name) as f:
        f.write(text.getvalue().encode())


def _thumbnail(gallery: Gallery, file: Path | str | None) -> np.ndarray | None:
    """An image as the model sees it, (H, W, C) in [0, 1]; None when it cannot be read."""
    if file is None:
        return None
    channels, height, width = gallery.image_shape
    try:
        return decode_image(str(file), (height, width), channels).permute(1, 2, 0).numpy()
    except UndecodableImage:
        return None


def draw_results(
    path: Path, gallery: Gallery, queries: Queries, found: list[list[Neighbour]], rows: int
) -> None:
    """results.png: the first ``rows`` queries with their neighbours and distances."""
    rows = min(rows, len(queries.names))
    images = [_thumbnail(gallery, f) for f in queries.files[:rows]]
    channels, height, width = gallery.image_shape
    blank = np.zeros((height, width, channels), dtype=np.float32)  # read once, gone since
    neighbours = [
        [{**nb.as_dict(), "image": _thumbnail(gallery, gallery.item_file(nb.id))} for nb in row]
        for row in found[:rows]
    ]
    queries_shown = [blank if im is None else im for im in images]
    save_search_results(
        path, queries_shown, neighbours, titles=queries.names[:rows], max_queries=rows
    )


# -- what the terminal shows ------------------------------------------------------------------
def _cell(value: Any) -> str:
    """A table cell; names from strangers' folders without control characters."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    text = str(value)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers to the right."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[j]) for r in cells]) for j, c in enumerate(columns)]
    right = [bool(rows) and isinstance(rows[0][j], int | float) for j in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        padded = [
            v.rjust(w) if r else v.ljust(w) for v, w, r in zip(values, widths, right, strict=True)
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(columns), line(["-" * w for w in widths]), *map(line, cells)])


def _same(same: bool | None) -> str:
    return "" if same is None else "yes" if same else "no"


def header(
    gallery: Gallery, queries: Queries, k: int, threshold: float | None, given: bool, out: Path
) -> str:
    """What was searched, at which threshold, and what was skipped."""
    if threshold is None:
        at = "no threshold (the checkpoint has none): same is left empty; pass threshold=..."
    else:
        at = f"same: distance <= {threshold:.4g} ({'threshold=' if given else 'calibrated'})"
    lines = [f"{len(queries.names)} queries against {len(gallery)} gallery items, k={k}; {at}"]
    if k > len(gallery):
        lines.append(f"the gallery holds {len(gallery)} items: each query gets all of them")
    if queries.bad:
        lines.append(
            f"{len(queries.bad)} unreadable queries skipped, listed in "
            f"{shown_path(out / 'bad_files.txt')}"
        )
    return "\n".join(lines)


def search_tables(queries: Queries, found: list[list[Neighbour]], shown: int) -> str:
    """A table per query: rank, path, label, distance, same."""
    blocks = []
    for name, label, row in list(zip(queries.names, queries.labels, found, strict=True))[:shown]:
        title = f"query {_cell(name)}" + (f" (class {_cell(label)})" if label else "")
        rows = [
            [rank, nb.path, nb.label or "", nb.distance, _same(nb.same)]
            for rank, nb in enumerate(row, start=1)
        ]
        blocks.append(title + "\n" + table(["rank", "path", "label", "distance", "same"], rows))
    return "\n\n".join(blocks)


def identity_table(queries: Queries, ident: list[Identity], shown: int) -> str:
    """One row per query: the label or unknown, the distance decided on, the nearest label."""
    labelled = any(queries.labels)
    columns = ["query", "identity", "distance", "nearest"] + (["truth"] if labelled else [])
    rows = [
        [name, d.label if d.known else "unknown", d.distance, d.nearest]
        + ([truth] if labelled else [])
        for name, d, truth in list(zip(queries.names, ident, queries.labels, strict=True))[:shown]
    ]
    return table(columns, rows)


def closing(cfg: DictConfig, gallery: Gallery, out_dir: Path, identified: bool) -> str:
    """The run folder, and the next command: identify (labelled gallery) or serve."""
    where = shown_path(Path(str(cfg.gallery_dir)).expanduser())
    labelled = any(it.label for it in gallery.items)
    if not identified and labelled:
        command = ["python", "search.py", f"gallery_dir={where}", f"query={cfg.query}"]
        command.append("identify=true")
    else:
        command = ["python", "serve.py", f"gallery_dir={where}"]
    files = ("results.csv", "results.png", "identities.csv", "metrics.json")
    written = [name for name in files if (out_dir / name).exists()]
    note = "written: " + ", ".join(written)
    return next_steps(out_dir, command, note=note)
