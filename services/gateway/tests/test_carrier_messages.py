"""The decoding every carrier socket shares: unknown events are tolerated, their label bounded."""

import pytest

from parley.common.metrics import Metrics
from parley.gateway.carrier_messages import MAX_EVENT_LABELS, UnknownMessage, event_label
from parley.gateway.close_codes import CloseCode, ProtocolViolation
from parley.gateway.plivo.protocol import decode_message as plivo_message
from parley.gateway.twilio.media_stream import Media
from parley.gateway.twilio.media_stream import decode_message as stream_message
from parley.gateway.twilio.relay import decode_message as relay_message


def test_only_a_string_event_we_do_not_know_is_tolerated():
    assert stream_message('{"event": "transcription", "x": [1]}') == UnknownMessage(
        "transcription")
    assert relay_message('{"type": "hello"}') == UnknownMessage("hello")
    assert plivo_message('{"event": "stop", "streamId": "s"}') == UnknownMessage("stop")
    assert isinstance(stream_message('{"event": "media", "sequenceNumber": "2", '
                                     '"media": {"payload": ""}}'), Media)
    for data, code in [
        ('{"event": "media", "sequenceNumber": "2"}', CloseCode.INVALID_MESSAGE),  # known, bad
        ('{"event": 5}', CloseCode.INVALID_MESSAGE),
        ('{"event": null}', CloseCode.INVALID_MESSAGE),
        ('{"streamSid": "MZ1"}', CloseCode.INVALID_MESSAGE),
        ('["event", "teleport"]', CloseCode.INVALID_MESSAGE),
        ('"teleport"', CloseCode.INVALID_MESSAGE),
        ('{"event": "teleport"', CloseCode.UNSUPPORTED_DATA),
    ]:
        with pytest.raises(ProtocolViolation) as raised:
            stream_message(data)
        assert raised.value.code == code, data


def test_event_labels_are_cut_reduced_and_capped_per_gateway():
    metrics = Metrics("gateway")
    assert event_label(metrics, "dtmf") == "dtmf"
    assert event_label(metrics, "a.b c" + "x" * 40) == "a_b_c" + "x" * 27
    assert event_label(metrics, "") == "other"
    names = [f"event{n}" for n in range(MAX_EVENT_LABELS)]
    labels = [event_label(metrics, name) for name in names]
    assert labels == names[:MAX_EVENT_LABELS - 2] + ["other", "other"]
    assert event_label(metrics, "dtmf") == "dtmf"  # a name already counted keeps its label
    assert event_label(Metrics("gateway"), "event99") == "event99"  # another gateway's budget
