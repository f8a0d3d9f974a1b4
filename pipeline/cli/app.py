"""The ``headstart`` command group and what every command shares.

Each command parses options, builds one config, calls one library function and prints one
summary line. The options of a command are generated from its config dataclass
(:mod:`pipeline.config`: defaults, help texts, allowed values), so a default is written once.
The ``pipeline.cli`` package is the only one that imports click; library errors
(:class:`~pipeline.errors.HeadstartError`) are translated here, once, into ``Error: ...`` and
exit status 1. Before a command runs, its output paths (``--out``, ``--embeddings``) get the one
check every command shares (:func:`pipeline.config.check_outputs`); a wrong kind of path is a
usage error, exit 2, like a number out of its range (floats are finite: ``--c nan`` is refused).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import typing
from collections.abc import Callable
from typing import Any

import click

from .. import __version__
from ..config import (
    check_outputs,
    has_default,
    load_default_map,
)
from ..errors import HeadstartError, describe_os_error

# Option names other than --field-name (short aliases; similar's -k has no long form).
_DECLS = {"out": ("--out", "-o"), "backbone": ("--backbone", "-b"), "k": ("-k",)}
_CONFIG_KEY = "headstart.config"  # ctx.meta: the --config file in use
_CONFIG_HELP = "TOML file with one table per command ([extract], [fit-head], ...); flags override it."


class HeadstartGroup(click.Group):
    """Turns domain errors into ``Error: <message>`` and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HeadstartError as e:
            raise click.ClickException(str(e)) from None
        except click.BadParameter as e:  # a bad value in a --config file: say where it came from
            name = e.param.name if e.param else None
            if e.ctx and name and e.ctx.get_parameter_source(name) is click.core.ParameterSource.DEFAULT_MAP:
                where = f" (set in config file {e.ctx.meta.get(_CONFIG_KEY)})"
                raise click.BadParameter(e.message + where, ctx=e.ctx, param=e.param) from None
            raise
        except OSError as e:  # a full disk, a file-size limit, a read-only or failing folder
            command = ctx.invoked_subcommand or ""
            raise click.ClickException(f"{describe_os_error(e)}. {_after_failure(command).capitalize()}") from None
        except KeyboardInterrupt:
            command = ctx.invoked_subcommand or ""
            click.echo(f"Interrupted; {_after_failure(command)}", err=True)
            sys.exit(130)


# What a failed or interrupted command leaves behind: every writer replaces its output whole
# (staged, then renamed), so only extract and finetune --resume continue where they stopped.
_AFTER_FAILURE = {
    "extract": "finished batches are kept and the next run resumes",
    "finetune": "the last checkpoint is kept; run again with --resume to continue",
    "fit-head": "the previous head, if any, is unchanged; run the command again",
    "export": "the previous model, if any, is unchanged; run the command again",
    "predict": "the previous output file, if any, is unchanged; run the command again",
    "evaluate": "the previous report, if any, is unchanged; run the command again",
}


def _after_failure(command: str) -> str:
    return _AFTER_FAILURE.get(command, "nothing was written; run the command again")


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    """``headstart --config F cmd``: all tables; ``headstart cmd --config F``: cmd's table."""
    if value:
        try:
            tables = load_default_map(value)
        except HeadstartError as e:  # raised while parsing, before HeadstartGroup.invoke
            raise click.ClickException(str(e)) from None
        ctx.meta[_CONFIG_KEY] = value
        if ctx.parent is None:
            ctx.default_map = tables
        else:
            ctx.default_map = {**(ctx.default_map or {}), **tables.get(ctx.info_name or "", {})}
    return value


def _config_option() -> click.Option:
    return click.Option(
        ["--config"],
        type=click.Path(dir_okay=False),
        callback=_load_config,
        is_eager=True,
        expose_value=False,
        help=_CONFIG_HELP,
    )


class _FiniteFloat(click.FloatRange):
    """A float in the field's range; nan and inf are refused (``nan < 0`` is False, so a plain
    FloatRange lets ``--c nan`` through)."""

    name = "float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rv = super().convert(value, param, ctx)
        if not math.isfinite(rv):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return rv


def _click_type(base: Any, meta: Any) -> Any:
    if "choices" in meta:
        return click.Choice(list(meta["choices"]))
    if "path" in meta:
        return click.Path(dir_okay=meta["path"] != "file")
    bounds = {k: meta[k] for k in ("min", "max", "min_open", "max_open") if k in meta}
    if base is int:
        return click.IntRange(**bounds) if bounds else click.INT
    if base is float:
        return _FiniteFloat(**bounds)
    return None  # str (an ``output`` path is checked when the command runs: config.check_outputs)


def _param(f: dataclasses.Field[Any], hint: Any, positional: bool) -> click.Parameter:
    """The click argument or option of one config field; its default is the field's."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    many = typing.get_origin(hint) is tuple
    base = str if many else (args[0] if args else hint)
    kind = _click_type(base, f.metadata)
    if positional:
        return click.Argument([f.name], type=kind, nargs=-1 if many else 1, required=True)
    flag = "--" + f.name.replace("_", "-")
    decls = list(_DECLS.get(f.name, (flag,)))
    kw: dict[str, Any] = {"type": kind, "help": f.metadata.get("help") or None}
    if base is bool:
        decls, kw["type"] = [f"{flag}/--no-{flag[2:]}" if f.default else flag], None
        kw["is_flag"] = not f.default or None
    if many:  # an option given once per value: --classes a.toml --classes b.toml
        kw.update(multiple=True, default=f.default)
    elif not has_default(f):
        kw["required"] = True
    elif f.default is not None and f.default is not False:
        kw.update(default=f.default, show_default=True)
    return click.Option([f.name, *decls], **kw)


def _from_config(cls: type, *positional: str) -> Callable[[Any], Any]:
    """Arguments (the ``positional`` fields) and options for every field of the dataclass ``cls``,
    in field order, plus ``--config``. A field declared below with ``@click.option`` keeps that
    option (it must take its default from ``cls``); other declared options come after."""
    hints = typing.get_type_hints(cls)

    def decorate(fn: Any) -> Any:
        declared = {p.name: p for p in reversed(getattr(fn, "__click_params__", []))}
        params = [
            declared.pop(f.name, None) or _param(f, hints[f.name], f.name in positional)
            for f in dataclasses.fields(cls)
        ]

        @functools.wraps(fn)
        def run(**kw: Any) -> Any:
            try:
                check_outputs(cls, kw)  # one check of --out (and --embeddings) for every command
            except HeadstartError as e:
                raise click.UsageError(str(e)) from None
            return fn(**kw)

        run.__click_params__ = list(reversed([*params, *declared.values(), _config_option()]))  # type: ignore[attr-defined]
        return run

    return decorate


@click.group(cls=HeadstartGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="headstart")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help=_CONFIG_HELP + " Also accepted after the command.",
)
def cli() -> None:
    """Classify product photos with a pretrained backbone: extract features once, fit a head
    in seconds, export one model, predict.

    \b
      headstart extract images/ --out artifacts/features.h5
      headstart fit-head artifacts/features.h5 --out artifacts/head
      headstart export artifacts/head --out artifacts/model
      headstart predict artifacts/model new_photos/ --out artifacts/predictions.csv
    """


def main() -> None:
    cli(prog_name="headstart")
