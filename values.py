"""Small predicates on values read from files and flags, and an exception's first line for one-line messages.

Shared by the rooms that check what they read (pretrained.py's config.json, lora.py's adapter_config.json,
settings.py's flags, checkpoints.py's saved state, tasks.py's SVAMP records) and by every one-line error message;
imports nothing of the project.
"""
from __future__ import annotations

import math


def is_integer(v) -> bool:
    """An int that is not a bool (JSON's true is an int to Python)."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v) -> bool:
    """An int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def is_finite_number(v) -> bool:
    """A number (not a bool) that is neither NaN nor infinite."""
    return is_number(v) and math.isfinite(v)


def first_line(e: BaseException) -> str:
    """The first line of an exception's text ("" for an empty one): error messages stay one line."""
    return (str(e).strip().splitlines() or [""])[0]
