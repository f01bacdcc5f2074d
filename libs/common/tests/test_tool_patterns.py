"""Tool schemas' regular expressions are matched against model arguments under a time limit."""

from __future__ import annotations

import time

from parley.common.tools.definitions import argument_errors

EVIL = "^(a|aa)+$"  # catastrophic backtracking on a run of a's that does not match


def timed(schema: dict, arguments: dict) -> tuple[list[str], float]:
    started = time.perf_counter()
    errors = argument_errors(schema, arguments)
    return errors, time.perf_counter() - started


def test_a_costly_pattern_fails_the_argument_fast_instead_of_freezing_the_service() -> None:
    schema = {"type": "object", "properties": {"code": {"type": "string", "pattern": EVIL}}}
    errors, took = timed(schema, {"code": "a" * 40 + "!"})  # `re` would take hours
    assert took < 1.0
    assert len(errors) == 1 and "in time" in errors[0], errors


def test_patterns_still_match_and_refuse_as_before() -> None:
    schema = {"type": "object", "properties": {"account": {"type": "string",
                                                           "pattern": "^[0-9]+$"}}}
    assert argument_errors(schema, {"account": "12345"}) == []
    assert argument_errors(schema, {"account": "12a"}) == [
        "account: '12a' does not match '^[0-9]+$'"]


def test_pattern_properties_and_the_additional_properties_they_admit() -> None:
    schema = {"type": "object", "patternProperties": {"^x_[a-z]+$": {"type": "integer"}},
              "properties": {"name": {"type": "string"}}, "additionalProperties": False}
    assert argument_errors(schema, {"name": "n", "x_count": 3}) == []
    assert argument_errors(schema, {"x_count": "three"}) == [
        "x_count: 'three' is not of type 'integer'"]
    [error] = argument_errors(schema, {"other": 1})
    assert "'other'" in error
    costly = {"type": "object", "patternProperties": {EVIL: {"type": "integer"}},
              "additionalProperties": False}
    errors, took = timed(costly, {"a" * 40 + "!": 1})
    assert took < 1.0 and errors and all("in time" in e for e in errors), errors
