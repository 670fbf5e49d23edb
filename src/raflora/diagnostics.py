"""Rank-collapse diagnostics; see :mod:`raflora.math.diagnostics`."""

from raflora.math.diagnostics import *  # noqa: F403
