"""Typed service configuration read from ``PARLEY_*`` environment variables.

A service declares its settings as a ``msgspec.Struct`` (usually a subclass of
:class:`CommonConfig`); :func:`load_config` reads one environment variable per field, named
``prefix + FIELD_NAME``, and lets msgspec convert and validate the strings. Errors name the
variable so an operator can fix the deployment without reading code.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import inspect as msgspec_inspect

__all__ = ["CommonConfig", "ConfigError", "Niceness", "load_config"]

T = TypeVar("T", bound=msgspec.Struct)

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})
_NONE_WORDS = frozenset({"", "none", "null"})
_COLLECTION_TYPES = (
    msgspec_inspect.ListType,
    msgspec_inspect.SetType,
    msgspec_inspect.FrozenSetType,
    msgspec_inspect.VarTupleType,
    msgspec_inspect.TupleType,
)
# msgspec reports the failing location as " - at `$.field[...]`"; we replace it with the variable.
_LOCATION = re.compile(r" - at `\$\.(?P<field>[^`.\[]+)[^`]*`$")


# A scheduling niceness (see parley.common.runtime.set_niceness).
Niceness = Annotated[int, msgspec.Meta(ge=-20, le=19)]


class ConfigError(ValueError):
    """A configuration variable is missing or holds a value of the wrong shape."""


class CommonConfig(msgspec.Struct, kw_only=True):
    """Settings every Parley service shares; services subclass it with their own fields."""

    nats_url: str = "nats://127.0.0.1:4222"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/parley"
    log_level: str = "INFO"
    ops_port: int = 0  # 0 lets the OS pick a free port; the bound port is logged.
    ops_host: str = "127.0.0.1"
    events_replicas: int = 1
    events_max_age_days: float = 7.0
    audio_max_age_minutes: float = 30.0
    instance_id: str = ""
    # Scheduling niceness for every thread, -20..19 (0: leave it as started); below the
    # current value needs CAP_SYS_NICE. See parley.common.runtime.set_niceness.
    nice: Niceness = 0


def load_config(
    cls: type[T], *, prefix: str = "PARLEY_", environ: Mapping[str, str] | None = None
) -> T:
    """Build ``cls`` from environment variables named ``prefix + FIELD_NAME`` (upper case).

    Absent variables fall back to the field default. Raises :class:`ConfigError` naming the
    variable when a required one is missing or a value cannot be converted or validated.
    """
    env = os.environ if environ is None else environ
    info = msgspec_inspect.type_info(cls)
    if not isinstance(info, msgspec_inspect.StructType):
        raise TypeError(f"load_config expects a msgspec.Struct subclass, got {cls!r}")

    raw: dict[str, Any] = {}
    variable_by_key: dict[str, str] = {}
    for field in info.fields:
        variable = f"{prefix}{field.name.upper()}"
        variable_by_key[field.encode_name] = variable
        if variable in env:
            raw[field.encode_name] = _prepare(env[variable], field.type)
        elif field.required:
            raise ConfigError(f"{variable}: required variable is not set")

    try:
        return msgspec.convert(raw, cls, strict=False)
    except msgspec.ValidationError as exc:
        raise ConfigError(_describe(str(exc), variable_by_key)) from exc


def _prepare(value: str, field_type: msgspec_inspect.Type) -> Any:
    """Reshape one raw string so that msgspec's lax conversion can take it from there."""
    options = (
        field_type.types if isinstance(field_type, msgspec_inspect.UnionType) else (field_type,)
    )
    word = value.strip().lower()
    if any(isinstance(t, msgspec_inspect.NoneType) for t in options) and word in _NONE_WORDS:
        return None
    if any(isinstance(t, _COLLECTION_TYPES) for t in options):
        return [item.strip() for item in value.split(",") if item.strip()]
    if any(isinstance(t, msgspec_inspect.BoolType) for t in options):
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
    return value


def _describe(message: str, variable_by_key: Mapping[str, str]) -> str:
    match = _LOCATION.search(message)
    if match is None:
        return message
    variable = variable_by_key.get(match["field"], match["field"])
    return f"{variable}: {message[: match.start()]}"
