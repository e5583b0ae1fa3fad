"""Cache keys: canonical forms of checked values."""

from evc.keys import canonical, stage_key
from evc.spec.params import PerLayer
from evc.spec.parse import Span


def test_canonical_turns_a_record_dict_with_per_layer_lists_and_tuples_into_json():
    record = {"keep": PerLayer((1.0, 0.5), Span(1, 1, 1, 2)), "search": {"steps": (8, 16), "data": "calib"}}
    assert canonical({"search": record}) == {"search": {"keep": [1.0, 0.5],
                                                        "search": {"steps": [8, 16], "data": "calib"}}}


def test_a_value_changed_inside_a_record_changes_the_stage_key():
    a = {"search": {"step": 8, "keep": PerLayer((1.0, 0.5), Span(1, 1, 1, 2))}}
    moved = {"search": {"step": 8, "keep": PerLayer((1.0, 0.5), Span(9, 9, 9, 10))}}
    b = {"search": {"step": 16, "keep": PerLayer((1.0, 0.5), Span(1, 1, 1, 2))}}
    assert stage_key(a) == stage_key(moved) != stage_key(b)
