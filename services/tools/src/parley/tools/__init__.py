"""Parley tools."""
