"""Segments: immutable HDF5 files of feature rows beside the cache index (see ``store.py``).

Each is written once (tmp, fsync, rename) with Fletcher-32 chunk checksums; a finished segment
the index does not name is adopted by the next run. No torch here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Container, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import BackboneError
from ..models.fingerprint import KEYS as FINGERPRINT_KEYS
from ..models.fingerprint import Fingerprint
from .h5io import SCHEMA_VERSION, _decode, _set_attrs, _str_ds, _write_h5_atomically, crash_point, segment_dir

SEGMENT_KIND = "headstart-segment"
_CHUNK_ROWS = 512  # rows per HDF5 chunk in a segment: the unit a checksum covers and a read decodes
DEFAULT_SEGMENT_ROWS = 8192  # new rows per segment file (extract's default)


def configured_segment_rows() -> int:
    """Rows per new segment: ``HEADSTART_COMMIT_ROWS`` if set, else :data:`DEFAULT_SEGMENT_ROWS`.
    The one reading of that setting, for extract, compaction and the v1 migration alike."""
    return int(os.environ.get("HEADSTART_COMMIT_ROWS", str(DEFAULT_SEGMENT_ROWS)))


_SEQ = itertools.count()


@dataclass(frozen=True)
class SegmentInfo:
    """What a segment holds, without its feature bytes."""

    name: str
    n_rows: int
    content_hash: list[str]
    bad: dict[str, str]  # content hash -> why its bytes gave no row ...
    fingerprint: dict[str, Any]
    dtype: str
    feature_dim: int
    limits: str = ""  # ... under these decode limits (see ``extract``); "" = unknown, never reused


def write_segment(
    cache_path: Path,
    fingerprint: Fingerprint | dict[str, Any],
    hashes: Sequence[str],
    features: np.ndarray,
    bad: Sequence[tuple[str, str]] = (),
    limits: str = "",
) -> SegmentInfo:
    """One new immutable segment in ``CACHE.h5.segments/``, durable once this returns.
    ``bad``: content that gave no row under the decode ``limits`` of the run."""
    record = fingerprint.to_record() if isinstance(fingerprint, Fingerprint) else dict(fingerprint)
    n, d = features.shape
    if n != len(hashes):
        raise ValueError(f"{len(hashes)} hashes for {n} feature rows")
    # Host, pid and a counter keep names unique when torchrun ranks on several machines share
    # the folder; the time first makes name order creation order.
    name = f"seg-{time.time_ns():020d}-{socket.gethostname()}-{os.getpid()}-{next(_SEQ):06d}.h5"
    path = segment_dir(cache_path) / name

    def fill(f: h5py.File) -> None:
        if n:
            f.create_dataset("features", data=features, chunks=(min(n, _CHUNK_ROWS), d), fletcher32=True)
        else:
            f.create_dataset("features", shape=(0, d), dtype=features.dtype)
        f.create_dataset("content_hash", data=np.array(list(hashes), dtype="S32"))
        g = f.create_group("skipped")
        g.create_dataset("content_hash", data=np.array([h for h, _ in bad], dtype="S32"))
        _str_ds(g, "reason", [r for _, r in bad])
        _set_attrs(
            f,
            {
                **record,
                "kind": SEGMENT_KIND,
                "schema_version": SCHEMA_VERSION,
                "n_rows": n,
                "feature_dim": d,
                "dtype": str(features.dtype),
                "limits": limits,
            },
        )

    _write_h5_atomically(path, fill, features.nbytes + (1 << 16), "segment")
    crash_point("segment-written")
    return SegmentInfo(name, n, list(hashes), dict(bad), record, str(features.dtype), d, limits)


def read_segment_info(path: Path) -> SegmentInfo:
    """A segment's keys, skips and fingerprint (not its features). OSError/KeyError if damaged."""
    with h5py.File(path, "r") as f:
        if f.attrs.get("kind") != SEGMENT_KIND:
            raise KeyError("not a headstart segment")
        attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in f.attrs.items()}
        hashes = _decode(f["content_hash"])
        g = f["skipped"]
        bad = dict(zip(_decode(g["content_hash"]), _decode(g["reason"]), strict=True))
        return SegmentInfo(
            path.name,
            int(f["features"].shape[0]),
            hashes,
            bad,
            {k: attrs[k] for k in FINGERPRINT_KEYS if k in attrs},
            str(attrs.get("dtype")),
            int(f["features"].shape[1]),
            str(attrs.get("limits", "")),
        )


def unindexed_segments(cache_path: Path, indexed: set[str]) -> list[SegmentInfo]:
    """Finished segments the index does not name: left by a killed run (or by the other ranks
    of this one). A file that cannot be read is ignored (only a bug or damage makes one)."""
    d = segment_dir(cache_path)
    if not d.is_dir():
        return []
    out = []
    for p in sorted(d.glob("seg-*.h5")):
        if p.name in indexed:
            continue
        with contextlib.suppress(OSError, KeyError, ValueError):
            out.append(read_segment_info(p))
    return out


