"""The root command: ``python -m proxy [serve|report|keys|budgets|pricing|reprice|log|stats|export|demo|simulate]``."""

from __future__ import annotations

import sys
from typing import Any, Sequence

import click

from proxy.cli.base import CONTEXT, Lazy, LazyGroup
from proxy.defaults import version

# A new command is one module in proxy/cli/ and one line here.
COMMANDS = {
    "serve": Lazy("proxy.cli.serve", "serve", "Run the cost-tracking proxy (the default command)."),
    "report": Lazy("proxy.cli.report", "report", "Cost reports from the JSONL log (the same as scripts/analyze_costs.py)."),
    "keys": Lazy("proxy.cli.keys", "keys", "Proxy keys: create, list, update, revoke."),
    "budgets": Lazy("proxy.cli.budgets", "budgets", "Each budget's limit, spend, remaining and reset time."),
    "pricing": Lazy("proxy.cli.pricing", "pricing", "A model's price, unpriced models, catalog prices into config.yml."),
    "reprice": Lazy("proxy.cli.reprice", "reprice", "Recompute the costs of a log with today's prices."),
    "log": Lazy("proxy.cli.log", "log", "Record a call made outside the proxy, priced like any other."),
    "stats": Lazy("proxy.cli.stats", "stats", "The quick numbers: spend and calls today, this week, this month."),
    "export": Lazy("proxy.cli.export", "export", "One row per request as CSV, JSON or JSONL, for accounting."),
    "demo": Lazy("proxy.cli.demo", "demo", "Try it without a provider key: the proxy before a simulated provider."),
    "simulate": Lazy("proxy.cli.simulate", "simulate", "Run the simulated provider alone (OpenAI, Anthropic and Gemini shapes)."),
}


def _print_version(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(f"llm-cost-proxy {version()}")
        ctx.exit(0)


@click.group(
    cls=LazyGroup,
    lazy=COMMANDS,
    default="serve",
    context_settings=CONTEXT,
    epilog="Without a command, or with options first, it serves: `python -m proxy --port 9002` is "
    "`python -m proxy serve --port 9002`. Every command takes --help.",
)
@click.option("--version", is_flag=True, expose_value=False, is_eager=True, callback=_print_version, help="Show the version and exit.")
def cli() -> None:
    """llm-cost-proxy: an OpenAI-compatible reverse proxy that meters, prices and logs
    every LLM call, and the tools that read its log."""


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Run the command line; returns the exit status (``prog`` names it in help and errors)."""
    args = list(sys.argv[1:] if argv is None else argv)
    code: Any = cli.main(args, prog_name=prog, standalone_mode=False)
    return int(code)
