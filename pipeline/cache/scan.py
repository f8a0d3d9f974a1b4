"""What one extract run learned about the photo folder, and the index it gives (``Scan``).

``extract`` fills a :class:`Scan` (every torchrun rank its own, rank 0 merges the others'
segments into its own) and :func:`index_contents` turns it into the next index: one row per
distinct content, labels and paths from this scan, rows in storage order. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import numpy as np

from ..data.attributes import looks_multi_label
from ..data.catalog import Catalog
from . import statcache
from .h5io import CONFLICT, Column
from .index import IndexContents


@dataclass
class Scan:
    """One process's knowledge of the folder once its share of the work is done."""

    skipped: list[tuple[str, str]]  # (path, reason), found before any decoding
    by_hash: dict[str, list[int]] = field(default_factory=lambda: defaultdict(list))  # hash -> catalog items
    location: dict[str, tuple[str, int]] = field(default_factory=dict)  # hash -> (segment, row)
    bad: dict[str, str] = field(default_factory=dict)  # hash -> why its bytes give no row
    forget: set[str] = field(default_factory=set)  # the part of ``bad`` not to remember (not the content's fault)
    known_bad: int = 0  # the part of ``bad`` known from the index, not decoded again
    todo: list[str] = field(default_factory=list)  # new content, all ranks' together
    mine: list[str] = field(default_factory=list)  # the part of ``todo`` this process extracted
    segment_rows: dict[str, int] = field(default_factory=dict)  # segments outside the index rows may come from
    checked: statcache.Checked | None = None  # per catalog item: content hash (or why none) and stat
    scan_ns: int = 0  # when the scan began (see statcache.RACY_NS)
    inputs: str = ""  # inputs_digest of this scan
    unchanged: bool = False  # the committed index is what this run would write (inputs_digest)

    def computed(self, hashes: Sequence[str]) -> int:
        """How many of ``hashes`` got a row."""
        return sum(1 for h in hashes if h in self.location)


def index_contents(
    scan: Scan,
    rels: Sequence[str],
    labels: Sequence[str | None],
    *,
    attrs: dict[str, Any],
    old_segment_rows: dict[str, int],
    dtype: str,
    feature_dim: int,
    limits: str,
    attributes: dict[str, Sequence[str]] | None = None,
) -> IndexContents:
    """The next index from ``scan`` (``rels``/``labels``: per catalog item). Rows in storage
    order: the old index's segments first, in its order, then the new segments' rows. Content
    that failed is listed as skipped, and remembered (``rejected``) under ``limits`` unless the
    failure was not the content's. ``attributes``: the other label columns, a cell per item
    ("" = empty)."""
    class_names = sorted({lab for lab in labels if lab is not None})
    label_id = {n: i for i, n in enumerate(class_names)}
    rows: list[tuple[str, str, int]] = []  # hash, path, label
    duplicates: list[tuple[str, str]] = []
    skipped = list(scan.skipped)
    location = scan.location
    for h, members in sorted(scan.by_hash.items(), key=lambda kv: rels[kv[1][0]]):
        if len(members) == 1 and h in location:  # almost every file: no duplicate, no label conflict
            i = members[0]
            lab = labels[i]
            rows.append((h, rels[i], -1 if lab is None else label_id[lab]))
            continue
        if h not in location:
            skipped.extend((rels[i], scan.bad.get(h, "no features")) for i in members)
            continue
        item_labels = {lab for i in members if (lab := labels[i]) is not None}
        label = -1
        if len(item_labels) == 1:
            label = label_id[item_labels.pop()]
        elif len(item_labels) > 1:
            why = f"identical bytes filed under {len(item_labels)} labels ({', '.join(sorted(item_labels))})"
            skipped.append((rels[members[0]], f"{why}; kept unlabelled"))
        rows.append((h, rels[members[0]], label))
        duplicates.extend((rels[i], h) for i in members[1:])
    seg_rows = dict(old_segment_rows)
    seg_rows.update(sorted(scan.segment_rows.items()))
    order = {s: k for k, s in enumerate(seg_rows)}
    rows.sort(key=lambda r: (order[location[r[0]][0]], location[r[0]][1]))
    hashes, paths, row_labels = (list(col) for col in zip(*rows, strict=True)) if rows else ([], [], [])
    row_location = list(map(location.__getitem__, hashes))
    used = {s for s, _ in row_location}
    columns: dict[str, Column] = {}
    if attributes:
        members_of = [scan.by_hash[h] for h in hashes]
        columns = {name: _column(name, cells, members_of, rels, skipped) for name, cells in attributes.items()}
    return IndexContents(
        content_hash=hashes,
        paths=paths,
        labels=np.asarray(row_labels, dtype=np.int32),
        class_names=class_names,
        attrs=attrs,
        location=row_location,
        segment_rows={s: n for s, n in seg_rows.items() if s in used},
        dtype=dtype,
        feature_dim=feature_dim,
        duplicates=duplicates,
        skipped=sorted(skipped),
        rejected=sorted(
            (h, why, limits)
            for h, why in scan.bad.items()
            if h in scan.by_hash and h not in scan.location and h not in scan.forget
        ),
        stat=statcache.table(rels, scan.checked, scan.scan_ns) if scan.checked else statcache.StatTable(),
        attributes=columns,
    )