def set_aside_damaged(cache_path: Path, indexed: set[str]) -> list[tuple[str, str]]:
    """Rename segment files outside the index that cannot be read (a disk error, a hand edit:
    a finished segment is never half-written) to ``NAME.damaged``, so no later run trips on
    them and nothing is deleted; their rows are extracted again. Under the writer lock.
    Returns (file name, why) of each."""
    d = segment_dir(cache_path)
    if not d.is_dir():
        return []
    damaged = []
    for p in sorted(d.glob("seg-*.h5")):
        if p.name in indexed:
            continue
        try:
            read_segment_info(p)
        except (OSError, KeyError, ValueError, TypeError) as e:
            os.replace(p, p.with_name(p.name + ".damaged"))
            damaged.append((p.name, f"{type(e).__name__}: {e}"))
    return damaged


def remove_unindexed_segments(cache_path: Path, keep: set[str]) -> None:
    """After a new index is in place: delete segment files it does not use (under the lock)."""
    d = segment_dir(cache_path)
    if not d.is_dir():
        return
    for p in sorted(d.glob("seg-*.h5")):
        if p.name not in keep:
            p.unlink(missing_ok=True)
            crash_point("segments-removing")


def remove_stale_temporaries(cache_path: Path) -> None:
    """Delete temporaries (``.NAME.tmp-PID``) left by writers killed mid-write. Call it only
    while holding :func:`writer_lock` and before any rank writes: then no live writer owns one."""
    for p in cache_path.parent.glob(f".{cache_path.name}.tmp-*"):
        p.unlink(missing_ok=True)
    d = segment_dir(cache_path)
    if d.is_dir():
        for p in d.glob(".seg-*.tmp-*"):
            p.unlink(missing_ok=True)


class SegmentWriter:
    """Collects new rows and writes a segment every ``rows`` rows (and on :meth:`flush`), so
    memory holds at most one segment's rows however many photos are new."""

    def __init__(
        self, cache_path: Path, fingerprint: Fingerprint, dtype: Any, feature_dim: int, rows: int, limits: str = ""
    ) -> None:
        self.cache_path, self.fp, self.rows, self.limits = cache_path, fingerprint, rows, limits
        self.dtype, self.d = np.dtype(dtype), feature_dim
        self._h: list[str] = []
        self._f: list[np.ndarray] = []
        self._bad: list[tuple[str, str]] = []
        self._written: list[tuple[str, list[str]]] = []  # per segment written: its name and keys, in row order
        self.bad: dict[str, str] = {}  # every failure of this run ...
        self.forget: set[str] = set()  # ... of which these are not remembered (not the content's fault)
        self.segments: list[SegmentInfo] = []

    @property
    def locations(self) -> dict[str, tuple[str, int]]:
        """Content hash -> (segment, row) of every row written so far, built when asked: the
        writer itself keeps a reference per row (8 bytes), not a dict entry and a tuple (about
        120 bytes a row, 120 MB per million new rows, before)."""
        return {h: (name, i) for name, keys in self._written for i, h in enumerate(keys)}

    @property
    def pending(self) -> int:
        return len(self._h) + len(self._bad)

    def add(self, hashes: Sequence[str], features: np.ndarray) -> None:
        self._h.extend(hashes)
        self._f.append(np.asarray(features, dtype=self.dtype))
        if len(self._h) >= self.rows:
            self.flush()

    def add_bad(self, content_hash: str, reason: str, *, remember: bool = True) -> None:
        """Content that gave no row. Remembered (written to the segment, so later runs do not
        decode it again under the same limits) unless the failure says nothing about the bytes,
        e.g. a file that changed while it was read."""
        self.bad[content_hash] = reason
        if remember:
            self._bad.append((content_hash, reason))
        else:
            self.forget.add(content_hash)

    def flush(self) -> None:
        if not self.pending:
            return
        feats = np.concatenate(self._f) if self._f else np.zeros((0, self.d), self.dtype)
        seg = write_segment(
            self.cache_path, self.fp, self._h, feats.reshape(len(self._h), self.d), self._bad, self.limits
        )
        self._written.append((seg.name, self._h))
        self.segments.append(_without_keys(seg))
        self._h, self._f, self._bad = [], [], []


def _without_keys(seg: SegmentInfo) -> SegmentInfo:
    """The segment without its key list (the writer keeps the caller's): bounded memory per segment."""
    return SegmentInfo(seg.name, seg.n_rows, [], seg.bad, seg.fingerprint, seg.dtype, seg.feature_dim, seg.limits)


def adopt(
    segments: list[SegmentInfo],
    fingerprint: Fingerprint,
    dtype: str,
    feature_dim: int,
    wanted: Container[str],
    location: dict[str, tuple[str, int]],
    bad: dict[str, str],
    limits: str = "",
) -> dict[str, int]:
    """Take rows (into ``location``) and skips (into ``bad``; only those recorded under the
    same decode ``limits``) of ``wanted`` content from segments outside the index: only those of
    the same fingerprint, dtype and width (others are deleted by the next commit, never mixed
    in). Returns the segments used, with their rows."""
    used: dict[str, int] = {}
    for seg in segments:
        try:
            same = not Fingerprint.from_record(seg.fingerprint, source=seg.name).diff(fingerprint)
        except BackboneError:
            same = False
        if not same or seg.dtype != dtype or seg.feature_dim != feature_dim:
            continue
        for r, h in enumerate(seg.content_hash):
            if h in wanted and h not in location:
                location[h] = (seg.name, r)
                used[seg.name] = seg.n_rows
        if not limits or seg.limits != limits:
            continue
        for h, why in seg.bad.items():
            if h in wanted and h not in location:
                bad.setdefault(h, why)
    return used
