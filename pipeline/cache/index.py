"""The cache index: the small HDF5 file that maps segments as one ``/features`` (``store.py``).

Written whole and replaced atomically by every commit; it holds per-row metadata and the stat
cache, never feature bytes. Also the conversion of a schema-v1 cache. No torch here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from operator import itemgetter
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..models.fingerprint import KEYS as FINGERPRINT_KEYS
from .h5io import (
    INDEX_IN_MEMORY_LIMIT,
    ROW_CHUNK,
    SCHEMA_VERSION,
    Column,
    RowColumn,
    StatTable,
    _packed,
    _set_attrs,
    _str_ds,
    _write_h5_atomically,
    crash_point,
    segment_dir,
)
from .segments import configured_segment_rows, remove_unindexed_segments, write_segment
from .store import Cache


@dataclass(frozen=True)
class RowLocations:
    """Every row's (segment, row in it) as arrays, for a caller that has them: no Python tuple
    per row to build, hold and convert (``bench/store_scale.py``). Iterates as the
    ``(segment name, row)`` pairs of the list form."""

    names: list[str]  # segment names; ``seg`` indexes them
    seg: np.ndarray  # per row, int
    row: np.ndarray  # per row, int

    def __len__(self) -> int:
        return len(self.seg)

    def __iter__(self) -> Iterator[tuple[str, int]]:
        return zip(map(self.names.__getitem__, self.seg.tolist()), self.row.tolist(), strict=True)


@dataclass
class IndexContents:
    """Everything an index file holds; the feature bytes stay in the segments it names."""

    content_hash: list[str] | np.ndarray  # str, or bytes as stored (compaction writes them back)
    paths: list[str] | np.ndarray
    labels: np.ndarray
    class_names: list[str]
    attrs: dict[str, Any]
    location: list[tuple[str, int]] | RowLocations  # per row: (segment name, row in it)
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
    """Start and end of every run of index rows that are consecutive rows of one segment. Each
    run is one block of a mapping's source selection (indexes written before one mapping per
    segment had one mapping per run)."""
    return _bounds(seg, row, runs=True)


def mapping_blocks(seg: np.ndarray, row: np.ndarray) -> tuple[list[int], list[int]]:
    """Start and end of every block of index rows that come from one segment in ascending row
    order: each block is one mapping of the virtual ``/features`` (what a commit writes and a
    reader holds), or one per ``RUNS_PER_MAPPING`` of its runs. Rows are in storage order, so
    normally one block per segment, whatever rows were deleted."""
    return _bounds(seg, row, runs=False)


def _bounds(seg: np.ndarray, row: np.ndarray, *, runs: bool) -> tuple[list[int], list[int]]:
    """Where a run (``runs``: the next row is not the segment row after) or a block (the next
    row is not further on in the same segment) starts and ends. A chunk of rows at a time: the
    differences of every row at once were 14 bytes a row of a commit's memory."""
    n = len(seg)
    if not n:
        return [], []
    found = []
    for a in range(0, n - 1, ROW_CHUNK):
        s, r = seg[a : a + ROW_CHUNK + 1], np.diff(row[a : a + ROW_CHUNK + 1])
        found.append(np.flatnonzero((s[1:] != s[:-1]) | ((r != 1) if runs else (r <= 0))) + (a + 1))
    brk = np.concatenate(found) if found else np.zeros(0, dtype=np.int64)
    return [0, *brk.tolist()], [*brk.tolist(), n]


@dataclass(frozen=True)
class _Rows:
    """The per-row datasets of an index, as they are written: built once per commit for both
    the digest and the write. The columns are converted a chunk of rows at a time
    (:class:`RowColumn`), so a commit's memory beyond what the caller holds is the row
    locations, 12 bytes a row, plus one chunk; not the 314 bytes a row of every column at once.
    Every commit rewrites every row's metadata, so this is numpy work, not a Python step per
    row (5 us a row, 5 s per million rows, before)."""

    content_hash: RowColumn  # S32
    paths: RowColumn  # fixed-width UTF-8
    used: list[str]  # the segments the rows use, in first-use order
    loc_seg: np.ndarray  # int32, index into ``used``
    loc_row: np.ndarray  # int64
    stat_path: RowColumn  # fixed-width UTF-8
    stat_ints: dict[str, RowColumn]  # size, mtime_ns, inode, device: int64
    stat_hash: RowColumn  # S32


_STAT_INTS = ("size", "mtime_ns", "inode", "device")


