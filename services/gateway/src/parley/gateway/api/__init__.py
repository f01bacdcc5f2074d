"""The public HTTP API (/v1, X-API-Key): place and read calls."""
