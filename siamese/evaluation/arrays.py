"""Array plumbing shared by the evaluation modules: arrays or tensors in, checked numpy out."""

from __future__ import annotations

from typing import Any

import numpy as np

from siamese.errors import DataError

# Rows checked for NaN/inf at once, so the check needs no full-size boolean array.
_CHECK_CHUNK_ROWS = 1 << 16


def to_numpy(x: Any) -> np.ndarray:
    """A numpy view of an array or tensor (bfloat16 and float16 become float32, exactly).

    Duck-typed, so it needs no torch import: a tensor may live on a GPU or need grad.
    """
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if x.is_floating_point() and x.element_size() < 4:  # numpy has no bfloat16
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def as_embeddings(x: Any, name: str, dtype: type = np.float32) -> np.ndarray:
    """Embeddings as a C-contiguous (N, D) array of ``dtype``, after checking shape and values."""
    arr = to_numpy(x)
    if arr.ndim != 2 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(
            f"{name} has shape {tuple(arr.shape)}; expected a non-empty 2-D array (N, D) "
            "of embeddings, one row per item"
        )
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise DataError(f"{name} has dtype {arr.dtype}; expected real-valued embeddings")
    out = np.ascontiguousarray(arr, dtype=dtype)
    bad = sum(
        int((~np.isfinite(out[s : s + _CHECK_CHUNK_ROWS])).sum())
        for s in range(0, len(out), _CHECK_CHUNK_ROWS)
    )
    if bad:
        overflow = ", or too large for float32" if out.dtype == np.float32 else ""
        raise DataError(
            f"{name} has {bad} non-finite values (NaN or inf{overflow}) out of {out.size}; "
            "check the model output (a diverged loss?) before evaluating"
        )
    return out
