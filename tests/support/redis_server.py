"""A real ``redis-server`` (Debian's package; scripts/test.sh installs it where missing)
on a free loopback port, without persistence: stopped and started again it is empty,
as a Redis restarted without a save is. For the Redis budget ledger's tests."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis

from tests.support.ports import HOST, free_port


def redis_server_path() -> str:
    path = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(path).exists():
        pytest.fail("redis-server is needed for the Redis budget backend tests: scripts/test.sh installs it (apt-get install redis-server)")
    return path


class RedisServer:
    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.workdir, self.port = workdir, port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        workdir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, socket_timeout=5, decode_responses=True)

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start (again, on the same port) and wait until it answers PING."""
        argv = [redis_server_path(), "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log"), "--daemonize", "no"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while True:
                try:
                    if c.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = self.workdir / "redis.log"
                    raise AssertionError(f"redis-server did not start: {log.read_text() if log.exists() else 'no log'}")
                time.sleep(0.02)

    def stop(self) -> None:
        """SIGKILL: what a crash (or a pulled cable) looks like to the proxy."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
