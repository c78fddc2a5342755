"""`Alice3DError`: the base of every error alice3d raises for bad input, config or state.

Each error says what was wrong and names the file or key; a command-line tool catches this
one class and prints the message (no traceback). Subclasses also derive from the built-in
exception that fits (ValueError, RuntimeError), so `except ValueError` keeps working.
"""

from __future__ import annotations

__all__ = ["Alice3DError", "DataError", "PeerFailure"]


class Alice3DError(Exception):
    """An expected failure whose message is meant for the user."""


class DataError(Alice3DError, ValueError):
    """Unusable input data (file, datalist or array); the message names the file."""


class PeerFailure(Alice3DError, RuntimeError):
    """Another process of a distributed run died or stopped answering; this process's group is broken."""
