"""The pipeline's commands: one per stage, each a thin shell over its library function."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from ..config import (
    DemoConfig,
    EvaluateConfig,
    ExportConfig,
    ExtractConfig,
    FinetuneConfig,
    FitHeadConfig,
    PredictConfig,
    SimilarConfig,
)
from ..probe.kinds import HEAD_KINDS
from .app import _from_config, cli


@cli.command()
@_from_config(ExtractConfig, "images")
def extract(**kw: Any) -> None:
    """Run the backbone once over IMAGES and cache the features in HDF5.

    IMAGES is a folder of class folders (images/lipstick/*.jpg), a folder of unlabelled
    images, or a CSV manifest with columns path,label (or one column per attribute:
    path,category,finish,tags; ';' separates the labels of a multi-label cell). Re-running on
    a grown folder extracts only the new photos; an interrupted run resumes where it stopped.
    """
    from ..extract import extract as run

    summary = run(ExtractConfig(**kw))
    for name, why in summary.set_aside:
        click.echo(f"set aside damaged segment {name} as {name}.damaged ({why}); its rows were extracted again",
                   err=True)  # fmt: skip
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
    help="logreg (swept C), mlp (one hidden layer), centroid (few-shot: five photos make a class), "
    "zeroshot (from the class prompts of --classes; CLIP/SigLIP backbones, no photo needed).",
)
def fit_head(**kw: Any) -> None:
    """Train a classification head on a feature cache, in seconds: one per attribute of a
    manifest (multi-label ones one-vs-rest, with a threshold per label)."""
    from ..fit_head import fit_head as run

    click.echo(run(FitHeadConfig(**kw)).line())


@cli.command()
@_from_config(FinetuneConfig, "images")
def finetune(**kw: Any) -> None:
    """Fine-tune the whole network on IMAGES, starting from a fitted head (LP-FT).

    Gradual unfreezing from the top, layer-wise learning rates, early stopping on fit-head's
    validation photos; resumable. Runs under `torchrun` too (DistributedDataParallel).
    """
    from ..finetune.stage import finetune as run

    summary = run(FinetuneConfig(**kw))
    if summary.is_main:
        click.echo(summary.line())


@cli.command()
@_from_config(ExportConfig, "head")
def export(**kw: Any) -> None:
    """Combine backbone, preprocessing and HEAD into one self-contained, parity-checked model."""
    from ..export import export as run

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
    from ..predict import predict as run

    _, summary = run(PredictConfig(**kw))
    click.echo(summary.line(), err=kw["out"] == "-")


@cli.command()
@_from_config(EvaluateConfig, "model", "data")
def evaluate(**kw: Any) -> None:
    """Score MODEL (exported model or head directory) on DATA (labelled photos or a feature cache).

    Writes metrics.json, per_class.csv and report.html (confusion matrix, reliability plot,
    accuracy against coverage, the worst mistakes as thumbnails).
    """
    from ..evaluate import evaluate as run

    click.echo(run(EvaluateConfig(**kw)).line())


@cli.command()
@_from_config(SimilarConfig, "image")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def similar(as_json: bool, **kw: Any) -> None:
    """The K catalog photos most similar to IMAGE (cosine of cached features)."""
    from ..similar import similar as run

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
    from ..demo import run_demo

    cfg = DemoConfig(**kw)
    click.echo(run_demo(Path(cfg.out), backbone=cfg.backbone, image_size=cfg.image_size, progress=cfg.progress).line())
