"""Cycles: the runtime budget and action authority for AI agents."""

__version__ = "0.1.0"
