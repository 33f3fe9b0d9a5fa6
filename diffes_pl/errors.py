"""Errors a user meets by name (the CLI prints them as one line)."""
from __future__ import annotations


class ScheduleError(ValueError):
    """A schedule that cannot be used: wrong length, level out of bounds, budget not met."""
