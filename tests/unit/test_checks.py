"""siamese.checks: the shared argument checks on real values (ints, numbers, sizes, labels, k)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from siamese.checks import (
    check_int,
    check_int_setting,
    check_k,
    check_ks,
    check_labels,
    image_size,
    is_image_size,
    is_int,
    is_number,
    is_positive_int,
    label_kind,
)
from siamese.errors import ConfigError, DataError


def test_whole_numbers_are_ints_of_any_kind_but_never_bools():
    assert [is_int(v) for v in (0, -3, 2**70, np.int64(5), np.uint8(7))] == [True] * 5
    assert [is_int(v) for v in (True, False, np.bool_(True), 1.0, "1", None)] == [False] * 6
    assert [is_positive_int(v) for v in (1, np.int32(4), 0, -1, True, 2.0)] == [
        True,
        True,
        False,
        False,
        False,
        False,
    ]


def test_numbers_are_finite_reals_but_never_bools():
    assert [is_number(v) for v in (0, -2.5, 1e300, np.float32(0.5), np.int16(3))] == [True] * 5
    assert [is_number(v) for v in (math.inf, -math.inf, math.nan, True, "1", None)] == [False] * 6


def test_check_int_returns_a_python_int_and_words_the_bound():
    assert check_int("top_k", np.int64(3)) == 3 and type(check_int("top_k", np.int64(3))) is int
    assert check_int("seed", 0, 0) == 0
    cases = [
        (("max_points", 0, 1, ", e.g. 5000"), "max_points 0 must be a positive integer, e.g. 5000"),
        (("seed", -1, 0, ", e.g. 0"), "seed -1 must be a non-negative integer, e.g. 0"),
        (("n_way", 1, 2, ", e.g. 5"), "n_way 1 must be an integer >= 2, e.g. 5"),
        (("nlist", True, 1, " (or null)"), "nlist True must be a positive integer (or null)"),
        (("block_size", 2.0, 1), "block_size 2.0 must be a positive integer"),
    ]
    for args, message in cases:
        with pytest.raises(ConfigError) as err:
            check_int(*args)
        assert str(err.value) == message


def test_check_int_setting_names_the_key_and_the_value_given():
    assert check_int_setting("export.opset", 18, 18) == 18
    with pytest.raises(ConfigError) as err:
        check_int_setting("export.opset", 11, 18, " (the dynamo exporter)")
    assert str(err.value) == "export.opset must be an integer >= 18 (the dynamo exporter), got 11"
    with pytest.raises(ConfigError) as err:
        check_int_setting("eval.k", False)
    assert str(err.value) == "eval.k must be a positive integer, got False"
    with pytest.raises(ConfigError) as err:
        check_int_setting("data.source.val_size", -2, 0, expected="a whole number >= 0")
    assert str(err.value) == "data.source.val_size must be a whole number >= 0, got -2"


def test_image_sizes_are_a_side_or_a_pair_of_positive_ints():
    assert image_size("data.image_size", 28) == (28, 28)
    assert image_size("data.image_size", [32, np.int64(20)]) == (32, 20)
    assert image_size("model.image_size", (7, 9)) == (7, 9)
    for bad in (0, True, [28], [28, 0], [28, 28, 28], "28", [28.0, 28.0], None):
        assert not is_image_size(bad)
        with pytest.raises(ConfigError, match=r"^data.image_size must be a positive int or"):
            image_size("data.image_size", bad)


def test_labels_are_one_per_row_and_one_dimensional():
    y = np.array([3, 1, 3])
    assert check_labels(y, 3) is y
    assert len(check_labels(np.array(["a", "b"]), None)) == 2
    with pytest.raises(DataError) as err:
        check_labels(np.zeros(4), 5)
    assert str(err.value) == (
        "labels has shape (4,) but embeddings has 5 rows; "
        "pass one label per embedding as a non-empty 1-D array"
    )
    with pytest.raises(DataError, match=r"query_labels has shape \(6, 1\) but query has 6 rows"):
        check_labels(np.zeros((6, 1)), 6, "query_labels", of="query")
    with pytest.raises(DataError, match="gallery_images has 2 images; pass one label per image"):
        check_labels(np.zeros(3), 2, "gallery_labels", "gallery_images", "image", "images")
    with pytest.raises(DataError, match=r"labels has shape \(0,\); pass one label"):
        check_labels(np.zeros(0), None)


def test_label_kinds_refuse_nan_and_mixed_kinds():
    assert label_kind(np.array([1, 2]), "labels") == "number"
    assert label_kind(torch.tensor([1.0, 2.0]).numpy(), "labels") == "number"
    assert label_kind(np.array(["cat", "dog"]), "labels") == "string"
    assert label_kind(np.array([1, 2.5], dtype=object), "labels") == "number"
    with pytest.raises(DataError, match=r"labels has 1 NaN value\(s\) of 3 \(first at row 2\)"):
        label_kind(np.array([0.0, 1.0, np.nan]), "labels")
    mixed = r"y mixes numbers and strings \(1 at row 0, 'a' at row 1\)"
    with pytest.raises(DataError, match=mixed):
        label_kind(np.array([1, "a"], dtype=object), "y")
    with pytest.raises(DataError, match="y has True at row 0, which is no class label"):
        label_kind(np.array([True, 1], dtype=object), "y")


def test_ks_are_sorted_distinct_positive_ints():
    assert check_ks([10, 1, 5, 1]) == (1, 5, 10)
    assert check_ks((np.int64(3),)) == (3,)
    for bad in ([], [0, 1], [1, True], [2.0], "15", 5):
        with pytest.raises(ConfigError, match="must be a non-empty sequence of positive integers"):
            check_ks(bad)


def test_k_is_refused_beyond_what_a_query_can_retrieve():
    assert check_k(5, 5) == 5
    assert check_k(np.int64(1), 1) == 1
    with pytest.raises(ConfigError) as err:
        check_k(2000, 999, "eval.k")
    assert str(err.value) == (
        "eval.k=2000 is larger than the 999 items each query can retrieve; "
        "use eval.k=10 or a larger gallery"
    )
    with pytest.raises(ConfigError, match="k=7 is larger than the 6 items a query can retrieve"):
        check_k(7, 6, where="a query can retrieve from the gallery", fix="lower ks")
    with pytest.raises(ConfigError, match="eval.k=4 is larger than the 3 items .* use eval.k=3 "):
        check_k(4, 3, "eval.k")
    for bad in (0, -1, True, 1.0):
        with pytest.raises(ConfigError, match="must be a positive integer"):
            check_k(bad, 10)
