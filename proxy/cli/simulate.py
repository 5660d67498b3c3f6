"""``python -m proxy simulate``: the simulated provider alone (web/simulator.py), for
people's own tests: OpenAI, Anthropic and Gemini wire shapes with realistic usage, any
API key accepted, nothing contacted."""

from __future__ import annotations

import click

from proxy.cli.base import CONTEXT, Command
from proxy.cli.listening import listen
from proxy.web.simulator import SimSettings, run_simulator


@click.command(cls=Command, context_settings=CONTEXT)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=9010, show_default=True, help="port to listen on (0: any free port)")
@click.option("--error-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True, help="share of calls answered 429 or 500")
@click.option("--seed", type=int, default=0, show_default=True, help="which calls the error rate picks")
def simulate(host: str, port: int, error_rate: float, seed: int) -> int:
    """Run the simulated provider alone (OpenAI, Anthropic and Gemini shapes)."""
    socks = listen(host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{socks[0].getsockname()[1]}"
    click.echo(f"simulated provider on {url}", err=True)
    click.echo(f"  OpenAI     {url}/v1  (chat/completions, responses, embeddings, models)", err=True)
    click.echo(f"  Anthropic  {url}     (v1/messages)", err=True)
    click.echo(f"  Gemini     {url}     (v1beta/models/MODEL:generateContent, :streamGenerateContent)", err=True)
    run_simulator(SimSettings(error_rate=error_rate, seed=seed), socks)
    return 0
