"""Parley billing."""
