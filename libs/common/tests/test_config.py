from __future__ import annotations

import enum
from typing import Annotated, Literal

import msgspec
import pytest

from parley.common.config import CommonConfig, ConfigError, load_config


class Codec(enum.Enum):
    PCMU = "pcmu"
    OPUS = "opus"


class RecorderConfig(CommonConfig, kw_only=True):
    recorder_batch_size: Annotated[int, msgspec.Meta(ge=1)] = 100
    flush_seconds: float = 1.5
    dry_run: bool = False
    mode: Literal["fast", "safe"] = "safe"
    codec: Codec = Codec.PCMU
    regions: list[str] = msgspec.field(default_factory=list)
    max_calls: int | None = None


class Required(msgspec.Struct, kw_only=True):
    api_base: str
    retries: int = 3


def test_defaults_when_environment_is_empty() -> None:
    config = load_config(CommonConfig, environ={})
    assert config == CommonConfig()
    assert config.nats_url == "nats://127.0.0.1:4222"
    assert config.ops_port == 0


def test_reads_and_converts_every_supported_type() -> None:
    config = load_config(
        RecorderConfig,
        environ={
            "PARLEY_NATS_URL": "nats://nats:4222",
            "PARLEY_OPS_PORT": "9100",
            "PARLEY_EVENTS_MAX_AGE_DAYS": "2.5",
            "PARLEY_RECORDER_BATCH_SIZE": "25",
            "PARLEY_FLUSH_SECONDS": "0.25",
            "PARLEY_DRY_RUN": "yes",
            "PARLEY_MODE": "fast",
            "PARLEY_CODEC": "opus",
            "PARLEY_REGIONS": "eu-west, us-east,,",
            "PARLEY_MAX_CALLS": "7",
            "UNRELATED": "ignored",
        },
    )
    assert config.nats_url == "nats://nats:4222"
    assert config.ops_port == 9100
    assert config.events_max_age_days == 2.5
    assert config.recorder_batch_size == 25
    assert config.flush_seconds == 0.25
    assert config.dry_run is True
    assert config.mode == "fast"
    assert config.codec is Codec.OPUS
    assert config.regions == ["eu-west", "us-east"]
    assert config.max_calls == 7


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("1", True), ("TRUE", True), ("yes", True), ("0", False), ("False", False), ("no", False)],
)
def test_boolean_words(raw: str, expected: bool) -> None:
    assert load_config(RecorderConfig, environ={"PARLEY_DRY_RUN": raw}).dry_run is expected


def test_optional_field_accepts_empty_as_none() -> None:
    assert load_config(RecorderConfig, environ={"PARLEY_MAX_CALLS": ""}).max_calls is None


def test_custom_prefix() -> None:
    config = load_config(RecorderConfig, prefix="REC_", environ={"REC_FLUSH_SECONDS": "3"})
    assert config.flush_seconds == 3.0


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARLEY_LOG_LEVEL", "DEBUG")
    assert load_config(CommonConfig).log_level == "DEBUG"


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"PARLEY_RECORDER_BATCH_SIZE": "many"},
            "PARLEY_RECORDER_BATCH_SIZE: Expected `int`, got `str`",
        ),
        ({"PARLEY_RECORDER_BATCH_SIZE": "0"}, "PARLEY_RECORDER_BATCH_SIZE: Expected `int` >= 1"),
        ({"PARLEY_DRY_RUN": "maybe"}, "PARLEY_DRY_RUN: Expected `bool`, got `str`"),
        ({"PARLEY_MODE": "reckless"}, "PARLEY_MODE: Invalid enum value 'reckless'"),
        ({"PARLEY_CODEC": "mp3"}, "PARLEY_CODEC: Invalid enum value 'mp3'"),
    ],
)
def test_invalid_value_names_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(RecorderConfig, environ=environ)
    assert str(caught.value) == message
    assert isinstance(caught.value, ValueError)


def test_missing_required_variable_names_it() -> None:
    with pytest.raises(ConfigError, match="^PARLEY_API_BASE: required variable is not set$"):
        load_config(Required, environ={"PARLEY_RETRIES": "1"})


def test_required_variable_present() -> None:
    config = load_config(Required, environ={"PARLEY_API_BASE": "http://llm"})
    assert config == Required(api_base="http://llm", retries=3)


def test_rejects_non_struct() -> None:
    with pytest.raises(TypeError):
        load_config(dict, environ={})  # type: ignore[type-var]


def test_niceness_is_checked_against_the_kernels_range() -> None:
    assert load_config(CommonConfig, environ={"PARLEY_NICE": "-5"}).nice == -5
    with pytest.raises(ConfigError, match="PARLEY_NICE"):
        load_config(CommonConfig, environ={"PARLEY_NICE": "-21"})
