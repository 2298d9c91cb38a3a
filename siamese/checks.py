"""Argument checks shared across the package: whole and real numbers, image sizes, labels, k."""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np

from siamese.errors import ConfigError, DataError


def is_int(value: Any) -> bool:
    """A whole number (a Python or numpy int), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite real number (int, float or numpy scalar), not a bool."""
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def is_positive_int(value: Any) -> bool:
    """An int (not a bool) of at least 1: a count or an interval from a config."""
    return is_int(value) and value >= 1


def _at_least(minimum: int) -> str:
    if minimum == 1:
        return "a positive integer"
    return "a non-negative integer" if minimum == 0 else f"an integer >= {minimum}"


def check_int(
    name: str, value: Any, minimum: int = 1, hint: str = "", *, expected: str | None = None
) -> int:
    """``value`` (a function argument) as an int of at least ``minimum``, or one ConfigError
    line: ``max_points 0 must be a positive integer, e.g. 5000`` (``hint``: ", e.g. 5000")."""
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{name} {value!r} must be {expected or _at_least(minimum)}{hint}")
    return int(value)


def check_int_setting(
    key: str, value: Any, minimum: int = 1, note: str = "", *, expected: str | None = None
) -> int:
    """``value`` (a config setting) as an int of at least ``minimum``, or one ConfigError
    line: ``eval.k must be a positive integer, got 0`` (``note`` follows the expectation)."""
    if not is_int(value) or value < minimum:
        raise ConfigError(f"{key} must be {expected or _at_least(minimum)}{note}, got {value!r}")
    return int(value)


def is_image_size(value: Any) -> bool:
    """A side (a positive int) or a [height, width] pair of them."""
    pair = (value, value) if is_int(value) else value
    return (
        isinstance(pair, Sequence)
        and not isinstance(pair, str)
        and len(pair) == 2
        and all(is_positive_int(v) for v in pair)
    )


def image_size(key: str, value: Any) -> tuple[int, int]:
    """``28`` or ``[H, W]`` (positive ints) as (H, W), or one ConfigError line naming ``key``."""
    if not is_image_size(value):
        raise ConfigError(f"{key} must be a positive int or [height, width], got {value!r}")
    return (int(value), int(value)) if is_int(value) else (int(value[0]), int(value[1]))


def check_labels(
    labels: np.ndarray,
    n: int | None,
    name: str = "labels",
    of: str = "embeddings",
    per: str = "embedding",
    rows: str = "rows",
) -> np.ndarray:
    """``labels`` as a non-empty 1-D array with one label per item of ``of`` (its ``n``
    ``rows``; n None: any number), or one DataError line naming the shapes."""
    if labels.ndim != 1 or len(labels) == 0 or (n is not None and len(labels) != n):
        rows = "" if n is None else f" but {of} has {n} {rows}"
        raise DataError(
            f"{name} has shape {tuple(labels.shape)}{rows}; "
            f"pass one label per {per} as a non-empty 1-D array"
        )
    return labels


def label_kind(labels: np.ndarray, name: str) -> str:
    """What the 1-D array ``labels`` holds, "number" or "string", refusing NaN and a mix.

    Checked because np.unique would merge every NaN into one class (all-NaN labels would
    score 1.0), sort a mix of numbers and strings with a TypeError, and np.concatenate
    would turn int query labels into strings that equal the gallery's "1".
    """
    fix = "pass class labels of one kind: all integers or all strings, none missing"
    if labels.dtype.kind in "biuf":
        missing = np.flatnonzero(np.isnan(labels)) if labels.dtype.kind == "f" else []
        if len(missing):
            raise DataError(
                f"{name} has {len(missing)} NaN value(s) of {len(labels)} (first at row "
                f"{missing[0]}), and NaN is no class; {fix}"
            )
        return "number"
    if labels.dtype.kind in "US":
        return "string"
    if labels.dtype.kind != "O":
        raise DataError(f"{name} has dtype {labels.dtype}, which is no class label; {fix}")
    first: dict[str, int] = {}
    for row, label in enumerate(labels.tolist()):
        if isinstance(label, str | bytes):
            kind = "string"
        elif isinstance(label, Real) and not isinstance(label, bool):
            if label != label:  # NaN
                raise DataError(f"{name} has NaN at row {row}, and NaN is no class; {fix}")
            kind = "number"
        else:
            raise DataError(f"{name} has {label!r} at row {row}, which is no class label; {fix}")
        first.setdefault(kind, row)
        if len(first) > 1:
            raise DataError(
                f"{name} mixes numbers and strings ({labels[first['number']]!r} at row "
                f"{first['number']}, {labels[first['string']]!r} at row {first['string']}); "
                f"{fix}"
            )
    return next(iter(first), "number")


def check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """``ks`` (the k of each recall@k) as sorted distinct ints, or one ConfigError line."""
    values = tuple(ks) if isinstance(ks, Sequence) and not isinstance(ks, str) else ()
    if not values or not all(is_positive_int(k) for k in values):
        raise ConfigError(f"ks {ks!r} must be a non-empty sequence of positive integers")
    return tuple(sorted({int(k) for k in values}))


def check_k(
    k: int,
    retrievable: int,
    name: str = "k",
    where: str = "each query can retrieve",
    fix: str | None = None,
) -> int:
    """``k`` nearest neighbours, refused beyond the ``retrievable`` items each query can
    retrieve (the gallery, less the query itself when queries are the gallery)."""
    check_int(name, k)
    if k > retrievable:
        fix = fix or f"use {name}={min(10, retrievable)} or a larger gallery"
        raise ConfigError(f"{name}={k} is larger than the {retrievable} items {where}; {fix}")
    return int(k)
