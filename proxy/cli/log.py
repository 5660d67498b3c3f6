"""``python -m proxy log``: record a call made outside the proxy (the cost tracker's
``log`` command), as one record like those the proxy writes, priced the same way.

Token counts mean what they mean in every record (docs/records.md): ``--input-tokens``
is all input, cache reads included, as the cost tracker counted it and as OpenAI's
``prompt_tokens`` does; ``--cached-tokens`` says how many of those were cache reads
(billed at the cache rate), so it cannot exceed ``--input-tokens``.
"""

from __future__ import annotations

import click
import orjson

from proxy.cli.base import CONTEXT, Command
from proxy.cli.options import config_option, json_option, log_file_option
from proxy.core.money import format_usd
from proxy.core.records import cap_name, json_default
from proxy.core.text import printable
from proxy.manual import MAX_TOKENS, config_for, manual_record, parse_metadata, record_line, record_tags
from proxy.storage.append import append_line

EXAMPLES = """Examples:

\b
  {prog} --model gpt-4o --input-tokens 1500 --output-tokens 750 --category planning
  {prog} --model sonnet --input-tokens 800 --output-tokens 300 --description "Q1 strategy"
  {prog} --model claude-haiku-4-5 --input-tokens 12000 --cached-tokens 10000 --output-tokens 400
  {prog} --model gpt-4o-mini --input-tokens 900 --output-tokens 120 \\
      --user john@example.com --metadata '{{"project": "CoreReceptionAI"}}'

\b
--input-tokens is ALL input, cache reads included (the part that was read from the
cache is --cached-tokens). Anthropic reports input_tokens without its cache reads: add
cache_read_input_tokens to it. The call is written to the log the proxy writes (safe
while the proxy runs) and counted by `report`, `stats`, `export` and `budgets`."""


class LogCommand(Command):
    def format_epilog(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        self.epilog = EXAMPLES.format(prog=ctx.command_path)
        super().format_epilog(ctx, formatter)


# A trillion tokens in one call is a typo; bigger numbers overflow the JSON writer.
COUNT = click.IntRange(0, MAX_TOKENS)


@click.command(cls=LogCommand, context_settings=CONTEXT)
@click.option("--model", "-m", required=True, metavar="MODEL", help="the model called; config aliases are resolved (sonnet, gpt4o)")
@click.option("--input-tokens", required=True, type=COUNT, metavar="N", help="all input tokens, cache reads included")
@click.option("--output-tokens", required=True, type=COUNT, metavar="N", help="all output tokens, reasoning included")
@click.option(
    "--cached-tokens",
    type=COUNT,
    default=0,
    show_default=True,
    metavar="N",
    help="how many of the input tokens were cache reads",
)
@click.option(
    "--provider", metavar="NAME", help="provider name  [default: the configured one that prices the model, else by the model's family]"
)
@click.option("--category", metavar="C", help="the tag category=C (what `report --category C` selects)")
@click.option("--description", metavar="TEXT", help="the tag description=TEXT")
@click.option("--user", metavar="ID", help="the record's user_id")
@click.option("--metadata", metavar="JSON", help='more tags, as a JSON object of strings, numbers or booleans: {"project": "x"}')
@log_file_option(help="the log to append to")
@config_option(help="config for prices, aliases and providers (optional; without it the catalog prices)")
@json_option(help="print the record written, as JSON")
@click.pass_context
def log(
    ctx: click.Context,
    model: str,
    input_tokens: int,
    output_tokens: int,
    cached_tokens: int,
    provider: str | None,
    category: str | None,
    description: str | None,
    user: str | None,
    metadata: str | None,
    log_file: str,
    config: str,
    as_json: bool,
) -> int:
    """Record a call made outside the proxy: one record in the cost log, priced like any
    other call (config.yml prices, then the catalog), with usage_source "manual"."""
    explicit = ctx.get_parameter_source("config") is not click.core.ParameterSource.DEFAULT
    tags = record_tags(category, description, parse_metadata(metadata))
    cfg = config_for(config, explicit)
    rec, chosen = manual_record(
        cfg,
        model=model,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cached_tokens=cached_tokens,
        provider=provider,
        tags=tags,
        user=user,
    )
    append_line(log_file, record_line(rec))
    if rec["total_cost"] is None:
        click.echo(
            f"warning: no price for {printable(rec['model'], 80)} at provider {printable(chosen.name, 40)}: recorded with cost null "
            "(add its pricing to config.yml, then `python -m proxy reprice`)",
            err=True,
        )
    if as_json:
        click.echo(orjson.dumps(rec, default=json_default).decode())
        return 0
    cost = format_usd(rec["total_cost"], exact=True) if rec["total_cost"] is not None else "unpriced"
    cached = f" (cached {cached_tokens:,})" if cached_tokens else ""
    click.echo(
        f"recorded {printable(chosen.name, 40)}/{printable(cap_name(rec['model']), 80)}: in={input_tokens:,}{cached} "
        f"out={output_tokens:,} cost {cost} (provider: {chosen.why}) -> {printable(str(log_file), 200)}"
    )
    return 0
