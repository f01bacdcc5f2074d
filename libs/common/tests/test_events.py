import typing
import uuid
from datetime import UTC, datetime

import msgspec
import pytest

from parley.common import events
from parley.common.events import EVENT_TYPES, EventDecodeError, decode, encode


def _sample_value(annotation: object, name: str) -> object:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base = typing.get_args(annotation)[0]
        return "tok_" + name.replace("_", "") if base is str else _sample_value(base, name)
    if origin is typing.Literal:
        return typing.get_args(annotation)[-1]
    if origin in (list,):
        (item,) = typing.get_args(annotation)
        return [_sample_value(item, name)]
    if origin in (dict,):
        return {"k": "v"}
    if origin in (typing.Union, __import__("types").UnionType):
        return _sample_value(typing.get_args(annotation)[0], name)
    if annotation is str:
        return f"{name} value"
    if annotation is int:
        return 7
    if annotation is float:
        return 1.5
    if annotation is bool:
        return True
    if annotation is typing.Any:
        return {"any": [1, "two"]}
    if annotation is uuid.UUID:
        return uuid.UUID("01900000-0000-7000-8000-000000000001")
    if annotation is datetime:
        return datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        hints = typing.get_type_hints(annotation, include_extras=True)
        return annotation(**{f: _sample_value(hints[f], f)
                             for f in annotation.__struct_fields__})
    raise AssertionError(f"no sample for {annotation!r}")


def _full_instance(cls: type[events.Event]) -> events.Event:
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {field: _sample_value(hints[field], field) for field in cls.__struct_fields__}
    return cls(**values)


@pytest.mark.parametrize("tag", sorted(EVENT_TYPES))
def test_every_type_round_trips_with_every_field_set(tag: str) -> None:
    event = _full_instance(EVENT_TYPES[tag])
    decoded = decode(encode(event))
    assert decoded == event
    assert type(decoded) is EVENT_TYPES[tag]
    assert decoded.type == tag


def test_tags_are_explicit_dotted_strings_not_class_names() -> None:
    for tag, cls in EVENT_TYPES.items():
        assert "." in tag and tag != cls.__name__


def test_the_architecture_catalog_is_complete() -> None:
    expected = {
        "call.requested", "call.dialing", "call.ringing", "call.answered",
        "call.machine_detected", "call.stream_started", "call.dtmf", "call.transferred",
        "call.ended", "call.failed", "speech.started", "speech.stopped", "transcript.partial",
        "transcript.final", "turn.user_ended", "agent.speech.started", "agent.speech.progress",
        "agent.speech.interrupted", "agent.speech.finished", "media.provider_switched",
        "turn.started", "agent.say", "turn.completed", "tool.requested", "intent.detected",
        "knowledge.retrieved", "tool.approval_requested", "tool.approved", "tool.denied",
        "tool.completed", "tool.failed", "call.summarized", "recording.attached",
        "webhook.delivered", "webhook.failed", "caller.profile_updated", "usage.recorded",
        "quota.exceeded", "agent.created", "agent.updated", "agent.deleted", "api_key.created",
        "api_key.revoked", "number.assigned", "knowledge.ingested",
    }
    assert expected <= set(EVENT_TYPES)


def test_events_are_frozen_and_keyword_only() -> None:
    event = events.CallEnded(org_id="o1", call_id="c1")
    with pytest.raises(AttributeError):
        event.reason = "busy"  # type: ignore[misc]
    with pytest.raises(TypeError):
        events.CallEnded("o1", "c1")  # type: ignore[misc]


def test_envelope_defaults() -> None:
    event = events.CallRinging(org_id="o1", call_id="c1")
    assert event.id.version == 7
    assert event.at.tzinfo is not None
    assert event.v == 1 and event.causation_id is None
    assert event.aggregate == "call" and event.aggregate_id == "c1"


def test_the_wire_must_carry_the_id_and_an_aware_time() -> None:
    # decode used to make up a missing id (the same bytes, read twice, were two events) and
    # took a naive time (that `parley events show` then could not subtract from an aware one).
    event = events.CallAnswered(org_id="o1", call_id="c1")
    wire = msgspec.json.decode(encode(event))
    without_id = {k: v for k, v in wire.items() if k != "id"}
    without_at = {k: v for k, v in wire.items() if k != "at"}
    naive = {**wire, "at": "2026-01-02T03:04:05"}
    with pytest.raises(EventDecodeError, match="call.answered.*`id`"):
        decode(msgspec.json.encode(without_id))
    with pytest.raises(EventDecodeError, match="call.answered.*`at`"):
        decode(msgspec.json.encode(without_at))
    with pytest.raises(EventDecodeError, match="timezone"):
        decode(msgspec.json.encode(naive))
    assert decode(msgspec.json.encode({**wire, "at": "2026-01-02T03:04:05+02:00"})).at.utcoffset()
    assert decode(encode(event)) == event
    after = events.CallAnswered(org_id="o1", call_id="c1")  # new events still get both
    assert after.id.version == 7 and after.id != event.id and after.at.tzinfo is not None


def test_uuid7_is_time_ordered() -> None:
    ids = [events.uuid7() for _ in range(1000)]
    assert len(set(ids)) == 1000
    stamps = [i.int >> 80 for i in ids]
    assert stamps == sorted(stamps)


def test_unknown_fields_are_tolerated() -> None:
    raw = encode(events.CallEnded(org_id="o1", call_id="c1", duration_s=3.0))
    widened = raw[:-1] + b',"added_in_v9":{"x":1}}'
    decoded = decode(widened)
    assert isinstance(decoded, events.CallEnded) and decoded.duration_s == 3.0


def test_unknown_type_is_named_in_the_error() -> None:
    with pytest.raises(EventDecodeError, match="call.exploded"):
        decode(b'{"type":"call.exploded","org_id":"o1","call_id":"c1"}')


def test_wrong_field_type_names_the_type_and_field() -> None:
    with pytest.raises(EventDecodeError) as caught:
        decode(b'{"type":"call.ended","org_id":"o1","call_id":"c1","duration_s":"long"}')
    assert "call.ended" in str(caught.value) and "duration_s" in str(caught.value)


def test_ids_must_be_subject_tokens() -> None:
    with pytest.raises(EventDecodeError, match="org_id"):
        decode(b'{"type":"call.ended","org_id":"o1.>","call_id":"c1"}')


def test_an_id_with_a_trailing_newline_is_not_a_token() -> None:
    # "$" matches before a final "\n": such an id passed every check and NATS then refused it.
    assert events.is_token("c1") and not events.is_token("c1\n")
    with pytest.raises(EventDecodeError, match="org_id"):
        decode(b'{"type":"call.ended","org_id":"o1\\n","call_id":"c1"}')


def test_malformed_json_is_a_decode_error() -> None:
    with pytest.raises(EventDecodeError, match="not an event"):
        decode(b"{nope")


def test_events_are_not_tracked_by_the_cyclic_collector() -> None:
    import gc

    for event_type in EVENT_TYPES.values():
        assert event_type.__struct_config__.gc is False, event_type
    event = decode(encode(events.TranscriptFinal(org_id="acme", call_id="c1", text="hi")))
    assert not gc.is_tracked(event)
