"""Experiments from the papers, as library code (see README)."""
