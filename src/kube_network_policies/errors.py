"""The root of the package's own exceptions.

Every error this package raises on purpose derives from KnpError, so a caller (the CLI's last
resort) can tell an error with a message meant for the user from a bug. Each keeps its older
base too (ValueError, RuntimeError, OSError), so existing `except` clauses still catch it.
"""

from __future__ import annotations

__all__ = ["InputError", "KnpError"]


class KnpError(Exception):
    """An error raised on purpose, with a message that names what is wrong and where."""


class InputError(KnpError):
    """Bad input (objects, manifest or scenario files, flags): the command exits with status 2."""
