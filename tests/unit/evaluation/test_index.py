"""build_index: the three kinds, their defaults, determinism, and errors that name the value."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch

from siamese.errors import ConfigError, DataError
from siamese.evaluation import build_index
from siamese.evaluation.index import default_nlist, default_nprobe, index_kind


def gaussian(n: int = 2000, dim: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim), dtype=np.float32)


@pytest.mark.parametrize(
    ("kind", "metric", "cls", "faiss_metric"),
    [
        ("flat", "l2", faiss.IndexFlatL2, faiss.METRIC_L2),
        ("flat", "ip", faiss.IndexFlatIP, faiss.METRIC_INNER_PRODUCT),
        ("ivf", "l2", faiss.IndexIVFFlat, faiss.METRIC_L2),
        ("ivf", "ip", faiss.IndexIVFFlat, faiss.METRIC_INNER_PRODUCT),
        ("hnsw", "l2", faiss.IndexHNSWFlat, faiss.METRIC_L2),
        ("hnsw", "ip", faiss.IndexHNSWFlat, faiss.METRIC_INNER_PRODUCT),
    ],
)
def test_kinds(kind, metric, cls, faiss_metric):
    x = gaussian()
    index = build_index(x, metric=metric, kind=kind)
    assert isinstance(index, cls)
    assert index_kind(index) == kind
    assert (index.ntotal, index.d, index.metric_type) == (2000, 16, faiss_metric)
    # Rows keep their order as ids: each row's nearest neighbour (by l2) is itself.
    if metric == "l2":
        _, ids = index.search(x[:50], 1)
        np.testing.assert_array_equal(ids[:, 0], np.arange(50))


def test_defaults():
    # nlist = 4 sqrt(N), but at least 39 training points per list: 2000 / 39 -> 51.
    assert default_nlist(2000) == 51
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(10) == 1
    assert default_nprobe(4000) == 32
    assert default_nprobe(3) == 3
    # build_index returns the concrete class (no faiss.downcast_index needed, whose result
    # would not keep the index alive).
    ivf = build_index(gaussian(), kind="ivf")
    assert (ivf.nlist, ivf.nprobe) == (51, 32)
    hnsw = build_index(gaussian(), kind="hnsw")
    assert (hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch) == (100, 128)
    # The evaluate config passes null for "the default".
    hnsw = build_index(gaussian(), kind="hnsw", ef_construction=None, ef_search=None)
    assert hnsw.hnsw.efSearch == 128


def test_parameters_are_used():
    ivf = build_index(gaussian(), kind="ivf", nlist=20, nprobe=3)
    assert (ivf.nlist, ivf.nprobe) == (20, 3)
    assert ivf.is_trained
    hnsw = build_index(gaussian(), kind="hnsw", hnsw_m=8, ef_construction=40, ef_search=64)
    assert (hnsw.hnsw.efConstruction, hnsw.hnsw.efSearch) == (40, 64)
    # M neighbours per node on upper levels, 2 M on the base level.
    assert hnsw.hnsw.nb_neighbors(1) == 8


def test_ivf_is_deterministic_for_a_seed():
    x = gaussian()
    first = faiss.serialize_index(build_index(x, kind="ivf", seed=3))
    again = faiss.serialize_index(build_index(x, kind="ivf", seed=3))
    other = faiss.serialize_index(build_index(x, kind="ivf", seed=4))
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_inputs():
    x = gaussian(300)
    index = build_index(torch.from_numpy(x).double(), kind="flat")
    assert index.ntotal == 300
    np.testing.assert_array_equal(index.reconstruct_n(0, 300), x)


def test_bad_parameters_name_the_value():
    x = gaussian(100)
    cases = [
        ({"kind": "lsh"}, "index kind 'lsh' is not supported"),
        ({"metric": "cosine"}, "metric 'cosine' is not supported"),
        ({"kind": "ivf", "nlist": 101}, "nlist 101 is larger than the 100 gallery items"),
        ({"kind": "ivf", "nlist": 0}, "nlist 0 must be a positive integer"),
        ({"kind": "ivf", "nlist": 2.5}, "nlist 2.5 must be a positive integer"),
        ({"kind": "ivf", "nlist": 2, "nprobe": 3}, "nprobe 3 is larger than nlist 2"),
        ({"kind": "ivf", "nprobe": -1}, "nprobe -1 must be a positive integer"),
        ({"kind": "flat", "nlist": 4}, "nlist and nprobe apply to kind='ivf' only"),
        ({"kind": "ivf", "ef_search": 10}, "ef_search apply to kind='hnsw' only"),
        ({"kind": "hnsw", "hnsw_m": 0}, "hnsw_m 0 must be a positive integer"),
        ({"kind": "hnsw", "ef_search": True}, "ef_search True must be a positive integer"),
        ({"kind": "ivf", "seed": -2}, "seed -2 must be a non-negative integer"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            build_index(x, **kwargs)


def test_bad_gallery():
    with pytest.raises(DataError, match="non-empty 2-D"):
        build_index(np.zeros((0, 4), dtype=np.float32))
    bad = gaussian(10)
    bad[3, 2] = np.nan
    with pytest.raises(DataError, match="1 non-finite"):
        build_index(bad, kind="hnsw")


def test_default_nlist_formula():
    for n in (39, 1000, 50_000, 123_457):
        expected = max(1, min(round(4 * math.sqrt(n)), n // 39))
        assert default_nlist(n) == expected
