"""Parley brain."""
