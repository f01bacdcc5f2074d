"""TwiML the gateway answers with, built with the twilio SDK's ``VoiceResponse``.

Pure functions of the configuration and the call, so they are unit-testable and shared by the
voice webhook, the reconnect action and REST redirects (DTMF, transfer, voicemail).
"""

from __future__ import annotations

from urllib.parse import urlencode

from twilio.twiml.voice_response import VoiceResponse

from parley.common.configuration import AgentSettings

from ..config import GatewayConfig
from ..replays import STREAM_TOKEN, Connect

STREAM_PATH = "/twilio/stream"
RELAY_PATH = "/twilio/relay"
RECONNECT_PATH = "/twilio/voice/reconnect"
NOT_IN_SERVICE = "Sorry, this number is not in service. Goodbye."


def connect_twiml(config: GatewayConfig, settings: AgentSettings, *, call_id: str,
                  org_id: str, agent_id: str, issued: Connect,
                  before: VoiceResponse | None = None, greet: bool = True) -> str:
    """``<Connect action>`` to our stream (cascading) or ConversationRelay (managed).

    The action URL brings a still-live call back to a new socket if this one drops (e.g. the
    instance holding it died); it names the connect (``issued.number``), so that only the
    call's latest connect reconnects. The socket's start must carry ``issued.token``, passed as
    the ``stream_token`` parameter (:mod:`parley.gateway.replays`). ``before`` holds verbs to
    run first (``<Play digits>``). ``greet``: ConversationRelay says the agent's greeting as the
    caller connects — at the call's start, not when a live call comes back to a new socket.
    """
    response = before or VoiceResponse()
    query = urlencode({"call_id": call_id, "connect": issued.number})
    action = f"{config.public_base}{RECONNECT_PATH}?{query}"
    connect = response.connect(action=action, method="POST")
    params = {"call_id": call_id, "org_id": org_id, "agent_id": agent_id,
              STREAM_TOKEN: issued.token}
    if settings.pipeline == "managed":
        relay = connect.conversation_relay(
            url=config.public_ws_base + RELAY_PATH,
            voice=settings.voice or None,
            language=settings.language,
            welcome_greeting=(settings.greeting or None) if greet else None,
            welcome_greeting_interruptible=settings.interruption_mode,
            interruptible=settings.interruption_mode,
            interrupt_sensitivity=settings.interruption_sensitivity,
            dtmf_detection=True,
            # the caller's words as they speak (transcript.partial): the brain's warm-up starts
            # before the turn ends, and the idle clock knows the caller is talking
            partial_prompts=True,
            # info messages: the text it played and when its speech stops, which is how the
            # relay knows a turn has played out (agent.speech.finished; see relay_playback)
            events="speaker-events tokens-played",
        )
        for name, value in params.items():
            relay.parameter(name=name, value=value)
    else:
        stream = connect.stream(url=config.public_ws_base + STREAM_PATH)
        for name, value in params.items():
            stream.parameter(name=name, value=value)
    return str(response)


def digits_then_connect(config: GatewayConfig, settings: AgentSettings, digits: str, *,
                        call_id: str, org_id: str, agent_id: str, issued: Connect) -> str:
    """Play DTMF tones, then reconnect the call to a new stream (connect ``issued``)."""
    response = VoiceResponse()
    response.play(digits=digits)
    return connect_twiml(config, settings, call_id=call_id, org_id=org_id, agent_id=agent_id,
                         issued=issued, before=response, greet=False)


def digits_play_s(digits: str) -> float:
    """About how long Twilio takes to play ``digits``: 0.5 s a digit, pauses included.

    (A ``w`` is a 0.5 s pause.)
    """
    return 0.5 * len(digits)


def dial_twiml(to: str, *, caller_id: str | None = None) -> str:
    """Hand the call to ``to`` (a cold transfer)."""
    response = VoiceResponse()
    response.dial(to, caller_id=caller_id)
    return str(response)


def say_and_hangup(message: str, *, language: str = "en-US", voice: str = "") -> str:
    """Say a message, then hang up (unknown number, voicemail)."""
    response = VoiceResponse()
    if message:
        response.say(message, language=language, voice=voice or None)
    response.hangup()
    return str(response)


def hangup_twiml() -> str:
    """Just hang up."""
    response = VoiceResponse()
    response.hangup()
    return str(response)


def outbound_callback_urls(config: GatewayConfig, *, call_id: str, org_id: str,
                           agent_id: str) -> dict[str, str]:
    """Callback URLs for ``client.calls.create`` (the contract with the outbound API).

    Twilio signs the full URL, query included, so the ids in the query are trustworthy: the
    webhooks use them when a callback overtakes the API's own ``carrier_calls`` insert.
    Keys match the SDK's keyword arguments: ``url``, ``status_callback``,
    ``async_amd_status_callback`` and ``recording_status_callback``.
    """
    query = urlencode({"call_id": call_id, "org_id": org_id, "agent_id": agent_id})
    base = config.public_base
    return {
        "url": f"{base}/twilio/voice?{query}",
        "status_callback": f"{base}/twilio/status?{query}",
        "async_amd_status_callback": f"{base}/twilio/amd?{query}",
        "recording_status_callback": f"{base}/twilio/recording?{query}",
    }
