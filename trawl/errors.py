"""Errors a user can act on.

A `UserError` ends the CLI with one line on stderr and exit code 2, no traceback: it is
raised for bad input files, bad configuration and unreachable dependencies, and its message
names the file (and line, where there is one) and what to do.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A problem with the user's input or environment, reported without a traceback."""

    exit_code = 2

    def __init__(self, message: str, *, path: Path | str | None = None, line: int | None = None) -> None:
        self.path = str(path) if path is not None else None
        self.line = line
        where = ""
        if self.path is not None:
            where = f"{self.path}:{line}: " if line is not None else f"{self.path}: "
        super().__init__(f"{where}{message}")


class ConfigError(UserError):
    """Configuration that cannot be used as given."""


class InputError(UserError):
    """An input file that cannot be read as what it claims to be."""
