"""Parley common."""
