"""Plivo: callbacks, the audio stream socket, V3 signatures and REST call control."""
