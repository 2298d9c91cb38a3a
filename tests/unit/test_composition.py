"""Composition helpers: a nested group's option written as a key's value."""

from __future__ import annotations

from siamese.composition import group_set_as_value


def test_a_group_option_written_as_a_value_names_the_group_form():
    line = group_set_as_value(["trainer.max_epochs=3", "data.augment=photo"])
    assert line is not None
    assert "data.augment=photo" in line and "data/augment=photo" in line
    # The group form itself, a real value, null, an added key and a deletion pass.
    for ok in (
        "data/augment=photo",
        "data.augment.size=64",
        "data.augment=null",
        "+data.augment=photo",
        "~data.augment",
        "model.name=photo",
    ):
        assert group_set_as_value([ok]) is None, ok
