"""The JSONL writer against real file systems that fill up, turn read-only, vanish or
are swapped underneath it; and a process killed right after its replies."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.storage import logwriter
from proxy.storage.logwriter import JsonlWriter, console_chunks
from tests.support import ROOT
from tests.support.fs_faults import fill, remount, tmpfs_fixture, umount  # noqa: F401  (tmpfs_fixture provides the `tmpfs` fixture)


def rec(i: int) -> bytes:
    # Lengths vary, so a full page seldom ends exactly on a line boundary.
    return json.dumps({"i": i, "p": "x" * (i % 7)}, separators=(",", ":")).encode() + b"\n"


def parse(*paths: Path) -> tuple[Counter[int], list[bytes]]:
    """Ids of the complete records in the files, and every line that is not one."""
    ids: Counter[int] = Counter()
    bad: list[bytes] = []
    for path in paths:
        if not path.exists():
            continue
        data = path.read_bytes()
        lines = data.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        for line in lines:
            try:
                ids[json.loads(line)["i"]] += 1
            except (ValueError, KeyError, TypeError):
                bad.append(line)
    return ids, bad


def held(writer: JsonlWriter) -> int:
    return getattr(writer, "held_records", 0)


async def wait_until(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def in_kernel(writer: JsonlWriter, path: Path, i: int) -> bool | None:
    """Write record ``i``; a None answer promises it is in the file already."""
    r = writer.write(rec(i))
    if r is None:
        assert rec(i) in path.read_bytes(), f"record {i}: write() returned None but it is not in the file"
        return None
    return await asyncio.wait_for(r, 5)


async def write_batches(writer: JsonlWriter, ids: range, batch: int = 100) -> list[bool | None]:
    """As the server does: many calls per loop pass, awaiting each call's record."""
    results: list[bool | None] = []
    for start in range(ids.start, ids.stop, batch):
        pending = [writer.write(rec(i)) for i in range(start, min(start + batch, ids.stop))]
        results += [r if r is None else await asyncio.wait_for(r, 5) for r in pending]
        await asyncio.sleep(0.002)  # calls come spread over time, not all in one loop pass
    return results


# -- 1. disk full ---------------------------------------------------------------------


async def test_disk_full_resumes_the_torn_line_in_place_no_duplicate_no_fragment(tmpfs):
    fs = tmpfs(size="64k")
    log = fs / "cost.jsonl"
    writer = JsonlWriter(log, console_fd=None)
    await write_batches(writer, range(0, 30))
    filler = fill(fs)
    results = await write_batches(writer, range(30, 1230))
    await asyncio.sleep(0.1)  # time for any background write to meet the full disk
    torn = not log.read_bytes().endswith(b"\n")
    still_held = held(writer)
    filler.unlink()
    await write_batches(writer, range(1230, 1430))
    await wait_until(lambda: held(writer) == 0)
    writer.close()
    ids, bad = parse(log)
    assert bad == []  # resumed in the same file: the torn line completed exactly
    assert ids == Counter(range(1430))
    assert torn, "the scenario needs a short write"
    assert still_held > 1000 and False in results  # refused lines say so, their callers don't hang


