import io
import wave

import numpy as np
import pytest

from parley.devkit.telephony.audio_codec import (
    place_segments,
    read_wav_as_ulaw,
    ulaw_decode,
    ulaw_encode,
    wav_bytes,
)
from parley.devkit.telephony.twiml_reader import (
    ConnectStream,
    Hangup,
    OtherVerb,
    Pause,
    Redirect,
    TwimlError,
    first_stream,
    parse_twiml,
)
from parley.devkit.telephony.webhook_client import UrlMap


def test_ulaw_tables_follow_g711() -> None:
    assert ulaw_encode(np.array([0, -1, 32767, -32768], dtype=np.int16)) == b"\xff\x7e\x80\x00"
    assert list(ulaw_decode(b"\xff\x7f\x80\x00")) == [0, 0, 32124, -32124]
    ramp = np.linspace(-30000, 30000, 2001).astype(np.int16)
    error = np.abs(ulaw_decode(ulaw_encode(ramp)).astype(int) - ramp)
    assert (error <= np.abs(ramp.astype(int)) / 16 + 8).all()  # µ-law: ~4 bits of mantissa


def write_wav(path, samples: np.ndarray, rate: int, width: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())


@pytest.mark.parametrize("rate,width,channels", [(16000, 2, 1), (44100, 2, 2), (8000, 1, 1),
                                                 (48000, 3, 1), (22050, 4, 2)])
def test_wav_files_of_any_format_become_8khz_ulaw(tmp_path, rate, width, channels) -> None:
    t = np.arange(rate // 2) / rate  # 0.5 s of 440 Hz at half scale
    wave_ = np.sin(2 * np.pi * 440 * t) * 0.5
    if width == 1:
        samples = np.round(wave_ * 127 + 128).astype(np.uint8)
    elif width == 3:
        ints = np.round(wave_ * (2**23 - 1)).astype("<i4")
        samples = ints.view(np.uint8).reshape(-1, 4)[:, :3].copy()
    else:
        samples = np.round(wave_ * (2 ** (8 * width - 1) - 1)).astype(f"<i{width}")
    if channels == 2:
        samples = np.repeat(samples, 2, axis=0)
    write_wav(tmp_path / "in.wav", samples, rate, width, channels)
    audio = ulaw_decode(read_wav_as_ulaw(tmp_path / "in.wav")).astype(float)
    assert len(audio) == pytest.approx(4000, abs=2)
    assert np.sqrt((audio**2).mean()) / 32768 == pytest.approx(0.5 / np.sqrt(2), rel=0.06)


def test_segments_are_placed_at_their_time_and_wav_bytes_are_multichannel() -> None:
    track = place_segments([(0.5, ulaw_encode(np.full(80, 1000, dtype=np.int16)))], 8000)
    assert len(track) == 8000 and (track[:4000] == 0).all() and (track[4000:4080] > 900).all()
    with wave.open(io.BytesIO(wav_bytes([track, track[:10]]))) as wav:
        assert (wav.getnchannels(), wav.getnframes(), wav.getframerate()) == (2, 8000, 8000)


def test_twiml_connect_stream_is_read_with_its_parameters_and_action() -> None:
    verbs = parse_twiml(
        '<?xml version="1.0" encoding="UTF-8"?><Response><Say>Hi</Say>'
        '<Connect action="https://g.test/twilio/voice?reconnect=1">'
        '<Stream url="wss://g.test/twilio/stream"><Parameter name="call_id" value="c1"/>'
        '<Parameter name="org" value="o1"/></Stream></Connect>'
        '<Pause length="2"/><Redirect method="GET">https://g.test/next</Redirect><Hangup/>'
        '</Response>')
    assert verbs == [
        OtherVerb("Say", "Hi"),
        ConnectStream("wss://g.test/twilio/stream", {"call_id": "c1", "org": "o1"},
                      "https://g.test/twilio/voice?reconnect=1", "POST"),
        Pause(2.0), Redirect("https://g.test/next", "GET"), Hangup()]
    assert first_stream(verbs).parameters["org"] == "o1"
    with pytest.raises(TwimlError, match="no <Connect><Stream>"):
        first_stream(parse_twiml("<Response><Hangup/></Response>"))
    for bad in ("<Reply/>", "not xml", "<Response><Connect><Stream/></Connect></Response>"):
        with pytest.raises(TwimlError):
            parse_twiml(bad)


def test_public_urls_are_mapped_to_the_gateways_real_address() -> None:
    urls = UrlMap(public_url="https://voice.example.com", actual_url="http://127.0.0.1:8080")
    assert urls.actual_for("wss://voice.example.com/twilio/stream?x=1") == \
        "ws://127.0.0.1:8080/twilio/stream?x=1"
    assert urls.actual_for("https://voice.example.com:443/twilio/status") == \
        "http://127.0.0.1:8080/twilio/status"
    assert urls.actual_for("https://elsewhere.test/hook") == "https://elsewhere.test/hook"
    prefixed = UrlMap(public_url="https://x.test/parley", actual_url="http://127.0.0.1:9/gw")
    assert prefixed.actual_for("wss://x.test/parley/twilio/stream") == \
        "ws://127.0.0.1:9/gw/twilio/stream"
    assert prefixed.actual_for("https://x.test/other") == "https://x.test/other"
    assert UrlMap().actual_for("wss://a.test/s") == "wss://a.test/s"


def test_a_stream_url_twilio_would_refuse_is_refused() -> None:
    """Twilio connects Media Streams over wss only and takes no query string on <Stream url>.

    Twilio error 31922: values go to the socket as <Parameter>s (the start message's
    customParameters), never in the URL, which Twilio does not deliver. The test kit used to
    connect to such a URL as it was, so a gateway relying on its query passed here and failed
    on the real Twilio. (``ws://`` stays allowed: a local gateway has no TLS.)
    """
    for url in ("wss://g.test/twilio/stream?call_id=c1", "wss://g.test/twilio/stream?",
                "https://g.test/twilio/stream", "g.test/twilio/stream"):
        with pytest.raises(TwimlError, match="31922"):
            parse_twiml(f'<Response><Connect><Stream url="{url}"/></Connect></Response>')
    assert parse_twiml('<Response><Connect><Stream url="ws://127.0.0.1:8080/twilio/stream"/>'
                       '</Connect></Response>') == [ConnectStream(
                           "ws://127.0.0.1:8080/twilio/stream", {}, None, "POST")]
