"""``python -m proxy demo``: try the proxy without a provider key. It starts the
simulated provider (web/simulator.py) on a free loopback port and the real proxy in
front of it, priced by config.yml, logging to a demo log of its own; sends a few
hundred mixed calls; prints what they cost (read back from the log) and what to look
at next; then keeps serving until Ctrl-C, unless --exit."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shlex
import time
from pathlib import Path

import click

from proxy.cli.base import CONTEXT, Command
from proxy.cli.listening import listen
from proxy.cli.options import config_option
from proxy.config import Config, ProviderConfig, load_config
from proxy.core.money import format_usd
from proxy.engine.totals import Totals
from proxy.storage.logfiles import records_since
from proxy.web.sim_traffic import demo_calls, run_demo
from proxy.web.simulator import loopback_socket

DEMO_LOG = "logs/demo-cost-tracking.jsonl"
HOST = "127.0.0.1"
FAMILIES = ("openai", "anthropic", "gemini")
SIM_KEY = "simulated-key"  # what the proxy sends the simulator: never a real key
LOG_WAIT = 5.0  # seconds to wait for the last records while the proxy keeps serving


def demo_config(cfg: Config, sim_url: str) -> Config:
    """``cfg``'s openai, anthropic and gemini providers (their prices and models) sent to
    the simulator; other providers, proxy keys and budgets left out, so every demo call
    goes through whatever config.yml says about access."""
    providers = {}
    for family in FAMILIES:
        base = cfg.providers.get(family)
        if base is None or base.type != family:
            base = ProviderConfig(name=family, type=family, base_url=sim_url)
        providers[family] = dataclasses.replace(base, base_url=sim_url, api_key=SIM_KEY)
    return dataclasses.replace(cfg, providers=providers, cost_tracking=True, auth=None, budgets=None)


def summary(records: list[dict[str, object]], sent: int, statuses: list[int], base: str, log_file: str, serving: bool) -> list[str]:
    total, by_provider = Totals(), dict[str, Totals]()
    for rec in records:
        total.add(rec)
        by_provider.setdefault(str(rec.get("provider")), Totals()).add(rec)
    streams = sum(1 for r in records if r.get("is_streaming"))
    cached = sum(1 for r in records if r.get("cache_read_tokens"))
    failed = sum(1 for s in statuses if s >= 400)
    at_least = "at least " if total.incomplete else ""
    log = shlex.quote(log_file)
    lines = [
        f"demo: sent {sent} calls through the proxy ({failed} answered with a simulated 429 or 500)",
        f"  logged {total.requests} calls to {log_file}: {streams} streamed, {cached} with cache reads, {total.errors} errors",
        f"  total cost {at_least}{format_usd(total.total_cost)} at config.yml's prices",
    ]
    for name, t in sorted(by_provider.items()):
        lines.append(f"    {name:<10} {t.requests:>4} calls  {format_usd(t.total_cost)}")
    lines += [
        "",
        "Look at it:",
        f"  python scripts/analyze_costs.py --log-file {log}",
        f"  python -m proxy report --log-file {log} --all",
        f"  python -m proxy report --log-file {log} --group-by user",
    ]
    if serving:
        lines += [
            f"  curl {base}/health",
            f"  and in a browser: {base}/dashboard",
            "",
            f"The proxy keeps serving on {base} in front of the simulated provider, e.g.",
            f"  curl {base}/openai/v1/chat/completions -H 'Content-Type: application/json' \\",
            '    -d \'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}\'',
            "Ctrl-C stops it.",
        ]
    return lines


@click.command(cls=Command, context_settings=CONTEXT)
@config_option(help="prices and models come from this file")
@click.option("--port", type=click.IntRange(0, 65535), default=9002, show_default=True, help="the proxy's port (0: any free port)")
@click.option("--log-file", metavar="PATH", default=DEMO_LOG, show_default=True, help="the demo's own cost log (never the real one)")
@click.option("--calls", type=click.IntRange(1, 100000), default=300, show_default=True, help="how many calls to send")
@click.option("--exit", "exit_after", is_flag=True, help="stop after the calls instead of serving until Ctrl-C")
@click.option("-v", "--verbose", is_flag=True, help="print each call's cost line on stderr, as serve does")
def demo(config: str, port: int, log_file: str, calls: int, exit_after: bool, verbose: bool) -> int:
    """Try it without a provider key: the proxy before a simulated provider."""
    # As serve: the proxy's warnings on stderr (and, with --verbose, its per-call cost
    # lines: 300 of them would bury the summary); the summary goes to stdout.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = load_config(config)
    socks = listen(HOST, port)
    sim_sock = loopback_socket()
    sim_url = f"http://{HOST}:{sim_sock.getsockname()[1]}"
    base = f"http://{HOST}:{socks[0].getsockname()[1]}"
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    click.echo(f"demo: proxy on {base}, simulated provider on {sim_url}, logging to {log_file}", err=True)
    click.echo(f"demo: sending {calls} calls...", err=True)
    started = time.time()

    async def after_calls(statuses: list[int], stopped: bool) -> None:
        deadline = time.monotonic() + LOG_WAIT
        while True:  # records reach the file from a writer thread, just after the replies
            records = list(records_since(log_file, started))
            if stopped or len(records) >= len(statuses) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        for line in summary(records, len(statuses), statuses, base, log_file, not stopped):
            click.echo(line)

    asyncio.run(
        run_demo(
            demo_config(cfg, sim_url),
            log_file,
            socks,
            sim_sock,
            demo_calls(calls),
            after_calls,
            keep_serving=not exit_after,
            console=verbose,
        )
    )
    return 0
