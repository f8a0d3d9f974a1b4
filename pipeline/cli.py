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
    EvaluateConfig,
    ExportConfig,
    ExtractConfig,
    FinetuneConfig,
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
@click.option("--batch-size", type=click.IntRange(1), help="Default: 256 on GPU, 16 on CPU.")
@click.option("--workers", type=click.IntRange(0), help="Decode processes. Default: from the CPU count.")
@click.option(
    "--draft/--no-draft", default=True, show_default=True, help="JPEG DCT-domain downscaling of large photos."
)
@click.option("--letterbox", is_flag=True, help="Pad to a square on white instead of centre-cropping.")
@click.option(
    "--decode",
    type=click.Choice(["cpu", "gpu"]),
    default="cpu",
    show_default=True,
    help="gpu: batched nvjpeg JPEG decoding and resizing on the GPU (CPU fallback per file).",
)
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
@click.option(
    "--head",
    type=click.Choice(["logreg", "mlp", "centroid"]),
    default="logreg",
    show_default=True,
    help="logreg (swept C), mlp (one hidden layer), centroid (few-shot: five photos make a class).",
)
@click.option("--c", "c", type=float, help="Inverse regularisation strength; default: swept on the validation split.")
@click.option("--classes", type=click.Path(dir_okay=False), help="Label map TOML: merge/rename/drop, stable ids.")
@click.option("--val-fraction", type=float, default=0.2, show_default=True, help="Stratified validation share.")
@click.option(
    "--near-duplicate-threshold",
    type=click.FloatRange(0, 1),
    default=FitHeadConfig.near_duplicate_threshold,
    show_default=True,
    help="Photos with feature cosine above this stay on one side of the split (1 = off).",
)
@click.option("--class-weight", type=click.Choice(["balanced"]), help="Re-weight classes (imbalanced catalogs).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the validation split.")
@click.option("--max-iter", type=click.IntRange(1), default=1000, show_default=True, help="L-BFGS iterations.")
@click.option("--device", default="auto", show_default=True, help="cuda: torch L-BFGS on the GPU; cpu: scikit-learn.")
@click.option(
    "--calibrate/--no-calibrate", default=True, show_default=True, help="Temperature scaling on the validation split."
)
@click.option(
    "--unknown-threshold", type=click.FloatRange(0, 1), help="Recorded in the head: below it, evaluate says unknown."
)
@click.option("--hidden", type=click.IntRange(1), default=512, show_default=True, help="MLP hidden width.")
@click.option("--max-memory-gb", type=click.FloatRange(0), help="Above: stream features from the cache (logreg).")
def fit_head(cache: str, **kw: Any) -> None:
    """Train a classification head on a feature cache, in seconds."""
    from .fit_head import fit_head as run

    click.echo(run(FitHeadConfig(cache=cache, **kw)).line())


