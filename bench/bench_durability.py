#!/usr/bin/env python3
"""What it costs to hand each record to the kernel before the reply's last byte.

Since the hardening work, a call's JSONL line is written (``os.write``, not fsync) on
the event loop before its reply is sent, so a SIGKILL never loses the record of a
reply the client holds. This measures what that adds to a call, against baselines in
the same run, calls interleaved one by one so drift hits every target alike:

* direct  - the mock upstream itself;
* bare    - the minimal aiohttp forwarder of ``baseline_servers.py`` (no metering, no log);
* proxy   - this tree's ``python -m proxy``;
* before  - with ``--before DIR``: the same proxy from another source tree, e.g. the
            commit before the change (``git worktree add /tmp/before 5818425``), where
            records were handed to a writer thread after the reply.

    python bench/bench_durability.py [--before /tmp/before] [--calls 2000]

Prints median and p95 per target for JSON calls and for streamed calls (to the last
byte), and the added time over bare. Results: bench/results/durability.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

import aiohttp
import proxy_harness as bp  # the shared mock, bare forwarder and client calls

RESULTS = bp.ROOT / "bench" / "results" / "durability.json"


async def run(args: argparse.Namespace, tmp: Path) -> dict:
    mock_port, bare_port, proxy_port, before_port = (bp.free_port() for _ in range(4))
    cfg = tmp / "config.yml"
    bp.write_config(cfg, mock_port)
    servers: dict[str, bp.Server] = {}
    try:
        servers["mock"] = bp.start_mock(mock_port, tmp)
        servers["bare"] = bp.start_bare(bare_port, mock_port, tmp)
        servers["proxy"] = bp.start_proxy("proxy", cfg, proxy_port, tmp, env={"COST_TRACKING_FILE": str(tmp / "now.jsonl")})
        targets = [
            bp.Target("direct", f"http://{bp.HOST}:{mock_port}"),
            bp.Target("bare", f"http://{bp.HOST}:{bare_port}/openai"),
            bp.Target("proxy", f"http://{bp.HOST}:{proxy_port}/openai"),
        ]
        if args.before:
            # The other tree's package first on the path; everything else as for ours.
            boot = f"import sys; sys.path.insert(0, {str(Path(args.before).resolve())!r}); from proxy.cli import main; sys.exit(main())"
            servers["before"] = bp.Server(
                "before",
                [sys.executable, "-c", boot, *bp.proxy_command(cfg, before_port, host=bp.HOST)[3:]],
                before_port,
                "/health",
                tmp,
                env={"COST_TRACKING_FILE": str(tmp / "before.jsonl")},
            )
            targets.append(bp.Target("before", f"http://{bp.HOST}:{before_port}/openai"))
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            for s in servers.values():
                await s.wait_ready(session)
            await bp.interleaved(session, targets, 200, 60, bp.call_json)
            lat = await bp.interleaved(session, targets, args.calls, 300, bp.call_json)
            streams = await bp.interleaved(session, targets, args.calls // 2, 300, lambda s, t: bp.call_stream(s, t))
    finally:
        for s in reversed(list(servers.values())):
            s.stop()
    out: dict = {"calls": args.calls, "json": {}, "stream_total": {}}
    for name, xs in lat.items():
        out["json"][name] = bp.summary_ms(xs)
    for name, xs in streams.items():
        out["stream_total"][name] = bp.summary_ms([x[1] for x in xs])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", help="another source tree whose proxy to measure alongside (e.g. a worktree of the previous commit)")
    ap.add_argument("--calls", type=int, default=2000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        R = asyncio.run(run(args, Path(d)))
    for kind in ("json", "stream_total"):
        bare = R[kind]["bare"]["median_ms"]
        print(f"\n{kind} (ms)      median     p95   added over bare (median)")
        for name, s in R[kind].items():
            print(f"  {name:8s} {s['median_ms']:8.3f} {s['p95_ms']:8.3f}   {s['median_ms'] - bare:+.3f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(R, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
