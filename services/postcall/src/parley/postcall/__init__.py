"""Parley postcall."""