@cli.command()
@click.argument("images", type=click.Path())
@click.option("--head", required=True, type=click.Path(), help="HEAD_DIR from fit-head (the LP-FT start).")
@click.option("--out", "-o", default=FinetuneConfig.out, show_default=True, help="FT_DIR to write.")
@click.option("--epochs", type=click.IntRange(1), default=FinetuneConfig.epochs, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), help="Per process. Default: 64 on GPU, 32 on CPU.")
@click.option("--accum-steps", type=click.IntRange(1), default=1, show_default=True, help="Gradient accumulation.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=FinetuneConfig.lr, show_default=True)
@click.option(
    "--layer-decay", type=float, default=FinetuneConfig.layer_decay, show_default=True, help="LR factor per group down."
)
@click.option("--stages", type=click.IntRange(1), default=FinetuneConfig.stages, show_default=True, help="Groups.")
@click.option(
    "--unfreeze-every",
    type=click.FloatRange(0),
    default=FinetuneConfig.unfreeze_every,
    show_default=True,
    help="Epochs between unfreezing the next group down; 0 = all at once.",
)
@click.option("--warmup", type=float, default=FinetuneConfig.warmup, show_default=True, help="Share of steps.")
@click.option("--weight-decay", type=click.FloatRange(0), default=FinetuneConfig.weight_decay, show_default=True)
@click.option("--label-smoothing", type=float, default=0.0, show_default=True)
@click.option("--class-weight", type=click.Choice(["balanced"]), help="Re-weight classes (imbalanced catalogs).")
@click.option(
    "--augment",
    type=click.Choice(["auto", "product", "letterbox", "none"]),
    default="auto",
    show_default=True,
    help="Augmentation preset; none of them changes colour.",
)
@click.option("--init", type=click.Choice(["lp", "random"]), default="lp", show_default=True, help="Start head.")
@click.option("--patience", type=click.IntRange(0), default=FinetuneConfig.patience, show_default=True)
@click.option("--checkpoint-every", type=click.IntRange(1), default=FinetuneConfig.checkpoint_every, show_default=True)
@click.option("--resume", is_flag=True, help="Continue an interrupted fine-tune from FT_DIR/checkpoint/last.pt.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(0), help="Decode processes.")
@click.option("--weights-file", type=click.Path(dir_okay=False), help="Backbone weights file.")
@_progress_option
def finetune(images: str, **kw: Any) -> None:
    """Fine-tune the whole network on IMAGES, starting from a fitted head (LP-FT).

    Gradual unfreezing from the top, layer-wise learning rates, early stopping on fit-head's
    validation photos; resumable. Runs under `torchrun` too (DistributedDataParallel).
    """
    from .finetune.stage import finetune as run

    summary = run(FinetuneConfig(images=images, **kw))
    if summary.is_main:
        click.echo(summary.line())


@cli.command()
@click.argument("head", type=click.Path())
@click.option("--out", "-o", default=ExportConfig.out, show_default=True, help="Model directory to write.")
@click.option(
    "--weights-file", type=click.Path(dir_okay=False), help="Backbone weights file, if not found automatically."
)
@click.option(
    "--format",
    "format",
    type=click.Choice(["native", "onnx"]),
    default="native",
    show_default=True,
    help="native: model.pt for headstart/PyTorch; onnx: model.onnx for onnxruntime (pip install 'headstart[onnx]').",
)
@click.option(
    "--parity-tolerance",
    type=click.FloatRange(0),
    default=ExportConfig.parity_tolerance,
    show_default=True,
    help="Fail if exported and PyTorch probabilities differ by more on sample images.",
)
def export(head: str, **kw: Any) -> None:
    """Combine backbone, preprocessing and HEAD into one self-contained, parity-checked model."""
    import json as _json

    from .export import export as run

    path = run(ExportConfig(head=head, **kw))
    manifest = _json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    parity = manifest["parity"]
    click.echo(
        f"{path}: {manifest['runtime']} model written ({', '.join(manifest['files'])} + manifest.json); "
        f"parity max |dp| {parity['max_abs_diff']:.2g} on {parity['n_images']} images"
    )


@cli.command()
@click.argument("model", type=click.Path())
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "--out", "-o", default=PredictConfig.out, show_default=True, help="CSV or .jsonl file to write; - for stdout."
)
@click.option(
    "--format",
    "format",
    type=click.Choice(["csv", "jsonl"]),
    help="Output format. Default: jsonl if --out ends in .jsonl/.ndjson, else csv.",
)
@click.option("--top-k", type=click.IntRange(1), default=3, show_default=True, help="Labels per photo.")
@click.option(
    "--unknown-threshold",
    type=click.FloatRange(0, 1),
    help="Label a photo 'unknown' when its best probability is below this.",
)
@click.option(
    "--embeddings", type=click.Path(dir_okay=False), help="Also write the features, one row per input (.npy or .h5)."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option(
    "--precision",
    type=click.Choice(["auto", "fp32", "bf16"]),
    default="auto",
    show_default=True,
    help="auto = the precision the head was trained on, when this machine runs it fast.",
)
@click.option("--batch-size", type=click.IntRange(1), help="Default: 256 on GPU, 16 on CPU.")
@click.option("--workers", type=click.IntRange(0), help="Decode processes.")
@_progress_option
def predict(model: str, inputs: tuple[str, ...], **kw: Any) -> None:
    """Classify INPUTS with an exported MODEL (native or ONNX); write CSV or JSON Lines.

    INPUTS are image files, folders (searched recursively), glob patterns ('photos/**/*.jpg'),
    lists of paths (.txt one per line, .csv with a path column; relative to the list) or - to
    read paths from stdin. Files that cannot be decoded get a row with the error.
    """
    from .predict import predict as run

    _, summary = run(PredictConfig(model=model, inputs=inputs, **kw))
    click.echo(summary.line(), err=kw["out"] == "-")


@cli.command()
@click.argument("model", type=click.Path())
@click.argument("data", type=click.Path())
@click.option("--out", "-o", default=EvaluateConfig.out, show_default=True, help="Report directory to write.")
@click.option(
    "--unknown-threshold", type=click.FloatRange(0, 1), help="Report coverage/accuracy at it (default: the head's)."
)
@click.option("--worst", type=click.IntRange(0), default=24, show_default=True, help="Mistakes shown as thumbnails.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--batch-size", type=click.IntRange(1), help="Default: 256 on GPU, 16 on CPU.")
@click.option("--workers", type=click.IntRange(0), help="Decode processes.")
@_progress_option
def evaluate(model: str, data: str, **kw: Any) -> None:
    """Score MODEL (exported model or head directory) on DATA (labelled photos or a feature cache).

    Writes metrics.json, per_class.csv and report.html (confusion matrix, reliability plot,
    accuracy against coverage, the worst mistakes as thumbnails).
    """
    from .evaluate import evaluate as run

    click.echo(run(EvaluateConfig(model=model, data=data, **kw)).line())


@cli.command()
@click.argument("image", type=click.Path())
@click.option("--cache", "cache", required=True, type=click.Path(), help="Feature cache to search.")
@click.option("-k", "k", type=click.IntRange(1), default=10, show_default=True, help="How many photos.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def similar(image: str, cache: str, k: int, device: str, as_json: bool) -> None:
    """The K catalog photos most similar to IMAGE (cosine of cached features)."""
    from dataclasses import asdict

    from .similar import similar as run

    matches = run(image, cache, k=k, device=device)
    if as_json:
        click.echo(json.dumps([asdict(m) for m in matches], indent=2, ensure_ascii=False))
        return
    for m in matches:
        click.echo(m.line())


@cli.command()
@click.option("--out", "-o", default="artifacts/demo", show_default=True, help="Where to write everything.")
@click.option("--backbone", "-b", default=DEFAULT_BACKBONE, show_default=True, help="See `headstart backbones`.")
@_progress_option
def demo(out: str, backbone: str, progress: bool) -> None:
    """Run extract -> fit-head -> export -> predict on the bundled sample catalog."""
    from .demo import run_demo

    result = run_demo(Path(out), backbone=backbone, progress=progress)
    click.echo(result.line())


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
