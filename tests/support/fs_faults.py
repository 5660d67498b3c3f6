"""Real file-system faults for the log writer's tests: tiny tmpfs mounts that fill up,
and read-only mounts laid over a log directory. Needs root (CI runs as root)."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path
from typing import Callable, Iterator

import pytest


def _mount(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture(name="tmpfs")
def tmpfs_fixture(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``tmpfs(where, size="64k", ro=False)`` mounts a tmpfs at ``where`` (created if
    needed; an existing directory is hidden under it, as a mount does); all are unmounted
    at teardown."""
    mounted: list[Path] = []

    def mount(where: Path | None = None, size: str = "64k", ro: bool = False) -> Path:
        where = where or tmp_path / f"fs{len(mounted)}"
        where.mkdir(parents=True, exist_ok=True)
        res = _mount(["-t", "tmpfs", "-o", f"size={size},mode=0755" + (",ro" if ro else ""), "tmpfs", str(where)])
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs (needs root and mount rights): {res.stderr.strip() or res.returncode}")
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, mode: str) -> None:
    """``mode`` "ro" or "rw"."""
    res = _mount(["-o", f"remount,{mode}", str(where)])
    assert res.returncode == 0, res.stderr


def umount(where: Path) -> None:
    res = subprocess.run(["umount", str(where)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def fill(directory: Path, name: str = "filler") -> Path:
    """Fill the file system holding ``directory`` to the last byte."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        block = b"\0" * 4096
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
                break
    finally:
        os.close(fd)
    return path