async def test_log_swapped_while_a_torn_line_is_pending_leaves_one_skippable_fragment(tmpfs):
    fs = tmpfs(size="64k")
    log = fs / "cost.jsonl"
    writer = JsonlWriter(log, console_fd=None)
    await write_batches(writer, range(0, 30))
    filler = fill(fs)
    await write_batches(writer, range(30, 1000))
    await asyncio.sleep(0.1)
    torn = log.read_bytes()
    assert not torn.endswith(b"\n")
    # What `reprice --in-place` does: under the exclusive lock, copy the file as it is
    # (torn tail included) and swap the copy in.
    with log.open("rb") as old:
        fcntl.flock(old.fileno(), fcntl.LOCK_EX)
        filler.unlink()
        (fs / "new").write_bytes(torn)
        os.replace(fs / "new", log)
        fcntl.flock(old.fileno(), fcntl.LOCK_UN)
    await write_batches(writer, range(1000, 1200))
    await wait_until(lambda: held(writer) == 0)
    writer.close()
    ids, bad = parse(log)
    assert len(bad) == 1 and torn.endswith(bad[0])  # only the old fragment, on a line of its own
    assert ids == Counter(range(1200))


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(
        st.one_of(
            st.tuples(st.just("write"), st.integers(1, 300)),  # up to two pages: a full disk shows
            st.just(("fill",)),
            st.just(("free",)),
            st.just(("rotate",)),
        ),
        max_size=12,
    )
)
def test_any_sequence_of_fill_free_rotate_loses_and_duplicates_nothing(tmpfs, ops):
    fs = tmpfs(size="256k")  # room for every record once the fillers are gone
    log = fs / "cost.jsonl"

    async def run() -> tuple[int, int]:
        writer = JsonlWriter(log, console_fd=None)
        n = rotations = 0
        for op in ops:
            if op[0] == "write":
                await write_batches(writer, range(n, n + op[1]), batch=37)
                n += op[1]
            elif op[0] == "fill":
                fill(fs, f"filler{n}")
            elif op[0] == "free":
                for p in fs.glob("filler*"):
                    p.unlink()
            elif log.exists():
                log.rename(fs / f"cost.jsonl.{rotations}")
                rotations += 1
        for p in fs.glob("filler*"):
            p.unlink()
        await write_batches(writer, range(n, n + 1))
        await wait_until(lambda: held(writer) == 0)
        writer.close()
        ids, bad = parse(log, *fs.glob("cost.jsonl.*"))
        assert ids == Counter(range(n + 1))
        return len(bad), rotations

    bad, rotations = asyncio.run(run())
    assert bad <= rotations  # a fragment only where the file was swapped under a torn line


# -- 2. the directory turns read-only -------------------------------------------------


async def test_failed_reopen_never_touches_a_descriptor_it_no_longer_owns(tmp_path, tmpfs):
    logs = tmp_path / "logs"
    log = logs / "cost.jsonl"
    writer = JsonlWriter(log, console_fd=None)
    writer.write(rec(0))
    await asyncio.sleep(0.05)
    log.rename(logs / "cost.jsonl.1")  # rotated away: the writer must open a new file...
    tmpfs(logs, ro=True)  # ...in a directory that became read-only
    results = [writer.write(rec(1))]
    if results[0] is not None:
        results[0] = await asyncio.wait_for(results[0], 5)  # the reopen has failed by now
    # The lowest free numbers go to whoever opens next: here, a client's connection.
    client, server = socket.socketpair()
    rd, wr = os.pipe()
    mine = {fd: os.fstat(fd).st_ino for fd in (client.fileno(), server.fileno(), rd, wr)}
    for i in range(2, 8):
        results.append(writer.write(rec(i)))
        await asyncio.sleep(0.05)
        assert {fd: os.fstat(fd).st_ino for fd in mine} == mine
        client.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        assert server.recv(100) == b"HTTP/1.1 200 OK\r\n\r\n"
        os.write(wr, b"HTTP/1.1 200 OK\r\n\r\n")
        assert os.read(rd, 100) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert held(writer) == 7
    assert [await asyncio.wait_for(r, 5) if isinstance(r, asyncio.Future) else r for r in results] == [False] * 7
    remount(logs, "rw")
    assert await in_kernel(writer, log, 8) in (None, True)  # the held records go first
    await wait_until(lambda: held(writer) == 0)
    client.sendall(b"still open")
    assert server.recv(100) == b"still open"
    writer.close()
    ids, bad = parse(log)
    assert bad == [] and ids == Counter(range(1, 9))
    umount(logs)
    assert parse(logs / "cost.jsonl.1") == (Counter([0]), [])
    client.close(), server.close(), os.close(rd), os.close(wr)


# -- 3. shutdown while the log cannot be written --------------------------------------

_SHUTDOWN = """
import asyncio, json, sys
from proxy.storage import logwriter
from proxy.storage.logwriter import JsonlWriter, console_chunks
log, n, fallback = sys.argv[1], int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None
async def main():
    w = JsonlWriter(log, console_fd=None, **({"fallback": fallback} if fallback else {}))
    for start in range(0, n, 50):
        rs = [w.write(json.dumps({"i": i, "p": "x" * (i % 7)}, separators=(",", ":")).encode() + b"\\n")
              for i in range(start, min(n, start + 50))]
        await asyncio.gather(*[r for r in rs if r is not None])
    await asyncio.get_running_loop().run_in_executor(None, w.close)  # as the server does
asyncio.run(main())
"""


def run_shutdown(log: Path, n: int, *fallback: Path, env: dict[str, str] | None = None) -> str:
    res = subprocess.run(
        [sys.executable, "-c", _SHUTDOWN, str(log), str(n), *map(str, fallback)],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", **(env or {})},
    )
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    return res.stderr