def location_arrays(location: list[tuple[str, int]] | RowLocations) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(segments used, in first-use order; each row's index into them; its row there)."""
    n = len(location)
    if isinstance(location, RowLocations):
        seg = np.asarray(location.seg)
        first = np.full(len(location.names), n, dtype=np.int64)  # each segment's first row
        for a in range(0, n, ROW_CHUNK):  # a chunk at a time: no sorted copy of every row
            ids, at = np.unique(seg[a : a + ROW_CHUNK], return_index=True)
            first[ids] = np.minimum(first[ids], at + a)
        used = np.flatnonzero(first < n)
        order = used[np.argsort(first[used], kind="stable")]  # first-use order, as for the list form
        renumber = np.zeros(len(location.names), dtype=np.int32)
        renumber[order] = np.arange(len(order), dtype=np.int32)
        if np.array_equal(order, np.arange(len(location.names))):  # every segment, in order: as it is
            ids32 = seg.astype(np.int32, copy=False)
        else:
            ids32 = np.empty(n, dtype=np.int32)
            for a in range(0, n, ROW_CHUNK):
                ids32[a : a + ROW_CHUNK] = renumber[seg[a : a + ROW_CHUNK]]
        return [location.names[i] for i in order.tolist()], ids32, np.asarray(location.row, dtype=np.int64)
    seg_names = list(map(itemgetter(0), location))  # C-level loops: no Python code per row
    used_names = list(dict.fromkeys(seg_names))
    seg_id = {s: i for i, s in enumerate(used_names)}
    return (
        used_names,
        np.fromiter(map(seg_id.__getitem__, seg_names), dtype=np.int32, count=n),
        np.fromiter(map(itemgetter(1), location), dtype=np.int64, count=n),
    )


def _rows(c: IndexContents) -> _Rows:
    used, loc_seg, loc_row = location_arrays(c.location)
    return _Rows(
        content_hash=RowColumn(c.content_hash, np.dtype("S32")),
        paths=RowColumn.strings(c.paths),
        used=used,
        loc_seg=loc_seg,
        loc_row=loc_row,
        stat_path=RowColumn.strings(c.stat.path),
        stat_ints={k: RowColumn(getattr(c.stat, k), np.dtype(np.int64)) for k in _STAT_INTS},
        stat_hash=RowColumn(c.stat.content_hash, np.dtype("S32")),
    )


# Runs of rows one mapping's source selection holds at most. HDF5 decodes an irregular
# hyperslab block by block, each OR-ed into the selection so far: quadratic in its runs (a
# segment of 2,048 runs took 48 ms to open, 123 of them 5.9 s). 64 keeps opening near its
# minimum and the mappings about 1 per 64 runs (docs/benchmarks.md).
RUNS_PER_MAPPING = 64


def _create_features(f: h5py.File, c: IndexContents, r: _Rows, folder: str) -> None:
    """``/features`` as a virtual dataset with one mapping per block (:func:`mapping_blocks`),
    or per ``RUNS_PER_MAPPING`` runs of a block with more: on the virtual side its rows, a
    regular hyperslab; on the source side the union of its runs of segment rows, an irregular
    one (HDF5 maps the two selections element by element, in order, and needs only equal
    counts). Why not one mapping per run, as h5py's ``VirtualLayout`` (regular slices only)
    writes it: HDF5 holds about 7 KB per mapping for every reader that opens ``/features`` and
    a commit spends about 0.3-0.6 ms writing one, so scattered deletions (100,000 runs at 1 M
    rows) cost 724 MB per reader and a 31-70 s commit; a run inside a mapping costs bytes."""
    n, d, dt = len(r.loc_seg), c.feature_dim, np.dtype(c.dtype)
    seg, row = r.loc_seg, r.loc_row
    run_a, run_b = mapping_runs(seg, row)
    starts = row[run_a].tolist()
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.VIRTUAL)
    # A source deleted under a reader that opened this index earlier (a compaction) reads as the
    # fill value: NaN, which readers refuse (store.require_finite), not zeros.
    dcpl.set_fill_value(np.array([np.nan], dtype=dt))
    vspace = h5py.h5s.create_simple((n, d))
    k = 0  # the next run
    for _, b in zip(*mapping_blocks(seg, row), strict=True):  # a block is whole runs
        name = r.used[int(seg[run_a[k]])]
        while k < len(run_a) and run_a[k] < b:  # one mapping per RUNS_PER_MAPPING runs
            a, src, op = run_a[k], h5py.h5s.create_simple((c.segment_rows[name], d)), h5py.h5s.SELECT_SET
            for _ in range(RUNS_PER_MAPPING):
                src.select_hyperslab((starts[k], 0), (run_b[k] - run_a[k], d), op=op)
                op, k = h5py.h5s.SELECT_OR, k + 1
                if k == len(run_a) or run_a[k] >= b:
                    break
            vspace.select_hyperslab((a, 0), (run_b[k - 1] - a, d))
            dcpl.set_virtual(vspace, f"{folder}/{name}".encode(), b"features", src)  # both copied
    h5py.h5d.create(f.id, b"features", h5py.h5t.py_create(dt, logical=True), h5py.h5s.create_simple((n, d)), dcpl=dcpl)


