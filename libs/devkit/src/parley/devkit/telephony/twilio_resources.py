"""The JSON the emulator answers with, in Twilio's shapes: Call, Recording, and errors."""

from __future__ import annotations

from datetime import datetime
from email.utils import format_datetime
from typing import Any

from aiohttp import web

from parley.devkit.telephony.call_recording import Recording
from parley.devkit.telephony.emulated_call import EmulatedCall
from parley.devkit.telephony.webhook_client import API_VERSION

_CALL_SUBRESOURCES = ("notifications", "recordings", "payments", "events", "siprec", "streams",
                      "transcriptions", "user_defined_message_subscriptions",
                      "user_defined_messages")


def twilio_error(status: int, code: int, message: str) -> web.Response:
    """An error in Twilio's shape: ``{code, message, more_info, status}``."""
    body = {"code": code, "message": message,
            "more_info": f"https://www.twilio.com/docs/errors/{code}", "status": status}
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


def not_found(path: str) -> web.Response:
    """Twilio's 404 for an unknown resource."""
    return twilio_error(404, 20404, f"The requested resource {path} was not found")


def _date(value: datetime | None) -> str | None:
    return format_datetime(value) if value is not None else None  # RFC 2822, "+0000"


def call_resource(call: EmulatedCall) -> dict[str, Any]:
    """A Call resource."""
    account = call.dialer.account_sid
    base = f"/{API_VERSION}/Accounts/{account}/Calls/{call.sid}"
    return {
        "account_sid": account, "annotation": None, "answered_by": call.answered_by,
        "api_version": API_VERSION, "caller_name": None,
        "date_created": _date(call.date_created), "date_updated": _date(call.date_updated),
        "direction": "outbound-api",
        "duration": str(call.duration) if call.duration is not None else None,
        "end_time": _date(call.end_time), "forwarded_from": None, "from": call.request.from_,
        "from_formatted": call.request.from_, "group_sid": None, "parent_call_sid": None,
        "phone_number_sid": None, "price": None, "price_unit": "USD", "queue_time": "0",
        "sid": call.sid, "start_time": _date(call.start_time), "status": call.status,
        "subresource_uris": {name: f"{base}/{name.title().replace('_', '')}.json"
                             for name in _CALL_SUBRESOURCES},
        "to": call.request.to, "to_formatted": call.request.to, "trunk_sid": None,
        "uri": f"{base}.json",
    }


def recording_resource(call: EmulatedCall, recording: Recording) -> dict[str, Any]:
    """A call Recording resource, as answered when one is started."""
    account = call.dialer.account_sid
    return {
        "account_sid": account, "api_version": API_VERSION, "call_sid": call.sid,
        "conference_sid": None, "channels": 2 if recording.channels == "dual" else 1,
        "date_created": _date(recording.started), "date_updated": _date(recording.started),
        "start_time": _date(recording.started), "duration": "-1", "sid": recording.sid,
        "price": None, "price_unit": "USD", "status": "in-progress",
        "source": recording.source, "error_code": None, "encryption_details": None,
        "track": "both",
        "uri": f"/{API_VERSION}/Accounts/{account}/Calls/{call.sid}/Recordings/"
               f"{recording.sid}.json",
    }
