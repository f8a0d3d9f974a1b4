"""The cache index: the small HDF5 file that maps segments as one ``/features`` (``store.py``).

Written whole and replaced atomically by every commit; it holds per-row metadata and the stat
cache, never feature bytes. Also the conversion of a schema-v1 cache. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..models.fingerprint import KEYS as FINGERPRINT_KEYS
from .h5io import (
    SCHEMA_VERSION,
    Column,
    StatTable,
    _packed,
    _packed_str,
    _set_attrs,
    _str_ds,
    _write_h5_atomically,
    crash_point,
    segment_dir,
)
from .segments import remove_unindexed_segments, write_segment
from .store import Cache


@dataclass
class IndexContents:
    """Everything an index file holds; the feature bytes stay in the segments it names."""

    content_hash: list[str]
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    attrs: dict[str, Any]
    location: list[tuple[str, int]]  # per row: (segment name, row in it)
    segment_rows: dict[str, int]  # segment name -> its number of rows
    dtype: str
    feature_dim: int
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, content_hash)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    # Content that gave no row, remembered so an unchanged broken file is not decoded every
    # run: (content hash, reason, the decode limits it failed under).
    rejected: list[tuple[str, str, str]] = field(default_factory=list)
    stat: StatTable = field(default_factory=StatTable)
    # The manifest's other label columns (data/attributes.py), in its order: name -> Column.
    attributes: dict[str, Column] = field(default_factory=dict)


def mapping_runs(seg: np.ndarray, row: np.ndarray) -> tuple[list[int], list[int]]:
    """Start and end of every run of index rows that are consecutive rows of one segment: each
    run is one mapping of the virtual ``/features`` (what a commit writes and a reader holds)."""
    if not len(seg):
        return [], []
    brk = np.flatnonzero((np.diff(seg) != 0) | (np.diff(row) != 1)) + 1
    return np.concatenate([[0], brk]).tolist(), np.concatenate([brk, [len(seg)]]).tolist()


def write_index(path: Path, c: IndexContents) -> int:
    """Replace the index atomically: readers see the old one or the new one. Its cost is the
    per-row metadata; no feature byte is copied. Returns the bytes written."""
    n, d = len(c.content_hash), c.feature_dim
    used = list(dict.fromkeys(s for s, _ in c.location))  # in first-use order
    seg_id = {s: i for i, s in enumerate(used)}
    names, rows = zip(*c.location, strict=True) if n else ((), ())
    loc_seg = np.array([seg_id[s] for s in names], dtype=np.int32)
    loc_row = np.array(rows, dtype=np.int64)
    folder = segment_dir(path).name

    def fill(f: h5py.File) -> None:
        if n:
            dt = np.dtype(c.dtype)
            layout = h5py.VirtualLayout(shape=(n, d), dtype=dt)
            sources = {
                s: h5py.VirtualSource(f"{folder}/{s}", "features", shape=(c.segment_rows[s], d), dtype=dt) for s in used
            }
            for a, b in zip(*mapping_runs(loc_seg, loc_row), strict=True):
                r0 = int(loc_row[a])
                layout[a:b] = sources[used[int(loc_seg[a])]][r0 : r0 + (b - a)]
            # A source deleted under a reader that opened this index earlier (a compaction) reads
            # as the fill value: NaN, which readers refuse (store.require_finite), not zeros.
            f.create_virtual_dataset("features", layout, fillvalue=np.nan)
        else:
            f.create_dataset("features", shape=(0, d), dtype=np.dtype(c.dtype))
        _packed(f, "content_hash", np.array(c.content_hash, dtype="S32"), compress=False)
        _packed_str(f, "paths", c.paths)
        _packed(f, "labels", np.asarray(c.labels, dtype=np.int32))
        _str_ds(f, "class_names", c.class_names)
        if c.attributes:
            _write_attributes(f.create_group("attributes"), c.attributes)
        g = f.create_group("duplicates")
        _str_ds(g, "path", [p for p, _ in c.duplicates])
        g.create_dataset("content_hash", data=np.array([h for _, h in c.duplicates], dtype="S32"))
        g = f.create_group("skipped")
        _str_ds(g, "path", [p for p, _ in c.skipped])
        _str_ds(g, "reason", [r for _, r in c.skipped])
        g = f.create_group("rejected")
        g.create_dataset("content_hash", data=np.array([h for h, _, _ in c.rejected], dtype="S32"))
        _str_ds(g, "reason", [r for _, r, _ in c.rejected])
        _str_ds(g, "limits", [lim for _, _, lim in c.rejected])
        g = f.create_group("segments")
        _str_ds(g, "name", used)
        g.create_dataset("rows", data=np.array([c.segment_rows[s] for s in used], dtype=np.int64))
        g = f.create_group("location")
        _packed(g, "segment", loc_seg)
        _packed(g, "row", loc_row)
        g = f.create_group("stat")
        _packed_str(g, "path", c.stat.path)
        for k in ("size", "mtime_ns", "inode", "device"):
            _packed(g, k, np.array(getattr(c.stat, k), dtype=np.int64))
        _packed(g, "content_hash", np.array(c.stat.content_hash, dtype="S32"), compress=False)
        attrs = dict(c.attrs)
        attrs.update(schema_version=SCHEMA_VERSION, n_rows=n, feature_dim=d, dtype=c.dtype, segment_dir=folder)
        _set_attrs(f, attrs)

    hint = n * (200 + 12) + len(c.stat.path) * 150 + (1 << 20)
    written = _write_h5_atomically(path, fill, hint, "index")
    crash_point("index-replaced")
    return written


def _write_attributes(g: h5py.Group, columns: dict[str, Column]) -> None:
    # Group members are listed in name order; the manifest's column order is an attribute.
    g.attrs["columns"] = json.dumps(list(columns), ensure_ascii=False)
    for name, col in columns.items():
        a = g.create_group(name)
        _packed(a, "labels", np.asarray(col.labels, dtype=np.int32))
        _str_ds(a, "class_names", col.values)


DIGEST_ATTR = "contents_digest"
# Attributes that describe the run rather than the contents: a re-run that changes nothing
# else leaves the index as it is (its ``updated`` and ``config`` are those of the last change).
_RUN_ATTRS = frozenset({"created", "updated", "config", "headstart_version", "torch_version", DIGEST_ATTR})


def contents_digest(c: IndexContents) -> str:
    """blake2b of everything the index would hold but the run's own attributes: equal digests,
    equal index. A few milliseconds per 10,000 rows, far less than writing the index."""
    h = hashlib.blake2b(digest_size=16)

    def strings(values: list[str]) -> None:
        h.update("\0".join(values).encode("utf-8", "surrogateescape"))
        h.update(b"\1")

    names = list(dict.fromkeys(s for s, _ in c.location))
    seg_id = {s: i for i, s in enumerate(names)}
    strings(c.content_hash)
    strings(c.paths)
    h.update(np.asarray(c.labels, dtype=np.int32).tobytes())
    strings(c.class_names)
    for name, col in c.attributes.items():
        strings([name, *col.values])
        h.update(np.asarray(col.labels, dtype=np.int32).tobytes())
    strings(names)
    h.update(np.array([seg_id[s] for s, _ in c.location], dtype=np.int64).tobytes())
    h.update(np.array([r for _, r in c.location], dtype=np.int64).tobytes())
    h.update(np.array([c.segment_rows[s] for s in names], dtype=np.int64).tobytes())
    for pairs in (c.duplicates, c.skipped):
        strings([a for a, _ in pairs])
        strings([b for _, b in pairs])
    strings([f"{a}\0{b}\0{lim}" for a, b, lim in c.rejected])
    t = c.stat
    strings(t.path)
    strings(t.content_hash)
    h.update(np.array([t.size, t.mtime_ns, t.inode, t.device], dtype=np.int64).tobytes())
    kept = {k: v for k, v in c.attrs.items() if k not in _RUN_ATTRS}
    h.update(json.dumps([kept, c.dtype, c.feature_dim], sort_keys=True, default=str).encode())
    return h.hexdigest()


def _committed_digest(path: Path) -> str | None:
    try:
        with h5py.File(path, "r") as f:
            v = f.attrs.get(DIGEST_ATTR)
    except (OSError, KeyError):
        return None
    return v.decode() if isinstance(v, bytes) else (str(v) if v is not None else None)


def commit(path: Path, c: IndexContents) -> int:
    """Write the index, then delete the segment files it no longer uses. Returns bytes written:
    0 when the index already holds exactly these contents (an unchanged re-run writes nothing)."""
    digest = contents_digest(c)
    written = 0
    if _committed_digest(path) != digest:
        written = write_index(path, IndexContents(**{**vars(c), "attrs": {**c.attrs, DIGEST_ATTR: digest}}))
    remove_unindexed_segments(path, {s for s, _ in c.location})
    return written


def migrate_v1(path: Path) -> None:
    """Convert a schema-v1 cache (release 0.1.0: the features inside the file) in place: its
    rows become one segment, the file becomes an index. Under the writer lock. A kill between
    the two steps leaves the v1 file plus a segment the next run adopts."""
    with Cache(path) as c:
        if c.schema_version != 1:
            return
        old = c.read_all()
    fp = {k: old.attrs[k] for k in FINGERPRINT_KEYS if k in old.attrs}
    seg = write_segment(path, fp, old.content_hash, old.features)
    crash_point("migrate-segment-written")
    commit(
        path,
        IndexContents(
            content_hash=old.content_hash,
            paths=old.paths,
            labels=old.labels,
            class_names=old.class_names,
            attrs=old.attrs,
            location=[(seg.name, i) for i in range(seg.n_rows)],
            segment_rows={seg.name: seg.n_rows},
            dtype=str(old.features.dtype),
            feature_dim=int(old.features.shape[1]),
            duplicates=old.duplicates,
            skipped=old.skipped,
        ),
    )
