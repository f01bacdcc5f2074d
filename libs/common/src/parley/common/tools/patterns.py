"""Regular expressions of tool schemas, matched against model arguments with a time limit.

A tool's parameters schema is the org's to write, and its arguments come from the model (which
a caller can steer). A ``pattern`` such as ``^(a+)+$`` against thirty-odd characters takes the
standard ``re`` minutes, holding the GIL all along: the tools service, shared by every org,
stopped for all of them. JSON Schema validation here matches ``pattern``, ``patternProperties``
(and the ``additionalProperties`` that depends on them) with the ``regex`` module and a timeout
instead: an argument too costly to check is an invalid argument, said so to the model.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import regex  # type: ignore[import-untyped]

PATTERN_TIMEOUT_S = 0.05  # per match; an honest pattern takes microseconds


class _TooCostly(Exception):
    pass


def _search(pattern: str, text: str) -> bool:
    try:
        return regex.search(pattern, text, timeout=PATTERN_TIMEOUT_S) is not None
    except TimeoutError:
        raise _TooCostly from None


def _too_costly(pattern: str) -> jsonschema.ValidationError:
    return jsonschema.ValidationError(
        f"could not be checked against the pattern {pattern!r} in time; send something simpler")


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any,
             ) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "string"):
        return
    try:
        if not _search(pattern, instance):
            yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")
    except _TooCostly:
        yield _too_costly(pattern)


def _pattern_properties(validator: Any, patterns: dict[str, Any], instance: Any, schema: Any,
                        ) -> Iterator[jsonschema.ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            try:
                matched = _search(pattern, key)
            except _TooCostly:
                yield _too_costly(pattern)
                continue
            if matched:
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(original: Any) -> Any:
    def check(validator: Any, additional: Any, instance: Any, schema: Any,
              ) -> Iterator[jsonschema.ValidationError]:
        patterns = schema.get("patternProperties")
        if not patterns or not validator.is_type(instance, "object"):
            yield from original(validator, additional, instance, schema)
            return
        known = schema.get("properties", {})
        extras = []
        for key in instance:
            if key in known:
                continue
            try:
                if any(_search(pattern, key) for pattern in patterns):
                    continue
            except _TooCostly:
                yield _too_costly("|".join(patterns))
                continue
            extras.append(key)
        if validator.is_type(additional, "object"):
            for key in extras:
                yield from validator.descend(instance[key], additional, path=key)
        elif additional is False and extras:
            yield jsonschema.ValidationError(
                f"{', '.join(map(repr, sorted(extras)))} match none of the allowed names")
    return check


_BOUNDED: dict[Any, Any] = {}


def bounded(validator_class: Any) -> Any:
    """``validator_class`` with its regular expressions matched under a time limit."""
    if validator_class not in _BOUNDED:
        _BOUNDED[validator_class] = jsonschema.validators.extend(validator_class, {
            "pattern": _pattern, "patternProperties": _pattern_properties,
            "additionalProperties": _additional_properties(
                validator_class.VALIDATORS["additionalProperties"])})
    return _BOUNDED[validator_class]
