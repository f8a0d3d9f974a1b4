"""Compaction (``headstart cache compact``): reclaim the bytes of deleted photos' rows; and the
explicit conversion of a release-0.1.0 cache (``headstart cache migrate``). No torch here.

A deleted photo's row drops out of the index at the next commit, but its bytes stay in the
segment that holds it, since a segment is never rewritten. Compaction copies the *live* rows
of the segments with many dead ones into new segments, writes a new index that points at
them, and only then deletes the old files. Every step is one of the store's crash-safe
primitives (see ``store.py``), so a kill -9 at any instant leaves a valid cache:

* before the new index is in place: the old index and all its segments are untouched; the
  new segments are unindexed and hold nothing the index lacks, so the next compaction or
  commit deletes them;
* after it: the old segments are unindexed, and the new index names them in its
  ``superseded_segments`` attribute, so the re-run deletes them (an ``extract`` commit
  deletes every unindexed segment anyway).

Unindexed segments that hold content the index lacks are a killed ``extract``'s work: they
are left for the next ``extract`` to adopt.

Which segments: those whose dead share is at least ``min_dead_share`` (default
:data:`SEGMENT_DEAD_SHARE`, 25 %). Rewriting a segment with dead share s copies (1 - s) / s
live rows per reclaimed row, so at 25 % at most 3; after a compaction every segment is under
25 % dead, and so is the whole cache. ``extract`` compacts on its own when the cache's dead
share exceeds :data:`AUTO_DEAD_SHARE` (25 %): a catalog whose photos are deleted at a steady
rate then spends at most about 3 rows of copying per deleted row, and never holds more than
about a third more bytes than its live rows need. Scattered deletions are no reason of their
own: the index maps each segment once (per 64 runs of live rows) whatever rows of it are live
(``index._create_features``), so a run of live rows costs it bytes, not a mapping.

Memory: the index's per-row metadata (as every commit needs) plus one segment of rows being
copied and one block being read; never the catalog's features.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from ..core.atomic import fsync_dir
from ..errors import CacheError
from ..models.fingerprint import KEYS as FINGERPRINT_KEYS
from .h5io import crash_point, segment_dir
from .index import IndexContents, RowLocations, migrate_v1, write_index
from .lock import writer_lock
from .segments import configured_segment_rows, remove_stale_temporaries, unindexed_segments, write_segment
from .store import Cache

AUTO_DEAD_SHARE = 0.25  # extract compacts when more than this share of the segments' rows is dead
SEGMENT_DEAD_SHARE = 0.25  # a segment is rewritten when at least this share of its rows is dead
SUPERSEDED = "superseded_segments"  # index attribute: JSON list of the segments it replaced
_READ_ROWS = 8192  # rows read from an old segment at a time (its chunks are 512 rows)


@dataclass(frozen=True)
class CompactResult:
    """What one compaction did (``line()`` is what the CLI prints)."""

    path: Path
    rows: int  # live rows, unchanged by compaction
    dead_before: int
    dead_after: int
    segments_rewritten: int
    segments_written: int
    rows_copied: int
    orphans_removed: int  # unindexed segments a killed compaction left
    bytes_before: int
    bytes_after: int
    seconds: float

    @property
    def reclaimed_rows(self) -> int:
        return self.dead_before - self.dead_after

    @property
    def reclaimed_bytes(self) -> int:
        return self.bytes_before - self.bytes_after

    def line(self) -> str:
        if not self.segments_rewritten and not self.orphans_removed:
            left = f"; {self.dead_after} dead row(s) left in segments under the threshold" if self.dead_after else ""
            return f"{self.path}: nothing to compact ({self.rows} rows{left})"
        left = f", {self.dead_after} dead row(s) left in segments under the threshold" if self.dead_after else ""
        orphans = f", removed {self.orphans_removed} leftover segment(s)" if self.orphans_removed else ""
        return (
            f"{self.path}: compacted: reclaimed {self.reclaimed_rows} dead row(s) and {_size(self.reclaimed_bytes)} "
            f"({_size(self.bytes_before)} -> {_size(self.bytes_after)}); copied {self.rows_copied} live row(s) "
            f"from {self.segments_rewritten} segment(s) into {self.segments_written}{orphans}{left} "
            f"in {self.seconds:.1f} s"
        )


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def dead_rows(path: str | Path) -> tuple[int, int]:
    """(dead rows, all rows) in the segments the index uses: read from the index only."""
    with Cache(path) as c:
        return _dead_rows(c)


def _dead_rows(c: Cache) -> tuple[int, int]:
    if c.schema_version < 2:
        return 0, c.n_rows
    total = sum(c.segment_rows.values())
    return total - c.n_rows, total


def mappings(path: str | Path) -> int:
    """How many mappings the index's virtual ``/features`` has, as HDF5 reads them: one per
    segment (per block of index rows from one segment, :func:`index.mapping_blocks`, and per
    ``index.RUNS_PER_MAPPING`` runs of rows) in indexes written since commit ``e88743b``, one
    per run of consecutive rows in older ones; 0 for schema v1 or an empty cache."""
    with Cache(path, features=False) as c:
        if c.schema_version < 2:
            return 0
    with h5py.File(path, "r") as f:
        ds = f["features"]
        return int(ds.id.get_create_plist().get_virtual_count()) if ds.is_virtual else 0


def compact(
    path: str | Path,
    *,
    min_dead_share: float = SEGMENT_DEAD_SHARE,
    lock_held: bool = False,
    segment_rows: int | None = None,
) -> CompactResult:
    """Rewrite the segments of ``path`` whose dead share is at least ``min_dead_share`` (0:
    every segment with a dead row) under the writer lock; ``lock_held``: the caller holds it.
    New segments hold ``segment_rows`` rows (default: extract's, ``HEADSTART_COMMIT_ROWS``)."""
    path = Path(path)
    if segment_rows is None:
        segment_rows = configured_segment_rows()
    if not 0.0 <= min_dead_share <= 1.0:
        raise CacheError(f"--min-dead-share must be between 0 and 1, not {min_dead_share}")
    Cache(path).close()  # a missing or foreign file is an Error before any lock file is made
    if lock_held:
        return _compact(path, min_dead_share, segment_rows)
    with writer_lock(path):
        return _compact(path, min_dead_share, segment_rows)


def compact_if_needed(
    path: str | Path,
    *,
    threshold: float = AUTO_DEAD_SHARE,
    lock_held: bool = False,
    say: Callable[[str], None] | None = None,
    index: IndexContents | None = None,
) -> CompactResult | None:
    """Compact when more than ``threshold`` of the rows in the cache's segments are dead (what
    ``extract`` calls after its commit, under its lock). ``say`` gets the summary line
    (default: standard error, beside extract's own output). None when below the threshold.
    ``index``: what the caller just committed to ``path``, so the figures need no new open of
    the index (an unchanged re-run of a large catalog spent about 2 us a file here)."""
    if index is not None:
        total = sum(index.segment_rows.values())
        dead = total - len(index.location)
    else:
        with Cache(path, features=False) as c:  # every figure below is the index's metadata
            dead, total = _dead_rows(c)
    # Only the dead share: scattered deletions once made every run of live rows a mapping of the
    # virtual /features (about 7 KB per reader and 0.6 ms per commit each; 105,000 at 1M rows,
    # 30 % deleted evenly), and extract compacted them early. Now a segment is one mapping per
    # 64 runs whatever is deleted, and a run inside one costs bytes (docs/benchmarks.md).
    if not total or dead / total <= threshold:
        return None
    result = compact(path, lock_held=lock_held)
    (say or _stderr)(result.line())
    return result


def migrate(path: str | Path) -> str:
    """``headstart cache migrate``: convert a schema-v1 cache (release 0.1.0) to v2 under the
    writer lock (``extract`` does the same on its next run). Returns what was done."""
    path = Path(path)
    with Cache(path) as c:  # a missing or foreign file is an Error before any lock file is made
        version = c.schema_version
    if version >= 2:
        return f"{path}: already schema v{version}; nothing to do"
    with writer_lock(path):
        remove_stale_temporaries(path)
        with Cache(path) as c:
            n, version = c.n_rows, c.schema_version
        if version >= 2:  # converted by another writer meanwhile
            return f"{path}: already schema v{version}; nothing to do"
        migrate_v1(path)
    with Cache(path) as c:
        return (
            f"{path}: converted from schema v1 to v{c.schema_version}: {n} rows moved into {len(c.segments)} "
            f"segment(s) in {segment_dir(path).name}/; keep the two together"
        )


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _disk_bytes(path: Path) -> int:
    folder = segment_dir(path)
    segs = sum(p.stat().st_size for p in folder.glob("seg-*.h5")) if folder.is_dir() else 0
    return path.stat().st_size + segs


def _compact(path: Path, min_dead_share: float, segment_rows: int) -> CompactResult:
    t0 = time.perf_counter()
    remove_stale_temporaries(path)  # under the lock: no live writer owns one
    with Cache(path, features=False) as c:  # the segments are read directly, never /features
        if c.schema_version < 2:
            raise CacheError(
                f"{path} is in schema v{c.schema_version} (one file, nothing to compact); "
                f"convert it first with `headstart cache migrate {path}`"
            )
        contents = _read_index(c)
    bytes_before = _disk_bytes(path)
    loc = contents.location
    assert isinstance(loc, RowLocations)  # _read_index's form
    live = Counter(dict(zip(loc.names, np.bincount(loc.seg, minlength=len(loc.names)).tolist(), strict=True)))
    total = contents.segment_rows
    dead_before = sum(total.values()) - len(contents.location)
    chosen = [s for s, n in total.items() if n > live[s] and (n - live[s]) / n >= min_dead_share]
    # Leftovers of a killed compaction: the segments an earlier compaction's index superseded
    # (it names them, so they are told apart from a killed extract's segments, which hold new
    # content and are kept for the next extract to adopt), and new segments whose index was
    # never written (every row already in the index, no skip records).
    candidates = unindexed_segments(path, set(total))
    # Every key (as stored: bytes), only when needed.
    keys = set(np.asarray(contents.content_hash, dtype="S32").tolist()) if candidates else set()
    superseded = json.loads(str(contents.attrs.get(SUPERSEDED, "[]")))
    orphans = [
        s.name
        for s in candidates
        if s.name in superseded or (not s.bad and keys.issuperset(h.encode() for h in s.content_hash))
    ]
    del keys

    written: list[str] = []
    if chosen:
        record = {k: contents.attrs[k] for k in FINGERPRINT_KEYS if k in contents.attrs}
        new_location, new_rows = _copy_live_rows(path, contents, chosen, record, segment_rows)
        written = list(new_rows)
        seg_rows = {s: n for s, n in total.items() if s not in chosen}
        seg_rows.update(new_rows)
        contents.location, contents.segment_rows = new_location, seg_rows
        contents.attrs[SUPERSEDED] = json.dumps(chosen)  # deleted next, or by a re-run if killed first
        write_index(path, contents)  # from here on the new segments are the cache's
    folder = segment_dir(path)
    for name in [*chosen, *orphans]:
        (folder / name).unlink(missing_ok=True)
        crash_point("compact-removing")
    fsync_dir(folder)
    dead_after = sum(contents.segment_rows.values()) - len(contents.location)
    return CompactResult(
        path=path,
        rows=len(contents.location),
        dead_before=dead_before,
        dead_after=dead_after,
        segments_rewritten=len(chosen),
        segments_written=len(written),
        rows_copied=sum(live[s] for s in chosen),
        orphans_removed=len(orphans),
        bytes_before=bytes_before,
        bytes_after=_disk_bytes(path),
        seconds=time.perf_counter() - t0,
    )


def _read_index(c: Cache) -> IndexContents:
    """Everything the index holds, to be written back with new locations. Every field of
    ``IndexContents`` must be carried over (tests/test_cache_tools.py compares every dataset of
    the index before and after a compaction). Locations and the stat cache stay arrays as
    stored (no Python object per row: memory per row is what grows with the catalog here)."""
    seg, row = c.location_arrays()
    return IndexContents(
        content_hash=c.stored("content_hash"),  # as stored: 32 bytes a row, not a str object each
        paths=c.stored("paths"),
        labels=c.labels,
        class_names=c.class_names,
        attrs=c.attrs,
        location=RowLocations(c.segments, seg, row),
        segment_rows=c.segment_rows,
        dtype=c.dtype,
        feature_dim=c.feature_dim,
        duplicates=c.duplicates,
        skipped=c.skipped,
        rejected=[(h, why, limits) for h, (why, limits) in c.rejected.items()],
        stat=c.stat_table(),
        attributes=c.attributes(),
    )


def _copy_live_rows(
    path: Path, c: IndexContents, chosen: list[str], record: dict[str, object], segment_rows: int
) -> tuple[RowLocations, dict[str, int]]:
    """Copy the live rows of ``chosen`` into new segments of ``segment_rows`` rows (the last one
    fewer). Returns every index row's new location and the new segments' row counts. The
    index's row order is kept; only where the rows live changes. Arrays throughout: the index
    rows of each segment come from one stable sort of the segment column."""
    loc = c.location
    assert isinstance(loc, RowLocations)
    names = list(loc.names)
    seg0 = np.asarray(loc.seg, dtype=np.int64)
    seg, row = seg0.copy(), np.asarray(loc.row, dtype=np.int64).copy()
    by_seg = np.argsort(seg0, kind="stable")
    bounds = np.searchsorted(seg0[by_seg], np.arange(len(names) + 1))
    new_rows: dict[str, int] = {}
    hashes = np.asarray(c.content_hash, dtype="S32")  # as stored (_read_index): no copy
    pos: list[np.ndarray] = []  # index rows waiting in ``feats``, in order
    feats: list[np.ndarray] = []

    def flush(n: int) -> None:
        waiting, block = np.concatenate(pos), np.concatenate(feats)
        take = waiting[:n]
        seg_info = write_segment(path, record, hashes[take].astype(str).tolist(), block[:n])
        crash_point("compact-segment-written")
        seg[take] = len(names)
        row[take] = np.arange(n, dtype=np.int64)
        names.append(seg_info.name)
        new_rows[seg_info.name] = seg_info.n_rows
        pos[:] = [waiting[n:]]
        feats[:] = [block[n:].copy()]  # not a view: the concatenated block is freed

    for name in chosen:
        k = loc.names.index(name)
        idx = by_seg[bounds[k] : bounds[k + 1]]
        idx = idx[np.argsort(row[idx], kind="stable")]  # by row in the segment: read in order
        for block_idx, block in _live_blocks(path, c, name, idx, row[idx]):
            pos.append(block_idx)
            feats.append(block)
            while sum(map(len, pos)) >= segment_rows:
                flush(segment_rows)
    if sum(map(len, pos)):
        flush(sum(map(len, pos)))
    return RowLocations(names, seg, row), new_rows


def _live_blocks(
    path: Path, c: IndexContents, name: str, idx: np.ndarray, src: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The features of index rows ``idx``, rows ``src`` (ascending) of segment ``name``, read a
    block of ``_READ_ROWS`` at a time (blocks without a live row are not read), after checking
    that each segment row holds the content the index says."""
    keys = np.asarray(c.content_hash, dtype="S32")  # the index's, as stored (_read_index): no copy
    try:
        with h5py.File(segment_dir(path) / name, "r") as f:
            ds, hashes = f["features"], f["content_hash"]
            if str(ds.dtype) != c.dtype or ds.shape[1] != c.feature_dim:
                raise CacheError(
                    f"segment {name} holds {ds.dtype} [{ds.shape[1]}] rows but {path} is {c.dtype} "
                    f"[{c.feature_dim}]; nothing was changed. Run `headstart cache verify {path}`"
                )
            for a in range(0, int(ds.shape[0]), _READ_ROWS):
                lo, hi = (int(x) for x in np.searchsorted(src, [a, a + _READ_ROWS]))
                if lo == hi:
                    continue
                block = ds[a : a + _READ_ROWS]  # decoding checks every chunk's checksum
                held = hashes[a : a + _READ_ROWS][src[lo:hi] - a]
                want = keys[idx[lo:hi]]
                wrong = np.flatnonzero(held != want)
                if len(wrong):
                    i, r = int(idx[lo + wrong[0]]), int(src[lo + wrong[0]])
                    raise CacheError(
                        f"{path}: row {i} points at row {r} of segment {name}, which holds other "
                        f"content; nothing was changed. Run `headstart cache verify {path}`"
                    )
                yield idx[lo:hi], block[src[lo:hi] - a]
    except (OSError, KeyError) as e:
        raise CacheError(
            f"cannot read segment {name} of {path} ({e}): it is damaged; nothing was changed. "
            f"Run `headstart cache verify {path}`, then extract again with --rebuild"
        ) from None