def test_shutdown_with_the_disk_full_saves_the_held_records_and_says_so(tmp_path, tmpfs):
    fs = tmpfs(size="64k")
    log = fs / "cost.jsonl"
    log.write_bytes(b'{"i":-1}\n')  # a partly used page: one line will be torn
    fill(fs)
    fallback = tmp_path / "saved.jsonl"  # the README's $COST_TRACKING_FALLBACK
    stderr = run_shutdown(log, 300, env={"COST_TRACKING_FALLBACK": str(fallback)})
    said = [ln for ln in stderr.splitlines() if "could not be written" in ln]
    assert len(said) == 1, stderr
    m = re.fullmatch(
        rf"llm-cost-proxy: (\d+) records could not be written to {re.escape(str(log))} "
        rf"\(No space left on device\); saved to {re.escape(str(fallback))}",
        said[0],
    )
    assert m, said[0]
    in_log, bad = parse(log)
    saved, bad_saved = parse(fallback)
    assert bad_saved == [] and sum(saved.values()) == int(m[1])
    assert len(bad) <= 1  # the torn line's fragment; the whole line is in the fallback
    assert in_log + saved == Counter(range(-1, 300))
    assert fallback.stat().st_mode & 0o777 == 0o600  # records may name users


def test_shutdown_when_the_fallback_fails_too_says_how_many_were_lost(tmp_path, tmpfs):
    fs = tmpfs(size="64k")
    fill(fs)
    log = fs / "cost.jsonl"
    stderr = run_shutdown(log, 40, tmp_path / "missing" / "saved.jsonl")
    said = [ln for ln in stderr.splitlines() if "could not be written" in ln]
    assert len(said) == 1, stderr
    assert said[0].startswith(f"llm-cost-proxy: 40 records could not be written to {log} (No space left on device)")
    assert said[0].endswith("failed too (No such file or directory): 40 lost")


# -- 4. two processes, one file -------------------------------------------------------

_APPENDER = """
import asyncio, json, sys
from proxy.storage import logwriter
from proxy.storage.logwriter import JsonlWriter, console_chunks
log, who = sys.argv[1], sys.argv[2]
async def main():
    w = JsonlWriter(log, console_fd=None)
    for start in range(0, 10000, 100):
        rs = [w.write(json.dumps({"i": f"{who}{i}", "p": "x" * (i % 13 * 300)}).encode() + b"\\n")
              for i in range(start, start + 100)]
        await asyncio.gather(*[r for r in rs if r is not None])
    w.close()
asyncio.run(main())
"""


def test_two_processes_appending_never_tear_or_merge_a_line(tmp_path):
    log = tmp_path / "cost.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", _APPENDER, str(log), who], env={"PYTHONPATH": str(ROOT)}) for who in "ab"]
    assert [p.wait(60) for p in procs] == [0, 0]
    lines = log.read_bytes().split(b"\n")
    assert lines.pop() == b""
    ids = Counter(json.loads(ln)["i"] for ln in lines)
    assert len(lines) == 20000 and ids == Counter(f"{w}{i}" for w in "ab" for i in range(10000))


# -- 5. SIGKILL, replacement, removal, locks, slow disks ------------------------------

_REPLIER = """
import asyncio, json, os, sys
from proxy.storage import logwriter
from proxy.storage.logwriter import JsonlWriter, console_chunks
async def main():
    w = JsonlWriter(sys.argv[1], console_fd=None)
    i = 0
    while True:
        r = w.write(json.dumps({"i": i}).encode() + b"\\n")
        if r is not None:
            await r
        os.write(1, b"%d\\n" % i)  # the reply's last byte
        i += 1
        if i % 10 == 0:
            await asyncio.sleep(0)
asyncio.run(main())
"""


def test_sigkill_after_a_reply_never_loses_its_record(tmp_path):
    log = tmp_path / "cost.jsonl"
    p = subprocess.Popen([sys.executable, "-c", _REPLIER, str(log)], stdout=subprocess.PIPE, env={"PYTHONPATH": str(ROOT)})
    acked = 0
    while acked < 3000:
        line = p.stdout.readline()
        assert line, "the child died"
        acked += 1
    os.kill(p.pid, signal.SIGKILL)
    acked += sum(1 for ln in p.stdout.read().split(b"\n") if ln)  # replies sent before the kill
    p.wait(10)
    ids, bad = parse(log)
    assert bad == [] and set(range(acked)) <= set(ids)


