"""Offline providers: Whisper (faster-whisper, bundled tiny.en) and Piper (bundled voice)."""
