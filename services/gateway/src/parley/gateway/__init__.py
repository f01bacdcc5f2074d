"""Parley gateway."""
