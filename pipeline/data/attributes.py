"""Attributes: the label columns of a CSV manifest (``path,category,finish,tags``), one head each.

A photo of a beauty catalog carries several labels: its category, its finish, its tags. In a
manifest each is a column; class-per-folder catalogs have one, the folder name. Two kinds:

* **single-label**: one class per photo (``category``, ``finish``); an empty cell is unlabelled;
* **multi-label**: any number of labels per photo, ``;``-separated in the cell
  (``vegan;refillable``); an empty cell means *no* labels (a negative for every label). A
  column is multi-label when any of its cells holds a ``;``, or when the label map that names
  it says ``multi_label = true`` (a column whose photos happen to carry one tag each).

The cache stores every column's cells as written (``docs/formats.md``): which kind a column is,
and the label map, are decided when a head is fitted, so relabelling or re-declaring a column
never re-extracts.

The **label column** is the one that class-per-folder code has always read as "the label" (the
cache's ``/labels``): ``label`` or ``category`` when the manifest has one, else its first
column without a ``;``. The other columns are the cache's ``/attributes``.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InputError
from .labels import LabelMap, Mapped, MappedMulti, apply_label_map, apply_multi_label

SEPARATOR = ";"  # between the labels of a multi-label cell
LABEL_COLUMNS = ("label", "category")  # the names that make a column the label column, in order


def split_cell(cell: str) -> list[str]:
    """The labels of a multi-label cell, stripped, empty parts dropped, first occurrence kept:
    ``"vegan; refillable;"`` -> ``["vegan", "refillable"]``."""
    return list(dict.fromkeys(part.strip() for part in cell.split(SEPARATOR) if part.strip()))


def looks_multi_label(cells: Iterable[str]) -> bool:
    """Whether any cell of a column holds a separator (then the column is multi-label)."""
    return any(SEPARATOR in c for c in cells)


def label_column(columns: Sequence[str], cells: dict[str, Iterable[str]]) -> str | None:
    """Which of a manifest's ``columns`` is the label column (see the module docstring);
    ``cells``: each column's values. None when there is no single-label column to choose."""
    for name in LABEL_COLUMNS:
        if name in columns:
            return name
    return next((c for c in columns if not looks_multi_label(cells[c])), None)


@dataclass
class Target:
    """One attribute to fit a head for, its labels through its label map: ``mapped`` (single
    label: a class per row, -1 none) or ``multi`` (a 0/1 row per photo), the other None."""

    name: str
    label_map: LabelMap | None
    categories: list[str]  # the column's values as the cache stores them (single-label: its classes)
    mapped: Mapped | None = None
    multi: MappedMulti | None = None

    @property
    def multi_label(self) -> bool:
        return self.multi is not None


def resolve_targets(
    label_column: str,
    columns: dict[str, tuple[list[str], np.ndarray]],
    label_maps: Sequence[LabelMap],
    wanted: Sequence[str] = (),
) -> list[Target]:
    """The attributes a ``fit-head`` run fits, in order: the single-label ones first (the first
    is the head directory's main head), then the multi-label ones. ``columns``: name -> (the
    column's values, per row an index into them, -1 empty), the label column first; ``wanted``:
    ``--attribute`` (default: every column with a labelled row, the label column always)."""
    names = list(columns)
    by_attribute: dict[str, LabelMap] = {}
    for m in label_maps:
        name = m.attribute or label_column
        if name not in columns:
            raise InputError(_not_a_column(f"label map {m.source} is for attribute {name!r}, which", name, names))
        if name in by_attribute:
            raise InputError(f"label maps {by_attribute[name].source} and {m.source} are both for {name!r}; keep one")
        by_attribute[name] = m
    for name in wanted:
        if name not in columns:
            raise InputError(_not_a_column(f"--attribute {name!r}", name, names))
    chosen = list(dict.fromkeys(wanted)) or [
        n for n in names if n == label_column or (columns[n][1] >= 0).any() or n in by_attribute
    ]
    targets = []
    for name in chosen:
        values, labels = columns[name]
        lm = by_attribute.get(name)
        if (lm is not None and lm.multi_label) or looks_multi_label(values):
            targets.append(Target(name, lm, values, multi=apply_multi_label(lm, values, labels)))
        else:
            targets.append(Target(name, lm, values, mapped=apply_label_map(lm, values, labels)))
    targets.sort(key=lambda t: t.multi_label)  # stable: the single-label ones first, in column order
    if targets and targets[0].multi_label:
        listed = ", ".join(t.name for t in targets)
        raise InputError(
            f"every attribute to fit ({listed}) is multi-label; a head directory needs one single-label "
            "attribute for its main head (predict's label): add a category column to the manifest, or "
            "--attribute one that is single-label"
        )
    return targets


def _not_a_column(what: str, name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=1)
    return (
        f"{what} is not a column of the cache"
        + (f" (did you mean {close[0]!r}?)" if close else "")
        + f"; its attributes are: {', '.join(names)}"
    )
