"""Parley recorder."""
