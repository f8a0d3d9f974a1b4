"""``headstart cache ...``: inspect and maintain feature caches."""

from __future__ import annotations

import json

import click

from .app import cli


@cli.group("cache")
def cache_group() -> None:
    """Inspect, check and maintain feature caches (info, verify, compact, migrate, export)."""


@cache_group.command("info")
@click.argument("cache", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def cache_info(cache: str, as_json: bool) -> None:
    """Fingerprint, row and class counts, skipped files of CACHE."""
    from ..cache.inspection import format_info, info

    d = info(cache)
    click.echo(json.dumps(d, indent=2, ensure_ascii=False) if as_json else format_info(d))


@cache_group.command("verify")
@click.argument("cache", type=click.Path())
def cache_verify(cache: str) -> None:
    """Check CACHE's integrity: every dataset readable, no duplicate keys, counts consistent."""
    from ..cache.inspection import verify_or_raise

    click.echo(verify_or_raise(cache))


@cache_group.command("compact")
@click.argument("cache", type=click.Path())
@click.option(
    "--min-dead-share",
    type=click.FloatRange(0.0, 1.0),
    default=None,
    help="Rewrite a segment when at least this share of its rows is dead [default: 0.25]; 0: every segment "
    "with a dead row.",
)
def cache_compact(cache: str, min_dead_share: float | None) -> None:
    """Reclaim the disk space of deleted photos' rows in CACHE.

    Copies the live rows of segments with many dead rows into new segments, replaces the index,
    then deletes the old segments; features, labels and paths are unchanged. Safe to kill at any
    moment (the cache stays valid; run it again to finish). `extract` does this on its own when
    more than 25% of the rows in the segments are dead.
    """
    from ..cache.compact import SEGMENT_DEAD_SHARE, compact

    share = SEGMENT_DEAD_SHARE if min_dead_share is None else min_dead_share
    click.echo(compact(cache, min_dead_share=share).line())


@cache_group.command("migrate")
@click.argument("cache", type=click.Path())
def cache_migrate(cache: str) -> None:
    """Convert CACHE from schema v1 (release 0.1.0) to the segmented schema v2.

    The next `extract` does this on its own; this does it now, without images. A cache already
    in v2 is left as it is.
    """
    from ..cache.compact import migrate

    click.echo(migrate(cache))


@cache_group.command("export")
@click.argument("cache", type=click.Path())
@click.argument("out_dir", metavar="DIR", type=click.Path(file_okay=False))
@click.option(
    "--format", "fmt", type=click.Choice(["parquet"]), default="parquet", show_default=True, help="Output format."
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "float32"]),
    default=None,
    help="Feature type in the files (default: the cache's). float32 for readers without Parquet float16.",
)
@click.option(
    "--rows-per-file",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="At most this many rows per part-NNNNN.parquet file.",
)
def cache_export(cache: str, out_dir: str, fmt: str, dtype: str | None, rows_per_file: int) -> None:
    """Write CACHE's rows to DIR as Parquet files, for DuckDB, polars, LanceDB or FAISS.

    Columns: content_hash, path, label (null when unlabelled), label_id, features (a fixed-size
    list). Streams the cache in chunks, so memory does not grow with it. Needs pyarrow:
    pip install '.[parquet]'. An earlier export in DIR is replaced.
    """
    from ..cache.parquet import export_parquet

    click.echo(export_parquet(cache, out_dir, dtype=dtype, rows_per_file=rows_per_file).line())