def write_index(path: Path, c: IndexContents, rows: _Rows | None = None) -> int:
    """Replace the index atomically: readers see the old one or the new one. Its cost is the
    per-row metadata; no feature byte is copied. Returns the bytes written. ``rows``: the
    arrays of ``c`` when the caller already has them (:func:`commit`)."""
    n, d = len(c.content_hash), c.feature_dim
    r = _rows(c) if rows is None else rows
    used, loc_seg, loc_row = r.used, r.loc_seg, r.loc_row
    folder = segment_dir(path).name

    def fill(f: h5py.File) -> None:
        if n:
            _create_features(f, c, r, folder)
        else:
            f.create_dataset("features", shape=(0, d), dtype=np.dtype(c.dtype))
        r.content_hash.write(f, "content_hash", compress=False)
        r.paths.write(f, "paths")
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
        r.stat_path.write(g, "path")
        for k in _STAT_INTS:
            r.stat_ints[k].write(g, k)
        r.stat_hash.write(g, "content_hash", compress=False)
        attrs = dict(c.attrs)
        attrs.update(schema_version=SCHEMA_VERSION, n_rows=n, feature_dim=d, dtype=c.dtype, segment_dir=folder)
        _set_attrs(f, attrs)

    # The stored bytes before compression: an upper bound for the free-space check, and what
    # decides whether the file is built in memory first (h5io.INDEX_IN_MEMORY_LIMIT).
    hint = n * (32 + 4 + 12 + r.paths.dtype.itemsize) + len(r.stat_path) * (64 + r.stat_path.dtype.itemsize) + (1 << 20)
    written = _write_h5_atomically(path, fill, hint, "index", in_memory_limit=INDEX_IN_MEMORY_LIMIT)
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


def contents_digest(c: IndexContents, rows: _Rows | None = None) -> str:
    """SHA-256 of everything the index would hold but the run's own attributes: equal digests,
    equal index. Per row it hashes the arrays that are written (``rows``, built if not given),
    about 160 bytes. SHA-256 rather than blake2b: CPUs with SHA instructions (AMD Zen, Intel
    since Ice Lake, ARMv8) run it 2-3x faster (718 vs 266 MB/s on the EPYC here), and this is
    a large part of a commit."""
    h = hashlib.sha256()
    r = _rows(c) if rows is None else rows

    def strings(values: list[str]) -> None:
        h.update("\0".join(values).encode("utf-8", "surrogateescape"))
        h.update(b"\1")

    def array(a: np.ndarray) -> None:  # its type and length too: fields cannot run together
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)

    names = r.used
    r.content_hash.digest_into(h)
    r.paths.digest_into(h)
    h.update(np.asarray(c.labels, dtype=np.int32).tobytes())
    strings(c.class_names)
    for name, col in c.attributes.items():
        strings([name, *col.values])
        h.update(np.asarray(col.labels, dtype=np.int32).tobytes())
    strings(names)
    array(r.loc_seg)
    array(r.loc_row)
    h.update(np.array([c.segment_rows[s] for s in names], dtype=np.int64).tobytes())
    for pairs in (c.duplicates, c.skipped):
        strings([a for a, _ in pairs])
        strings([b for _, b in pairs])
    strings([f"{a}\0{b}\0{lim}" for a, b, lim in c.rejected])
    r.stat_path.digest_into(h)
    r.stat_hash.digest_into(h)
    for k in _STAT_INTS:
        r.stat_ints[k].digest_into(h)
    kept = {k: v for k, v in c.attrs.items() if k not in _RUN_ATTRS}
    h.update(json.dumps([kept, c.dtype, c.feature_dim], sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


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
    rows = _rows(c)
    digest = contents_digest(c, rows)
    written = 0
    if _committed_digest(path) != digest:
        written = write_index(path, IndexContents(**{**vars(c), "attrs": {**c.attrs, DIGEST_ATTR: digest}}), rows)
    remove_unindexed_segments(path, set(rows.used))
    return written


def migrate_v1(path: Path, segment_rows: int | None = None) -> None:
    """Convert a schema-v1 cache (release 0.1.0: the features inside the file) in place: its
    rows become segments, the file becomes an index. Under the writer lock. The features are
    read and written one segment (``segment_rows``, default extract's) at a time, so memory
    holds one segment's rows and the per-row metadata, never the file's features. A kill
    before the index is replaced leaves the v1 file intact; the segments written so far are
    deleted by the next try's commit."""
    rows = segment_rows or configured_segment_rows()
    names: list[str] = []
    counts: list[int] = []
    with Cache(path) as c:
        if c.schema_version != 1:
            return
        attrs, hashes, dtype, d = c.attrs, c.content_hash, c.dtype, c.feature_dim
        fp = {k: attrs[k] for k in FINGERPRINT_KEYS if k in attrs}
        for start, block in c.iter_features(rows, dtype=np.dtype(dtype)):
            seg = write_segment(path, fp, hashes[start : start + len(block)], block)
            names.append(seg.name)
            counts.append(seg.n_rows)
            crash_point("migrate-segment-written")
        contents = IndexContents(
            content_hash=hashes,
            paths=c.paths,
            labels=c.labels,
            class_names=c.class_names,
            attrs=attrs,
            location=RowLocations(
                names,
                np.repeat(np.arange(len(counts), dtype=np.int32), counts),
                np.concatenate([np.arange(k, dtype=np.int64) for k in counts] or [np.zeros(0, np.int64)]),
            ),
            segment_rows=dict(zip(names, counts, strict=True)),
            dtype=dtype,
            feature_dim=d,
            duplicates=c.duplicates,
            skipped=c.skipped,
        )
    commit(path, contents)
