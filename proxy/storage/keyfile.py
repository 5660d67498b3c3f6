"""The keys file (``auth.keys_file``): read and validated (``load_keys``), watched for
changes by a running proxy (``KeyStore``), and rewritten atomically under a lock
(``locked``, ``save_keys``). It holds ids, hashes, owners and limits: never a key.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import os
import tempfile
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import yaml

from proxy.budgets import Limit
from proxy.config import read_yaml
from proxy.errors import ConfigError
from proxy.keys import KeyEntry, key_hash, parse_entry

log = logging.getLogger("proxy")


def load_keys(path: Path) -> list[KeyEntry]:
    """The keys file's entries; a missing file has none. Raises ConfigError naming
    the file, the entry and what is wrong."""
    data = read_yaml(path, missing=None)
    if data is None:
        return []
    if not isinstance(data, Mapping) or not isinstance(data.get("keys", []), (list, type(None))):
        raise ConfigError(path, "keys", "expected `keys:` with a list of entries")
    entries = [parse_entry(raw, path, f"keys[{i}]") for i, raw in enumerate(data.get("keys") or [])]
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if entry.key_id in seen:
            raise ConfigError(path, f"keys[{i}].id", f"duplicate key id {entry.key_id}")
        seen.add(entry.key_id)
    return entries


class KeyStore:
    """The keys the proxy accepts, reloaded when the file changes."""

    def __init__(self, path: Path | None, admin_hashes: frozenset[str] = frozenset()) -> None:
        self.path = path
        self.admin_hashes = tuple(sorted(admin_hashes))
        self.entries: list[KeyEntry] = []
        self._by_hash: dict[str, KeyEntry] = {}
        self._sig: tuple[int, int, int] | None = None
        self.refresh(strict=True)

    def refresh(self, strict: bool = False) -> None:
        """Reload if the file changed (a new inode after ``os.replace``, or a new
        mtime/size after a hand edit). A broken file is an error at start-up; later
        the previous keys stay in force and the error is logged once."""
        if self.path is None:
            return
        try:
            st = os.stat(self.path)
            sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            sig = (0, 0, 0)
        if sig == self._sig:
            return
        self._sig = sig

        try:
            entries = load_keys(self.path)
        except ConfigError as e:
            if strict:
                raise
            log.error("keys file not reloaded, the previous keys stay in force: %s", e)
            return
        self.entries = entries
        self._by_hash = {e.sha256: e for e in entries}

    def lookup(self, key: str | None) -> KeyEntry | None:
        if not key:
            return None
        h = key_hash(key)
        entry = self._by_hash.get(h)
        if entry is not None and hmac.compare_digest(entry.sha256, h):
            return entry
        return None

    def is_admin(self, key: str | None) -> bool:
        if not key:
            return False
        h = key_hash(key)
        ok = False
        for a in self.admin_hashes:  # no early exit: the same work for every key
            ok |= hmac.compare_digest(a, h)
        entry = self.lookup(key)
        return ok or (entry is not None and entry.admin and not entry.revoked)

    def budget_limits(self) -> list[Limit]:
        return [e.limit for e in self.entries if e.limit is not None]


_HEADER = (
    "# llm-cost-proxy keys, written by `python -m proxy keys`. Only SHA-256 hashes of\n"
    "# keys are stored here; a key is shown once, when it is created.\n"
)


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = path.with_name(path.name + ".lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX)
        except ImportError:  # not POSIX: no concurrent writers expected
            pass
        yield
    finally:
        os.close(fd)


def save_keys(path: Path, entries: Sequence[KeyEntry]) -> None:
    text = _HEADER + yaml.safe_dump({"keys": [e.to_yaml() for e in entries]}, sort_keys=False, allow_unicode=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # created 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
