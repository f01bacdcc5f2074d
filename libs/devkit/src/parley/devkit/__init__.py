"""Parley devkit."""
