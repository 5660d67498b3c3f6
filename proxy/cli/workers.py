"""``serve --workers N``: N proxy processes on one port (docs/operations.md, "Several
workers"), and the supervisor that starts them, restarts one that dies and stops them.

Each worker listens on the port with a socket of its own (SO_REUSEPORT: the kernel
spreads connections over the workers' sockets), appends to the one log with single
``O_APPEND`` writes, and counts every worker's records from that log
(``web/cluster.py``). The supervisor holds the port bound but not listening (so it is
given no connections) for the workers it restarts; it serves nothing itself.

Workers are spawned, not forked: a fork of a process with threads is not safe, and a
spawned worker builds its state as ``serve`` does. Each keeps a pipe to the supervisor;
when the supervisor is gone (even by SIGKILL) the pipe closes and the worker shuts down
as on SIGTERM, so no worker outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any, Callable

from proxy.cli.listening import event_loop, listen, setup_logging
from proxy.config import Config
from proxy.errors import ConfigError, UsageError
from proxy.web.app import create_app, run_app
from proxy.web.cluster import WorkerRole

log = logging.getLogger("proxy")

# How long a worker may take to start (the tokenizer's vocabulary, the log's window
# and budgets rebuilt) before the supervisor gives up on it.
START_TIMEOUT = 120.0
# A worker that dies this soon after starting, this many times in a row, is not
# restarted again: the cause is not passing (a full disk at start-up, a bad keys file).
_QUICK_DEATH = 10.0
_MAX_QUICK_DEATHS = 3


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    config: Config
    host: str
    port: int
    log_file: str
    loop: str
    verbose: bool
    role: WorkerRole


def worker_count(choice: str) -> int:
    """``--workers``: a number of processes, or ``auto`` for one per usable CPU."""
    if choice == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    try:
        n = int(choice)
    except ValueError:
        raise UsageError(f"--workers: expected a number of processes or 'auto', got {choice!r}") from None
    if not 1 <= n <= 256:
        raise UsageError(f"--workers: expected 1 to 256 processes, got {n}")
    return n


def run_worker(spec: WorkerSpec, pipe: Connection, describe: Callable[[Exception], str]) -> None:
    """A worker process: the ``serve`` app on its own SO_REUSEPORT socket. Tells the
    supervisor ("ready", pid) once started, or ("error", one line) and exits 2."""
    # A process group of its own: Ctrl-C in the terminal reaches the supervisor alone,
    # which passes on one SIGTERM; a second signal would cut the wait for calls in flight.
    os.setpgid(0, 0)
    setup_logging(spec.verbose)
    try:
        loop = event_loop(spec.loop)
        socks = listen(spec.host, spec.port, reuse_port=True)
        app = create_app(spec.config, spec.log_file, host=spec.host, role=spec.role)
    except (UsageError, ConfigError, OSError) as e:
        pipe.send(("error", describe(e)))
        raise SystemExit(2) from None

    async def ready(app: Any) -> None:
        pipe.send(("ready", os.getpid()))
        # The supervisor never writes: readable means it is gone (EOF).
        running = asyncio.get_running_loop()
        running.add_reader(pipe.fileno(), _supervisor_gone, running, pipe)

    app.on_startup.append(ready)
    run_app(app, loop=loop, sockets=socks, shutdown_timeout=spec.config.shutdown_timeout)


def _supervisor_gone(loop: asyncio.AbstractEventLoop, pipe: Connection) -> None:
    loop.remove_reader(pipe.fileno())
    log.warning("the supervisor is gone: shutting down")
    os.kill(os.getpid(), signal.SIGTERM)


class Supervisor:
    """Starts ``count`` workers, waits until each serves, restarts one that dies, and on
    SIGTERM or SIGINT stops them all (each finishes its calls in flight)."""

    def __init__(self, spec: WorkerSpec, count: int, describe: Callable[[Exception], str]) -> None:
        self.spec, self.count, self.describe = spec, count, describe
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, tuple[BaseProcess, Connection]] = {}
        self.stopping = False
        self.stop_by = math.inf
        self.quick_deaths = 0

    def _start(self, index: int) -> tuple[BaseProcess, Connection]:
        ours, theirs = self.ctx.Pipe(duplex=False)
        spec = replace(self.spec, role=replace(self.spec.role, index=index))
        proc = self.ctx.Process(target=run_worker, args=(spec, theirs, self.describe), name=f"llm-cost-proxy worker {index}")
        proc.start()
        theirs.close()
        self.procs[index] = (proc, ours)
        return proc, ours

    def _await_ready(self, index: int, proc: BaseProcess, pipe: Connection) -> None:
        if not pipe.poll(START_TIMEOUT):
            raise UsageError(f"worker {index} did not start within {START_TIMEOUT:g} s")
        try:
            kind, value = pipe.recv()
        except EOFError:
            proc.join(5)
            raise UsageError(f"worker {index} exited at start-up (status {proc.exitcode})") from None
        if kind == "error":
            raise UsageError(str(value))

    def start_all(self) -> None:
        started = [(i, *self._start(i)) for i in range(self.count)]
        try:
            for i, proc, pipe in started:
                self._await_ready(i, proc, pipe)
        except BaseException:
            self.stop()
            raise

    def _signal(self, signum: int, frame: Any) -> None:
        """The first signal: each worker finishes its calls in flight. A second one, or
        workers still running ``shutdown_timeout`` + 10 s later: they are killed."""
        if self.stopping:
            if frame is not None:
                log.warning("a second signal: stopping the workers now")
                self._kill_all()
            return
        self.stopping = True
        self.stop_by = time.monotonic() + self.spec.config.shutdown_timeout + 10
        for proc, _ in self.procs.values():
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGTERM)

    def _kill_all(self) -> None:
        for proc, _ in self.procs.values():
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)

    def supervise(self) -> int:
        signal.signal(signal.SIGTERM, self._signal)
        signal.signal(signal.SIGINT, self._signal)
        started = {i: time.monotonic() for i in self.procs}
        while self.procs:
            if self.stopping and time.monotonic() > self.stop_by:
                log.error(
                    "%d worker(s) still running %g s after SIGTERM: killing them", len(self.procs), self.spec.config.shutdown_timeout + 10
                )
                self._kill_all()
                self.stop_by = math.inf
            by_sentinel = {proc.sentinel: i for i, (proc, _) in self.procs.items()}
            for sentinel in wait(list(by_sentinel), timeout=1.0):
                i = by_sentinel[sentinel]  # type: ignore[index]
                proc, pipe = self.procs.pop(i)
                proc.join()
                pipe.close()
                if self.stopping:
                    continue
                quick = time.monotonic() - started[i] < _QUICK_DEATH
                self.quick_deaths = self.quick_deaths + 1 if quick else 0
                if self.quick_deaths >= _MAX_QUICK_DEATHS:
                    log.error("worker %d exited with status %s, again soon after starting: stopping", i, proc.exitcode)
                    self._signal(signal.SIGTERM, None)
                    continue
                log.error("worker %d (pid %s) exited with status %s: starting it again", i, proc.pid, proc.exitcode)
                try:
                    new, new_pipe = self._start(i)
                    started[i] = time.monotonic()
                    self._await_ready(i, new, new_pipe)
                except UsageError as e:
                    log.error("worker %d could not be started again: %s", i, e)
        return 1 if self.quick_deaths >= _MAX_QUICK_DEATHS else 0

    def stop(self) -> None:
        self._signal(signal.SIGTERM, None)
        deadline = time.monotonic() + self.spec.config.shutdown_timeout + 10
        for proc, pipe in self.procs.values():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            pipe.close()
        self.procs.clear()


def hold_port(host: str, port: int) -> tuple[int, list[Any]]:
    """The port the workers will share, held by the supervisor: in use by anyone (another
    proxy with workers too) is one clear line, and ``--port 0`` is chosen once for all."""
    probe = listen(host, port, backlog=None)  # without SO_REUSEPORT: fails on any other user
    chosen = probe[0].getsockname()[1]
    for sock in probe:
        sock.close()
    return chosen, listen(host, chosen, reuse_port=True, backlog=None)


def log_position(log_file: str | Path) -> tuple[int, int, int] | None:
    """(device, inode, size) of the log as the workers start: where their metrics count from."""
    try:
        st = os.stat(log_file)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size)
