"""The options more than one command takes, each defined once: ``--config``,
``--log-file`` (the one place the log's default is resolved), ``--json``,
``--keys-file``, and options a group shares with its subcommands."""

from __future__ import annotations

from typing import Any, Callable, Sequence, TypeVar

import click
from click.core import ParameterSource

from proxy.defaults import default_log_path

FC = TypeVar("FC", bound="Callable[..., Any] | click.Command")

LOG_DEFAULT_TEXT = "[default: $COST_TRACKING_FILE, else logs/cost-tracking.jsonl]"


class AliasedOption(click.Option):
    """An option with extra names that are accepted but not shown: the names earlier
    versions used (``report --file``, ``reprice --in``), so users' scripts keep working."""

    def __init__(self, param_decls: Sequence[str], aliases: Sequence[str] = (), **attrs: Any) -> None:
        super().__init__([*param_decls, *aliases], **attrs)
        self.aliases = frozenset(aliases)

    def _shown(self) -> list[str]:
        return [o for o in self.opts if o not in self.aliases]

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        opts = self.opts
        self.opts = self._shown()
        try:
            return super().get_help_record(ctx)
        finally:
            self.opts = opts

    def get_error_hint(self, ctx: click.Context | None) -> str:
        return " / ".join(f"'{o}'" for o in self._shown())


def _default_logs() -> list[str]:
    return [default_log_path()]


def log_file_option(*, multiple: bool = False, aliases: Sequence[str] = (), help: str = "the JSONL cost log") -> Callable[[FC], FC]:
    """``--log-file PATH``, repeatable when ``multiple``. The default is computed when the
    command runs (``$COST_TRACKING_FILE`` or logs/cost-tracking.jsonl), so a test or a
    wrapper that sets the variable is obeyed."""
    return click.option(
        "--log-file",
        "log_file",
        cls=AliasedOption,
        aliases=aliases,
        multiple=multiple,
        metavar="PATH",
        default=_default_logs if multiple else default_log_path,
        help=f"{help}  {LOG_DEFAULT_TEXT}",
    )


def log_from_default(ctx: click.Context) -> bool:
    """Whether ``--log-file`` was left to its default (for hints on what to pass)."""
    return ctx.get_parameter_source("log_file") in (ParameterSource.DEFAULT, None)


def config_option(*, help: str = "the config file", default: str | None = "config.yml") -> Callable[[FC], FC]:
    return click.option(
        "--config",
        metavar="PATH",
        default=default,
        show_default=default is not None,
        help=help,
    )


def json_option(help: str = "one JSON object per line") -> Callable[[FC], FC]:
    return click.option("--json", "as_json", is_flag=True, help=help)


def keys_file_option(help: str = "the keys file, instead of the one the config's auth.keys_file names") -> Callable[[FC], FC]:
    return click.option("--keys-file", metavar="PATH", default=None, help=help)


def category_option() -> Callable[[FC], FC]:
    """``--category C``: the cost tracker's categories, which are the ``category`` tag
    here (``--category search`` is ``--tag category=search``); repeatable."""
    return click.option("--category", "category", multiple=True, metavar="C", help="shorthand for --tag category=C; repeatable")


def with_category(tags: Sequence[str], categories: Sequence[str]) -> tuple[str, ...]:
    """The tag filters with each ``--category`` added as ``category=C``."""
    return (*tags, *(f"category={c}" for c in categories))


AFTER = "(also accepted before the action)"


def inherited(ctx: click.Context, name: str) -> Any:
    """An option a group and its subcommands both take (``keys --config x list`` and
    ``keys list --config x``): the subcommand's value when given, else the group's."""
    value = ctx.params.get(name)
    if value is None and ctx.parent is not None:
        value = ctx.parent.params.get(name)
    return value
