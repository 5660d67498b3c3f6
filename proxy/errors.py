"""Exceptions every layer may raise; imports nothing from the package."""

from __future__ import annotations

import os


class ConfigError(Exception):
    def __init__(self, path: str | os.PathLike[str], key: str, reason: str) -> None:
        self.path, self.key, self.reason = str(path), key, reason
        where = f"{self.path}: {key}" if key else str(self.path)
        super().__init__(f"{where}: {reason}")
