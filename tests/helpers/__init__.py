"""Shared helpers for the federation tests (in-process Grid, reply builders, run checks)."""
