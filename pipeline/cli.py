"""The ``headstart`` command line: a thin click shell over the library.

Each command parses options, builds one config, calls one library function and prints one
summary line. The options of a command are generated from its config dataclass
(:mod:`pipeline.config`: defaults, help texts, allowed values), so a default is written once.
This is the only module that imports click; library errors
(:class:`~pipeline.errors.HeadstartError`) are translated here, once, into ``Error: ...`` and
exit status 1. Before a command runs, its output paths (``--out``, ``--embeddings``) get the one
check every command shares (:func:`pipeline.config.check_outputs`); a wrong kind of path is a
usage error, exit 2, like a number out of its range (floats are finite: ``--c nan`` is refused).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import (
    DEFAULT_BACKBONE,
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    ExtractConfig,
    FinetuneConfig,
    FitHeadConfig,
    PredictConfig,
    SimilarConfig,
    check_outputs,
    has_default,
    load_default_map,
)
from .errors import HeadstartError
from .probe.kinds import HEAD_KINDS

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
        except KeyboardInterrupt:
            command = ctx.invoked_subcommand or ""
            click.echo(f"Interrupted; {_AFTER_INTERRUPT.get(command, _NOTHING_WRITTEN)}", err=True)
            sys.exit(130)


# What a Ctrl-C leaves behind, per command: only extract and finetune --resume continue.
_NOTHING_WRITTEN = "nothing was written; run the command again"
_AFTER_INTERRUPT = {
    "extract": "finished batches are kept and the next run resumes",
    "finetune": "the last checkpoint is kept; run again with --resume to continue",
    "fit-head": "the previous head, if any, is unchanged; run the command again",
    "export": "the previous model, if any, is unchanged; run the command again",
}


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
    if not has_default(f):
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


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backbones(as_json: bool) -> None:
    """List the backbones and whether each can be used offline right now."""
    from .models.backbones import get_spec, names

    rows = []
    for name in names():
        spec = get_spec(name)
        rows.append(
            {
                "name": name,
                "feature_dim": spec.feature_dim,
                "input": spec.preprocessing.crop,
                "weights": spec.weights_name,
                "available": spec.available(),
                "source": spec.source,
                "default": name == DEFAULT_BACKBONE,
            }
        )
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        mark = "ready  " if r["available"] else "missing"
        star = " (default)" if r["default"] else ""
        click.echo(f"{mark}  {r['name']:<20} {r['feature_dim']:>5}-d  {r['input']}px  {r['source']}{star}")
    missing = [r["name"] for r in rows if not r["available"]]
    if missing:
        click.echo(
            "\n'missing' weights: run `headstart extract --backbone NAME ...` once online, or pass --weights-file."
        )


@cli.command()
@_from_config(ExtractConfig, "images")
def extract(**kw: Any) -> None:
    """Run the backbone once over IMAGES and cache the features in HDF5.

    IMAGES is a folder of class folders (images/lipstick/*.jpg), a folder of unlabelled
    images, or a CSV manifest with columns path,label. Re-running on a grown folder extracts
    only the new photos; an interrupted run resumes where it stopped.
    """
    from .extract import extract as run

    summary = run(ExtractConfig(**kw))
    for path, reason in summary.skipped[:20]:
        click.echo(f"skipped {path}: {reason}", err=True)
    if len(summary.skipped) > 20:
        click.echo(f"... and {len(summary.skipped) - 20} more (see `headstart cache info`)", err=True)
    click.echo(summary.line())


@cli.command("fit-head")
@_from_config(FitHeadConfig, "cache")
@click.option(
    "--head",
    type=click.Choice(HEAD_KINDS),
    default=FitHeadConfig.head,
    show_default=True,
    help="logreg (swept C), mlp (one hidden layer), centroid (few-shot: five photos make a class).",
)
def fit_head(**kw: Any) -> None:
    """Train a classification head on a feature cache, in seconds."""
    from .fit_head import fit_head as run

    click.echo(run(FitHeadConfig(**kw)).line())


@cli.command()
@_from_config(FinetuneConfig, "images")
def finetune(**kw: Any) -> None:
    """Fine-tune the whole network on IMAGES, starting from a fitted head (LP-FT).

    Gradual unfreezing from the top, layer-wise learning rates, early stopping on fit-head's
    validation photos; resumable. Runs under `torchrun` too (DistributedDataParallel).
    """
    from .finetune.stage import finetune as run

    summary = run(FinetuneConfig(**kw))
    if summary.is_main:
        click.echo(summary.line())


@cli.command()
@_from_config(ExportConfig, "head")
def export(**kw: Any) -> None:
    """Combine backbone, preprocessing and HEAD into one self-contained, parity-checked model."""
    from .export import export as run

    path = run(ExportConfig(**kw))
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    parity = manifest["parity"]
    click.echo(
        f"{path}: {manifest['runtime']} model written ({', '.join(manifest['files'])} + manifest.json); "
        f"parity max |dp| {parity['max_abs_diff']:.2g} on {parity['n_images']} images"
    )


@cli.command()
@_from_config(PredictConfig, "model", "inputs")
def predict(**kw: Any) -> None:
    """Classify INPUTS with an exported MODEL (native or ONNX); write CSV or JSON Lines.

    INPUTS are image files, folders (searched recursively), glob patterns ('photos/**/*.jpg'),
    lists of paths (.txt one per line, .csv with a path column; relative to the list) or - to
    read paths from stdin. Files that cannot be decoded get a row with the error.
    """
    from .predict import predict as run

    _, summary = run(PredictConfig(**kw))
    click.echo(summary.line(), err=kw["out"] == "-")


@cli.command()
@_from_config(EvaluateConfig, "model", "data")
def evaluate(**kw: Any) -> None:
    """Score MODEL (exported model or head directory) on DATA (labelled photos or a feature cache).

    Writes metrics.json, per_class.csv and report.html (confusion matrix, reliability plot,
    accuracy against coverage, the worst mistakes as thumbnails).
    """
    from .evaluate import evaluate as run

    click.echo(run(EvaluateConfig(**kw)).line())


@cli.command()
@_from_config(SimilarConfig, "image")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def similar(as_json: bool, **kw: Any) -> None:
    """The K catalog photos most similar to IMAGE (cosine of cached features)."""
    from .similar import similar as run

    cfg = SimilarConfig(**kw)
    matches = run(cfg.image, cfg.cache, k=cfg.k, device=cfg.device, exclude_self=cfg.exclude_self)
    if as_json:
        click.echo(json.dumps([dataclasses.asdict(m) for m in matches], indent=2, ensure_ascii=False))
        return
    for m in matches:
        click.echo(m.line())


@cli.command()
@_from_config(DemoConfig)
def demo(**kw: Any) -> None:
    """Run extract -> fit-head -> export -> predict on the bundled sample catalog."""
    from .demo import run_demo

    cfg = DemoConfig(**kw)
    click.echo(run_demo(Path(cfg.out), backbone=cfg.backbone, progress=cfg.progress).line())


@cli.group("cache")
def cache_group() -> None:
    """Inspect and check feature caches (headstart cache info / verify)."""


@cache_group.command("info")
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_info(cache: str, as_json: bool) -> None:
    """Fingerprint, row and class counts, skipped files of CACHE."""
    from .cache.inspection import format_info, info

    d = info(cache)
    click.echo(json.dumps(d, indent=2, ensure_ascii=False) if as_json else format_info(d))


@cache_group.command("verify")
@click.argument("cache", type=click.Path())
def cache_verify(cache: str) -> None:
    """Check CACHE's integrity: every dataset readable, no duplicate keys, counts consistent."""
    from .cache.inspection import verify_or_raise

    click.echo(verify_or_raise(cache))


def main() -> None:
    cli(prog_name="headstart")
