"""The ``headstart`` command line: a thin click shell over the library.

Each command parses options, builds one config, calls one library function and prints one
summary line. This is the only module that imports click; library errors
(:class:`~pipeline.errors.HeadstartError`) are translated here, once, into ``Error: ...`` and
exit status 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from . import __version__
from .config import (
    DEFAULT_BACKBONE,
    ExportConfig,
    ExtractConfig,
    FitHeadConfig,
    PredictConfig,
    load_default_map,
)
from .errors import HeadstartError


class HeadstartGroup(click.Group):
    """Turns domain errors into ``Error: <message>`` and exit 1, never a traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except HeadstartError as e:
            raise click.ClickException(str(e)) from None
        except KeyboardInterrupt:
            click.echo("Interrupted; finished batches are kept and the next run resumes.", err=True)
            sys.exit(130)


def _load_config(ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
    if value:
        try:
            ctx.default_map = load_default_map(value)
        except HeadstartError as e:
            raise click.BadParameter(str(e)) from None
    return value


@click.group(cls=HeadstartGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="headstart")
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    callback=_load_config,
    is_eager=True,
    expose_value=False,
    help="TOML file with one table per command ([extract], [fit-head], ...); flags override it.",
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


def _progress_option(f: Any) -> Any:
    return click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")(f)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def backbones(as_json: bool) -> None:
    """List the backbones and whether each can be used offline right now."""
    from .backbones import get_spec, names

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
@click.argument("images", type=click.Path())
@click.option(
    "--out", "-o", default=ExtractConfig.out, show_default=True, help="HDF5 feature cache to create or update."
)
@click.option("--backbone", "-b", default=DEFAULT_BACKBONE, show_default=True, help="See `headstart backbones`.")
@click.option("--weights-file", type=click.Path(dir_okay=False), help="Backbone weights file (torchvision .pth).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="Compute precision; auto = bf16 on CUDA and on CPUs with AMX/avx512_bf16.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default="float16",
    show_default=True,
    help="Storage type of the features.",
)
@click.option("--batch-size", type=click.IntRange(1), help="Default: 256 on GPU, 32 on CPU.")
@click.option("--workers", type=click.IntRange(0), help="Decode processes. Default: from the CPU count.")
@click.option(
    "--draft/--no-draft", default=True, show_default=True, help="JPEG DCT-domain downscaling of large photos."
)
@click.option("--letterbox", is_flag=True, help="Pad to a square on white instead of centre-cropping.")
@click.option("--max-pixels", type=click.IntRange(1), help="Refuse larger images (decompression bombs).")
@click.option("--rebuild", is_flag=True, help="Discard the existing cache and start over.")
@click.option("--strict", is_flag=True, help="Exit with an error if any file was skipped.")
@_progress_option
def extract(images: str, **kw: Any) -> None:
    """Run the backbone once over IMAGES and cache the features in HDF5.

    IMAGES is a folder of class folders (images/lipstick/*.jpg), a folder of unlabelled
    images, or a CSV manifest with columns path,label. Re-running on a grown folder extracts
    only the new photos; an interrupted run resumes where it stopped.
    """
    from .extract import extract as run

    summary = run(ExtractConfig(images=images, **kw))
    for path, reason in summary.skipped[:20]:
        click.echo(f"skipped {path}: {reason}", err=True)
    if len(summary.skipped) > 20:
        click.echo(f"... and {len(summary.skipped) - 20} more (see `headstart cache info`)", err=True)
    click.echo(summary.line())


@cli.command("fit-head")
@click.argument("cache", type=click.Path())
@click.option("--out", "-o", default=FitHeadConfig.out, show_default=True, help="Head directory to write.")
@click.option("--head", type=click.Choice(["logreg"]), default="logreg", show_default=True, help="Head type.")
@click.option("--c", "c", type=float, help="Inverse regularisation strength; default: swept on the validation split.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Stratified validation share.")
@click.option("--class-weight", type=click.Choice(["balanced"]), help="Re-weight classes (imbalanced catalogs).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--max-iter", type=click.IntRange(1), default=1000, show_default=True, help="L-BFGS iterations.")
def fit_head(cache: str, **kw: Any) -> None:
    """Train a classification head on a feature cache, in seconds."""
    from .fit_head import fit_head as run

    click.echo(run(FitHeadConfig(cache=cache, **kw)).line())


@cli.command()
@click.argument("head", type=click.Path())
@click.option("--out", "-o", default=ExportConfig.out, show_default=True, help="Model directory to write.")
@click.option(
    "--weights-file", type=click.Path(dir_okay=False), help="Backbone weights file, if not found automatically."
)
def export(head: str, **kw: Any) -> None:
    """Combine backbone, preprocessing and HEAD into one self-contained model."""
    from .export import export as run

    path = run(ExportConfig(head=head, **kw))
    click.echo(f"{path}: model written (manifest.json + model.pt)")


@cli.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", "-o", default=PredictConfig.out, show_default=True, help="CSV file to write.")
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True, help="Labels per photo.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--batch-size", type=click.IntRange(1), help="Default: 256 on GPU, 32 on CPU.")
@click.option("--workers", type=click.IntRange(0), help="Decode processes.")
@_progress_option
def predict(model: str, inputs: tuple[str, ...], **kw: Any) -> None:
    """Classify INPUTS (files and folders) with an exported MODEL; write a CSV."""
    from .predict import predict as run

    out, rows = run(PredictConfig(model=model, inputs=inputs, **kw))
    failed = sum(1 for r in rows if r["error"])
    click.echo(f"{out}: {len(rows)} predictions" + (f", {failed} files could not be read" if failed else ""))


@cli.command()
@click.option("--out", "-o", default="artifacts/demo", show_default=True, help="Where to write everything.")
@click.option("--backbone", "-b", default=DEFAULT_BACKBONE, show_default=True, help="See `headstart backbones`.")
@_progress_option
def demo(out: str, backbone: str, progress: bool) -> None:
    """Run extract -> fit-head -> export -> predict on the bundled sample catalog."""
    from .demo import run_demo

    result = run_demo(Path(out), backbone=backbone, progress=progress)
    click.echo(result.line())


def main() -> None:
    cli(prog_name="headstart")