def _column(
    name: str, cells: Sequence[str], members_of: list[list[int]], rels: Sequence[str], skipped: list[tuple[str, str]]
) -> Column:
    """One attribute column over the index rows (``members_of``: each row's catalog items).
    Identical files whose cells disagree give the row :data:`CONFLICT` (recorded in
    ``skipped``): an empty cell next to a filled one is no conflict in a single-label column
    (unlabelled), but is one in a multi-label column, where empty means "none of the labels"."""
    values = sorted({c for c in cells if c})
    value_id = {v: i for i, v in enumerate(values)}
    multi = looks_multi_label(values)
    out = np.full(len(members_of), -1, dtype=np.int32)
    for row, members in enumerate(members_of):
        seen = {c for i in members if (c := cells[i]) or multi}
        if len(seen) == 1:
            only = seen.pop()
            out[row] = value_id[only] if only else -1
        elif seen:
            shown = ", ".join(sorted(repr(s) for s in seen))
            why = f"identical bytes with {len(seen)} different {name} ({shown}); left out of the {name} head"
            skipped.append((rels[members[0]], why))
            out[row] = CONFLICT
    return Column(out, values)


@dataclass(frozen=True)
class LabelColumns:
    """An index's rows as a relabel count compares them: content keys as ``S32`` and every label
    column, the main label first and then the attributes in order, as (per-row ids, the values
    they index; -1 and -2, unlabelled and conflict, mean no value). Arrays, no object per row."""

    hashes: np.ndarray
    columns: list[tuple[np.ndarray, list[str]]]

    @classmethod
    def of(
        cls,
        hashes: Sequence[str] | np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        attributes: dict[str, Column] | None = None,
    ) -> LabelColumns:
        columns = [(np.asarray(labels), list(class_names))]
        columns += [(np.asarray(c.labels), list(c.values)) for c in (attributes or {}).values()]
        return cls(np.asarray(hashes, dtype="S32"), columns)


def label_changes(before: LabelColumns | None, after: IndexContents) -> tuple[int, int]:
    """(rows removed, rows relabelled) from the index ``before`` to ``after``; a row counts as
    relabelled when its label or any attribute cell changed. Rows are matched by content key
    with one sorted intersection, and each column compared as codes of one shared vocabulary:
    numpy work. Why: two dicts of every row's labels, and the set of their items, were about a
    fifth of the memory of a run that commits."""
    if before is None:
        return 0, 0
    now = LabelColumns.of(after.content_hash, after.labels, after.class_names, after.attributes)
    both, old_rows, new_rows = np.intersect1d(before.hashes, now.hashes, assume_unique=True, return_indices=True)
    removed = len(before.hashes) - len(both)
    if len(before.columns) != len(now.columns):  # a column added or gone: every kept row changed
        return removed, len(both)
    changed = np.zeros(len(both), dtype=bool)
    for (old_ids, old_values), (new_ids, new_values) in zip(before.columns, now.columns, strict=True):
        code = {v: k for k, v in enumerate(sorted({*old_values, *new_values}))}
        none = len(code)  # ids -1 and -2 index the two trailing entries: one code for "no value"
        old_code = np.array([*map(code.__getitem__, old_values), none, none], dtype=np.int64)
        new_code = np.array([*map(code.__getitem__, new_values), none, none], dtype=np.int64)
        changed |= old_code[old_ids[old_rows]] != new_code[new_ids[new_rows]]
    return removed, int(changed.sum())


INPUTS_ATTR = "inputs_digest"
# Part of every inputs digest. Bump it when the index made from the same inputs changes (what
# index_contents puts in it, or how index.write_index lays it out): an index kept by unchanged
# re-runs of an earlier build is then rebuilt once, in the new form, on the next run.
INDEX_RULES = 3  # 2: one mapping per segment (per 64 runs), index.write_index; 3: stat cache in catalog order


def inputs_digest(catalog: Catalog, checked: statcache.Checked, context: list[Any]) -> str:
    """SHA-256 of everything the next index is made from, besides the index before it: every
    file's path, labels, content hash (or why it cannot be read) and stat, the files the folder
    scan skipped, and ``context`` (fingerprint, decode limits, dtype, release). A run that
    leaves nothing to do records it in the index it commits (``INPUTS_ATTR``); a later run with
    the same digest, nothing new to extract and every file in the stat cache would write that
    same index again, so it reads nothing more of it (:attr:`Scan.unchanged`). Why: at 100,000
    files, rebuilding and digesting every row's metadata to find no change cost as much as the
    stat of every file. Paths and hashes hold no NUL (catalog.py skips such names), so NUL
    keeps them apart; the rest goes through JSON, whose C encoder keeps fields apart too."""
    h = hashlib.sha256()
    enc = json.JSONEncoder(check_circular=False, separators=(",", ":"), default=str).encode
    items = catalog.items
    h.update(enc([context, str(catalog.root), catalog.layout, catalog.label_column, catalog.attribute_names]).encode())
    h.update(enc([(s.rel, s.reason) for s in catalog.skipped]).encode())
    h.update(enc(list(map(attrgetter("label"), items))).encode())
    h.update(enc(list(map(attrgetter("attributes"), items))).encode())
    for texts in (list(map(attrgetter("rel"), items)), checked.values):
        h.update(b"\n")
        try:
            joined = "\0".join(texts)  # type: ignore[arg-type]
        except TypeError:  # some file could not be read: its error, as text
            joined = "\0".join(v if type(v) is str else f"{v}" for v in texts)
        h.update(joined.encode("utf-8", "surrogateescape"))
    h.update(np.ascontiguousarray(checked.keys, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]
