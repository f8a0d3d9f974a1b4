"""``headstart cache ...``: inspect and maintain feature caches."""

from __future__ import annotations

import json

import click

from .app import cli


@cli.group("cache")
def cache_group() -> None:
    """Inspect and check feature caches (headstart cache info / verify)."""


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