async def test_log_unlinked_then_recreated_by_someone_else(tmp_path):
    log = tmp_path / "cost.jsonl"
    writer = JsonlWriter(log, console_fd=None)
    assert await in_kernel(writer, log, 0) is None
    log.unlink()
    log.write_bytes(b'{"i":100}\n')
    assert await in_kernel(writer, log, 1) is True  # reopened by the thread, then confirmed
    assert await in_kernel(writer, log, 2) is None  # and direct again
    writer.close()
    assert parse(log) == (Counter([100, 1, 2]), [])
    assert log.read_bytes().startswith(b'{"i":100}\n')


async def test_log_directory_removed_is_recreated(tmp_path):
    log = tmp_path / "logs" / "cost.jsonl"
    writer = JsonlWriter(log, console_fd=None)
    writer.write(rec(0))
    await asyncio.sleep(0.05)
    shutil.rmtree(log.parent)
    r = writer.write(rec(1))
    assert r is None or await asyncio.wait_for(r, 5) is True
    writer.close()
    assert parse(log) == (Counter([1]), [])


async def test_lock_held_by_a_rewriter_offloads_and_keeps_order(tmp_path):
    log = tmp_path / "cost.jsonl"
    writer = JsonlWriter(log, console_fd=None)
    for i in range(5):
        assert await in_kernel(writer, log, i) is None
    other = open(log, "rb")
    fcntl.flock(other.fileno(), fcntl.LOCK_EX)
    pending = [writer.write(rec(i)) for i in range(5, 15)]
    assert all(isinstance(f, asyncio.Future) for f in pending)
    await asyncio.sleep(0.2)
    assert not any(f.done() for f in pending)  # waiting for the lock, not on the loop
    threading.Timer(0.1, fcntl.flock, (other.fileno(), fcntl.LOCK_UN)).start()
    assert await asyncio.wait_for(asyncio.gather(*pending), 5) == [True] * 10
    assert await in_kernel(writer, log, 15) is None  # the thread handed back
    writer.close()
    other.close()
    assert [json.loads(ln)["i"] for ln in log.read_bytes().splitlines()] == list(range(16))


async def test_slow_writes_switch_to_the_thread_and_back_in_order(tmp_path):
    log = tmp_path / "cost.jsonl"
    writer = JsonlWriter(log, console_fd=None)
    writer.slow_write = 0.0  # every write is "slow": as if the disk took seconds
    assert await in_kernel(writer, log, 0) is None  # in the kernel, but too slowly
    assert await in_kernel(writer, log, 1) is True  # so the next goes through the thread
    assert await in_kernel(writer, log, 2) is True  # and stays there while slow
    writer.slow_write = 10.0  # the disk recovers
    assert await in_kernel(writer, log, 3) is True  # the thread's write was fast...
    assert await in_kernel(writer, log, 4) is None  # ...so the loop writes again
    writer.close()
    assert [json.loads(ln)["i"] for ln in log.read_bytes().splitlines()] == list(range(5))


async def test_direct_write_right_after_an_in_place_swap_lands_in_the_new_file(tmp_path):
    log = tmp_path / "cost.jsonl"
    writer = JsonlWriter(log, console_fd=None)
    for i in range(3):
        await in_kernel(writer, log, i)
    with log.open("rb") as old:
        fcntl.flock(old.fileno(), fcntl.LOCK_EX)
        (tmp_path / "new").write_bytes(old.read())
        os.replace(tmp_path / "new", log)
        fcntl.flock(old.fileno(), fcntl.LOCK_UN)
    for i in range(3, 6):
        await in_kernel(writer, log, i)
    writer.close()
    assert [json.loads(ln)["i"] for ln in log.read_bytes().splitlines()] == list(range(6))


async def test_write_after_close_is_synchronous_and_falls_back(tmp_path, tmpfs, capfd, monkeypatch):
    logs = tmp_path / "logs"
    log = logs / "cost.jsonl"
    fallback = tmp_path / "saved.jsonl"
    monkeypatch.setenv("COST_TRACKING_FALLBACK", str(fallback))
    writer = JsonlWriter(log, console_fd=None)
    writer.close()
    assert writer.write(rec(0)) is None and parse(log) == (Counter([0]), [])
    log.rename(logs / "old.jsonl")
    tmpfs(logs, ro=True)
    assert writer.write(rec(1)) is None  # no exception, even now
    assert parse(fallback) == (Counter([1]), [])
    assert writer.fallback_path == fallback
    err = capfd.readouterr().err
    assert f"llm-cost-proxy: 1 record could not be written to {log} (Read-only file system); saved to {fallback}" in err
    assert "Traceback" not in err


