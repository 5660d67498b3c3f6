"""``python -m proxy serve`` (the default command): run the cost-tracking proxy."""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import click

from proxy.cli.base import CONTEXT, Command
from proxy.cli.listening import event_loop, listen, setup_logging
from proxy.cli.options import config_option, log_file_option
from proxy.cli.workers import Supervisor, WorkerSpec, hold_port, log_position, worker_count
from proxy.config import Config, client_base_path, load_config
from proxy.errors import ConfigError, UsageError
from proxy.storage.keyfile import KeyStore
from proxy.web.app import create_app, run_app
from proxy.web.cluster import WorkerRole

log = logging.getLogger("proxy")


def _log_error(log_file: str, e: OSError) -> str:
    reason = e.strerror or str(e)
    if isinstance(e, (FileExistsError, NotADirectoryError)):
        # mkdir of a parent that is a file says "File exists": name the file instead.
        for parent in Path(log_file).parents:
            if parent.exists() and not parent.is_dir():
                reason = f"{parent} is a file, not a directory"
                break
    return f"cannot open the cost log {log_file}: {reason}"


def _keys_error(config: Config, e: ConfigError) -> ConfigError | UsageError:
    """A keys file that cannot be read, said as the keys file (auth.keys_file)."""
    if config.auth is None or e.path != str(config.auth.keys_file):
        return e
    inner = f"{e.key}: {e.reason}" if e.key else e.reason
    return UsageError(f"keys file {e.path} (auth.keys_file in {config.path}): {inner}")


def banner(config: Config, base: str, log_file: str, workers: int = 1) -> list[str]:
    """The lines serve prints at start-up: where it listens, where calls are logged,
    and per provider the base URL a client's SDK takes."""
    where = f"logging to {log_file}" if config.cost_tracking else None
    on = f"llm-cost-proxy on {base}" + (f" ({workers} workers)" if workers > 1 else "")
    lines = [f"{on}, {where}" if where else f"{on} (cost tracking off: no log is written)"]
    for name, p in config.providers.items():
        lines.append(f"  {name:<12} {base}{client_base_path(p)} -> {p.base_url} ({p.type}, {len(p.models)} priced models)")
    return lines


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def startup_error(config: Config, log_file: str, e: Exception) -> str:
    """What stops a start-up, in one line: the log that cannot be opened, the keys file."""
    if isinstance(e, OSError):
        return _log_error(log_file, e)
    if isinstance(e, ConfigError):
        return str(_keys_error(config, e))
    return str(e)


def _check_workers(config: Config, workers: int) -> None:
    """Budgets kept in each worker's memory would each allow the whole budget."""
    if workers == 1 or (config.budgets is not None and config.budgets.backend != "memory"):
        return
    where = None
    if config.budgets is not None and config.budgets.limits:
        where = f"budgets in {config.path}"
    elif config.auth is not None and KeyStore(config.auth.keys_file, config.auth.admin_hashes).budget_limits():
        where = f"key budgets in {config.auth.keys_file}"
    if where is not None:
        raise UsageError(
            f"--workers {workers}: {where} need a ledger the workers share; "
            "set budgets.backend: redis://HOST:6379 (docs/budgets.md), or run one worker"
        )


@click.command(cls=Command, context_settings=CONTEXT)
@config_option(help="the config file")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", type=click.IntRange(0, 65535), default=9002, show_default=True, help="port to listen on (0: any free port)")
@log_file_option(help="the JSONL cost log to append to")
@click.option(
    "--loop",
    type=click.Choice(["auto", "asyncio", "uvloop"]),
    default="auto",
    show_default=True,
    help="event loop: uvloop when installed (auto), or the standard one",
)
@click.option(
    "--workers",
    default="1",
    show_default=True,
    metavar="N|auto",
    help="processes serving the port (auto: one per CPU); all log to one file and report all workers' totals",
)
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def serve(config: str, host: str, port: int, log_file: str, loop: str, workers: str, verbose: bool) -> int:
    """Run the cost-tracking proxy."""
    cfg = load_config(config)
    count = worker_count(workers)
    if count > 1:
        return _serve_workers(cfg, host, port, log_file, loop, verbose, count)
    chosen_loop = event_loop(loop)
    socks = listen(host, port)
    try:
        setup_logging(verbose)
        try:
            app = create_app(cfg, log_file, host=host)
        except (OSError, ConfigError) as e:
            raise UsageError(startup_error(cfg, log_file, e)) from None
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    base = f"http://{_url_host(host)}:{socks[0].getsockname()[1]}"
    for line in banner(cfg, base, log_file):
        log.info("%s", line)
    run_app(app, loop=chosen_loop, sockets=socks, shutdown_timeout=cfg.shutdown_timeout)
    return 0


def _serve_workers(cfg: Config, host: str, port: int, log_file: str, loop: str, verbose: bool, count: int) -> int:
    try:
        _check_workers(cfg, count)
    except ConfigError as e:
        raise UsageError(startup_error(cfg, log_file, e)) from None
    event_loop(loop)  # uvloop asked for and missing: said now, not by each worker
    if cfg.cost_tracking:
        # The log exists before the workers start, so its position is the point every
        # worker's /metrics counts from, a worker restarted later included.
        try:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            with open(log_file, "ab"):
                pass
        except OSError as e:
            raise UsageError(_log_error(log_file, e)) from None
    chosen, held = hold_port(host, port)
    try:
        setup_logging(verbose)
        role = WorkerRole(0, count, log_position(log_file) if cfg.cost_tracking else None)
        spec = WorkerSpec(cfg, host, chosen, log_file, loop, verbose, role)
        supervisor = Supervisor(spec, count, functools.partial(startup_error, cfg, log_file))
        supervisor.start_all()
        base = f"http://{_url_host(host)}:{chosen}"
        for line in banner(cfg, base, log_file, count):
            log.info("%s", line)
        return supervisor.supervise()
    finally:
        for sock in held:
            sock.close()
