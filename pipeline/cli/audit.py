"""``headstart audit``: the catalog's label issues, look-alike categories, near duplicates,
outliers and what to label next, from the feature cache."""

from __future__ import annotations

from typing import Any

import click

from ..config import AuditConfig
from .app import _from_config, cli


@cli.command()
@_from_config(AuditConfig, "cache")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON (counts, files, warnings).")
def audit(as_json: bool, **kw: Any) -> None:
    """Audit a labelled catalog from its feature cache alone: no photo is decoded again.

    Cross-fits the head fit-head would fit and writes, in --out: label_issues.csv (likely
    mislabelled photos), overlaps.csv (categories the head confuses, with a classes.toml
    [rename] line), duplicates.csv (near duplicates, also across categories), outliers.csv
    (photos far from every category), label_next.csv (unlabelled photos worth labelling) and
    report.html. --apply ACCEPTED.csv writes relabelled.csv, a manifest for extract.
    """
    from ..audit import audit as run

    summary = run(AuditConfig(**kw))
    click.echo(summary.to_json() if as_json else summary.line())
