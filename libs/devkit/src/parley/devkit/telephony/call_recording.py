"""A call recording in the emulator: when it started, where its callback goes, its WAV.

A recording starts at answer (``Record=true`` on create, source ``OutboundAPI``) or when asked
for on a live call (``POST …/Calls/{CallSid}/Recordings.json``, source
``StartCallRecordingAPI``), and is finished when the call ends: the WAV holds the callee (left)
and what the gateway played (right) from the start of the recording, or their mix when mono.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime

from parley.devkit.telephony.audio_codec import SAMPLE_RATE, mix_down, place_segments, wav_bytes
from parley.devkit.telephony.twilio_protocol import new_sid

# (stream start, callee audio sent, agent audio played as (start, µ-law)), seconds from answer
StreamSegment = tuple[float, bytes, list[tuple[float, bytes]]]


@dataclass(kw_only=True)
class Recording:
    """One recording of one call."""

    callback: str | None
    callback_method: str = "POST"
    channels: str = "mono"  # or "dual"
    source: str = "OutboundAPI"
    offset: float = 0.0  # seconds after answer when recording began
    sid: str = field(default_factory=lambda: new_sid("RE"))
    started: datetime = field(default_factory=lambda: datetime.now(UTC))
    seconds: float | None = None  # set when finished

    def finish(self, segments: list[StreamSegment]) -> bytes:
        """The WAV of the call from :attr:`offset` on; sets :attr:`seconds`."""
        callee = place_segments([(start, caller) for start, caller, _ in segments])
        agent = place_segments([(start + at, audio) for start, _, played in segments
                                for at, audio in played])
        skip = round(self.offset * SAMPLE_RATE)
        callee, agent = callee[skip:], agent[skip:]
        self.seconds = max(len(callee), len(agent)) / SAMPLE_RATE
        if self.channels == "dual":
            return wav_bytes([callee, agent])
        return wav_bytes([mix_down([callee, agent])])

    def callback_params(self, *, account_sid: str, call_sid: str, url: str) -> dict[str, str]:
        """What Twilio posts to the recording status callback once the file is ready."""
        return {"AccountSid": account_sid, "CallSid": call_sid, "RecordingSid": self.sid,
                "RecordingUrl": url, "RecordingStatus": "completed",
                "RecordingDuration": str(round(self.seconds or 0)),
                "RecordingChannels": "2" if self.channels == "dual" else "1",
                "RecordingSource": self.source, "RecordingTrack": "both",
                "RecordingStartTime": format_datetime(self.started), "ErrorCode": "0"}
