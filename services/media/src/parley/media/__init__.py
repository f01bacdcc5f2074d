"""Parley media."""
