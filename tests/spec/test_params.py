"""Record: a table checked against declared keys; data_refs through records."""

import pytest

from evc.spec import parse_spec
from evc.spec.params import DataRef, Float, Int, Invalid, Param, PerLayer, Ratio, Record, data_refs

SEARCH = Record((
    Param("tolerance", Float(0, open_low=True), 0.01, "accuracy drop allowed"),
    Param("step", Int(1), 8, "tokens removed per step"),
    Param("data", DataRef(), help="images to measure on"),
))


def value(text):
    """The value of `v = TEXT` as the parser gives it."""
    return parse_spec(f"evc 1\nmodel m {{ v = {text} }}\n", "t.evc").blocks[0].entries[0].value


def invalid(kind, text) -> Invalid:
    with pytest.raises(Invalid) as caught:
        kind.check(value(text))
    return caught.value


def test_record_text_names_its_keys():
    assert SEARCH.text == "a table of tolerance, step, data"


def test_record_checks_to_a_dict_with_every_key_and_defaults_filled_in():
    assert SEARCH.check(value("{ data = calib, step = 16 }")) == {"tolerance": 0.01, "step": 16, "data": "calib"}


def test_record_reports_an_unknown_key_with_did_you_mean():
    e = invalid(SEARCH, "{ tolerence = 0.1, data = calib }")
    assert (e.message, e.span.col, e.hint) == ("unknown key 'tolerence' in the table", 17, "did you mean 'tolerance'?")


def test_record_reports_a_duplicate_key():
    e = invalid(SEARCH, "{ step = 4, step = 8, data = calib }")
    assert (e.message, e.span.col) == ("duplicate key 'step' in the table", 27)


def test_record_reports_a_missing_required_key_at_the_table_with_its_help():
    e = invalid(SEARCH, "{ step = 4 }")
    assert (e.message, e.span.col, e.hint) == ("the table is missing required key 'data'", 15, "images to measure on")


def test_record_prefixes_a_bad_value_with_its_key():
    e = invalid(SEARCH, "{ step = 0, data = calib }")
    assert (e.message, e.span.col) == ("step: 0 is out of range: expected an integer >= 1", 24)


def test_record_refuses_a_value_that_is_not_a_table():
    e = invalid(SEARCH, "0.5")
    assert e.message == "expected a table of tolerance, step, data, found a number"


def test_records_nest_and_keep_per_layer_lists():
    outer = Record((Param("keep", Ratio(), 1.0, per_layer=True), Param("search", SEARCH, None)))
    checked = outer.check(value("{ keep = [1, 0.5], search = { data = calib } }"))
    assert checked["keep"] == PerLayer((1.0, 0.5), None)
    assert checked["search"]["data"] == "calib"
    e = invalid(outer, "{ search = { data = calib, step = 1.5 } }")
    assert e.message == "search: step: expected an integer >= 1, found a number"


def test_a_record_default_of_none_reads_none():
    assert Param("search", SEARCH, None).describe_default() == "none"


def test_data_refs_finds_names_inside_records():
    params = (Param("data", DataRef(), None), Param("search", SEARCH, None),
              Param("outer", Record((Param("inner", SEARCH, None),)), None))
    values = {"data": "a", "search": {"tolerance": 0.01, "step": 8, "data": "b"},
              "outer": {"inner": {"tolerance": 0.01, "step": 8, "data": "c"}}}
    assert data_refs(params, values) == ["a", "b", "c"]
    assert data_refs(params, {"data": None, "search": None, "outer": None}) == []


def test_flag_reads_true_and_false_and_refuses_other_names():
    from evc.spec.params import Flag

    assert (Flag().check(value("true")), Flag().check(value("false"))) == (True, False)
    assert invalid(Flag(), "yes").message == "expected true or false, found yes"
    assert Param("fuse", Flag(), False).describe_default() == "false"
