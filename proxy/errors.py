"""Exceptions every layer may raise; imports nothing from the package."""

from __future__ import annotations

import os


class ConfigError(Exception):
    def __init__(self, path: str | os.PathLike[str], key: str, reason: str) -> None:
        self.path, self.key, self.reason = str(path), key, reason
        where = f"{self.path}: {key}" if key else str(self.path)
        super().__init__(f"{where}: {reason}")


class UsageError(Exception):
    """A bad argument from a user: a command-line option or an API query parameter.
    The CLI prints it on one line and exits 2; the analytics API answers 400, naming
    ``param`` (the query parameter or JSON field) when it is known."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param
