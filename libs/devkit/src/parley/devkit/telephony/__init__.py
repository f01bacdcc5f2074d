"""The Twilio side of the telephony test kit.

- :mod:`.twilio_protocol`: Media Streams messages and X-Twilio-Signature, as Twilio produces them.
- :mod:`.playback`: Twilio's outbound playback semantics (real-time play, marks, clear).
- :mod:`.media_stream_client`: Twilio's end of one Media Stream, driven by a script.
- :mod:`.caller_simulator`: an inbound call against a gateway (``parley call``).
- :mod:`.twilio_emulator`: the Calls REST API that "dials" the gateway, for the twilio SDK.
"""