def test_default_fallback_is_in_the_temp_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("COST_TRACKING_FALLBACK", raising=False)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    writer = JsonlWriter(tmp_path / "cost.jsonl", console_fd=None)
    writer.close()
    assert writer.fallback_path == tmp_path / f"llm-cost-proxy-unwritten-{os.getpid()}.jsonl"
    mine = JsonlWriter(tmp_path / "cost.jsonl", console_fd=None, fallback=tmp_path / "mine.jsonl")
    mine.close()
    assert mine.fallback_path == tmp_path / "mine.jsonl"


def test_a_log_that_cannot_be_opened_refuses_construction(tmp_path, tmpfs):
    fs = tmpfs(ro=True)
    with pytest.raises(OSError):
        JsonlWriter(fs / "cost.jsonl", console_fd=None)


# -- console lines ----------------------------------------------------------------------


def read_console(fd: int, want: int, timeout: float = 5.0) -> list[str]:
    """Lines from the read end of a console pipe until ``want`` of them arrived."""
    got = b""
    deadline = time.monotonic() + timeout
    os.set_blocking(fd, False)
    while len(got.splitlines()) < want:
        assert time.monotonic() < deadline, f"timed out with {len(got.splitlines())} of {want} lines"
        try:
            got += os.read(fd, 1 << 16)
        except BlockingIOError:
            time.sleep(0.01)
    return got.decode().splitlines()


async def test_console_lines_are_written_in_batches_and_in_order(tmp_path):
    # One console write per timer (CONSOLE_EVERY), not one per call: waking the writer
    # thread per call cost the proxy a futex call and a hand-over of the interpreter lock
    # each time. A message socket keeps each write apart, so the writes can be counted.
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    writer = JsonlWriter(tmp_path / "cost.jsonl", console_fd=theirs.fileno())
    t0 = time.monotonic()
    for i in range(60):  # calls spread over many loop passes
        assert writer.write(rec(i), f"call {i} \u00e9") is None
        await asyncio.sleep(0.002)
    lines: list[str] = []
    writes = 0
    ours.settimeout(5)
    while len(lines) < 60:
        lines += (await asyncio.get_running_loop().run_in_executor(None, ours.recv, 1 << 20)).decode().splitlines()
        writes += 1
    elapsed = time.monotonic() - t0
    writer.close()
    ours.close()
    theirs.close()
    assert lines == [f"call {i} \u00e9" for i in range(60)]
    # At most one write per timer, plus one per periodic wake of the thread (RETRY).
    assert writes <= 2 + elapsed / logwriter.CONSOLE_EVERY + elapsed / logwriter.RETRY
    assert parse(tmp_path / "cost.jsonl") == (Counter(range(60)), [])


def test_console_lines_of_a_loop_that_closed_before_its_timer_still_go_out(tmp_path):
    # The timer that was to wake the thread dies with its loop: the thread's own periodic
    # wake-up writes the lines, and a later loop schedules a timer of its own again.
    r, w = os.pipe()
    writer = JsonlWriter(tmp_path / "cost.jsonl", console_fd=w)

    async def calls(first: int) -> None:
        for i in range(first, first + 3):
            writer.write(rec(i), f"call {i}")

    asyncio.run(calls(0))  # the loop closes at once, its timer never fires
    assert read_console(r, 3) == ["call 0", "call 1", "call 2"]

    async def later() -> list[str]:
        await asyncio.sleep(0.2)  # past the lost timer's time
        await calls(3)
        return await asyncio.get_running_loop().run_in_executor(None, read_console, r, 3)

    assert asyncio.run(later()) == ["call 3", "call 4", "call 5"]
    writer.close()
    os.close(r)
    os.close(w)


@given(st.lists(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\n"), max_size=3000), max_size=40))
def test_console_chunks_are_whole_lines_no_bigger_than_an_atomic_pipe_write(lines: list[str]) -> None:
    chunks = console_chunks(lines)
    assert b"".join(chunks) == "".join(f"{line}\n" for line in lines).encode()
    for chunk in chunks:
        assert chunk.endswith(b"\n")
        # Over PIPE_BUF only when one line alone is that long.
        assert len(chunk) <= 4096 or chunk.count(b"\n") == 1
