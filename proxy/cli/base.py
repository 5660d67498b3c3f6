"""The click classes every command is built from, and the policy they enforce wherever
click is entered (``python -m proxy``, ``scripts/analyze_costs.py``, ``CliRunner``):
a user error is one ``error:`` line on stderr and exit status 2, a reader that closes
the pipe early (``| head``) ends the command quietly with status 0, never a traceback."""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Literal, Mapping, NamedTuple, NoReturn, Sequence, overload

import click

from proxy.errors import ConfigError, UsageError

USER_ERROR = 2
INTERRUPTED = 130  # the shell's convention for a command ended by Ctrl-C
# -h stays: the argparse commands this replaced accepted it.
CONTEXT: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def one_line(text: str) -> str:
    return " ".join(text.splitlines())


def _error(message: str) -> int:
    click.echo(f"error: {one_line(message)}", err=True)
    return USER_ERROR


def _os_error(e: OSError) -> str:
    where = e.filename if e.filename is not None else ""
    reason = e.strerror or str(e)
    return f"{where}: {reason}" if where else reason


def run_guarded(call: Callable[[], Any]) -> int:
    """Run click (``standalone_mode=False``) and turn what it raises into an exit status."""
    try:
        rv = call()
    except click.UsageError as e:
        hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
        return _error(e.format_message() + hint)
    except click.ClickException as e:
        return _error(e.format_message())
    except click.exceptions.Abort:
        return INTERRUPTED
    except (UsageError, ConfigError) as e:
        return _error(str(e))
    except OSError as e:  # the system said no: a path that cannot be read or written, a port in use
        return _error(_os_error(e))
    return rv if isinstance(rv, int) else 0


def quiet_stdout() -> None:
    """Point stdout at /dev/null: the reader is gone, and the interpreter's final flush
    of what is still buffered must not fail (and print a traceback) on the closed pipe."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # an in-memory stream (tests): no fd to replace
        sys.stdout = open(os.devnull, "w")
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


class _Guarded:
    """``main`` with the exit policy; shared by ``Command`` and ``Group``."""

    @overload
    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: Literal[True] = True,
        **extra: Any,
    ) -> NoReturn: ...

    @overload
    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = ...,
        **extra: Any,
    ) -> Any: ...

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        # click's own main, never standalone: it would print usage blocks and exit 1 on a closed pipe.
        base = super().main  # type: ignore[misc]
        code = run_guarded(lambda: base(args, prog_name, complete_var, False, **extra))
        if standalone_mode:
            sys.exit(code)
        return code


class Command(_Guarded, click.Command):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            rv = super().invoke(ctx)
            # Inside the guard: block-buffered output to a pipe is often written only here.
            sys.stdout.flush()
        except BrokenPipeError:
            quiet_stdout()
            return 0
        return rv


class Group(_Guarded, click.Group):
    command_class = Command
    group_class = type  # click: subgroups are of this same class

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # A group without its action is a user error like any other, one line (click's
        # default prints the whole help as the error).
        kwargs.setdefault("no_args_is_help", False)
        super().__init__(*args, **kwargs)


class Lazy(NamedTuple):
    module: str  # imported by name when the command is used
    attr: str
    help: str  # shown by --help without importing the module


class LazyGroup(Group):
    """click's documented lazy-loading group: a subcommand's module (and what it imports,
    aiohttp for serve, the report code for report) is loaded only when it runs. With no
    command, or options first, the group runs ``default`` (``python -m proxy --port 9002``)."""

    def __init__(self, *args: Any, lazy: Mapping[str, Lazy], default: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)
        self.default = default

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        entry = self.lazy.get(cmd_name)
        if entry is None:
            return super().get_command(ctx, cmd_name)
        cmd = getattr(importlib.import_module(entry.module), entry.attr)
        if not isinstance(cmd, click.Command):
            raise TypeError(f"{entry.module}.{entry.attr} is not a click command")
        return cmd

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, self.lazy[name].help if name in self.lazy else self._short_help(ctx, name)) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def _short_help(self, ctx: click.Context, name: str) -> str:
        cmd = super().get_command(ctx, name)
        return cmd.get_short_help_str() if cmd is not None else ""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        own = {name for p in self.get_params(ctx) for name in (*p.opts, *p.secondary_opts)}
        first = args[0].split("=", 1)[0] if args else None
        if self.default is not None and (first is None or (first.startswith("-") and first not in own)):
            args = [self.default, *args]
        return super().parse_args(ctx, args)


def text_table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell, two spaces apart; no trailing blanks."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)
