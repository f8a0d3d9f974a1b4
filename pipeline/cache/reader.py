"""Reading feature rows straight from a cache's segment files (what :class:`.store.Cache` does).

The index's ``/features`` is an HDF5 virtual dataset, and plain h5py users read it as one. The
cache's own reader does not: HDF5 keeps every source file of a virtual dataset open once it has
read from it, each with its own chunk cache (8 MiB by default since HDF5 2.0, filled by a
stream) and metadata, until the dataset is closed. A streaming read of 1 M rows (123 segments)
peaked at 1.4 GB and 4 M rows at 7 GB (``bench/read_memory.py``, docs/benchmarks.md). Here the
index's ``/location`` (each row's segment and row in it) says where the rows are; each run
of a segment's rows is read in one call, from segment files opened without a chunk cache, and
at most :data:`OPEN_SEGMENTS` of them stay open. Memory: the rows asked for, plus one piece
(about :data:`PIECE_BYTES`) when they are converted to another dtype or are not a run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import h5py
import numpy as np

from ..errors import CacheError
from .validation import fix_hint

OPEN_SEGMENTS = 8  # segment files held open at once (about 0.6 MB each without a chunk cache)
PIECE_BYTES = 4 << 20  # about this much of a segment is read in one piece when it is converted
GAP_ROWS = 512  # rows between two wanted ones that are read and dropped rather than split at (a chunk)

Source = Callable[[int], tuple[str, h5py.Dataset]]


class SegmentFiles:
    """The segment files of one index, opened on demand, the least recently used closed beyond
    ``limit``. ``dataset(i)``: segment ``i``'s name and ``/features``."""

    def __init__(self, index: Path, folder: Path, names: list[str], limit: int = OPEN_SEGMENTS) -> None:
        self.index, self.folder, self.names, self.limit = index, folder, names, limit
        self._open: OrderedDict[int, h5py.File] = OrderedDict()
        self.opened = 0  # files opened so far (tests)

    def dataset(self, i: int) -> tuple[str, h5py.Dataset]:
        name = self.names[i]
        f = self._open.pop(i, None)
        if f is None:
            try:
                f = h5py.File(self.folder / name, "r", rdcc_nbytes=0)
            except FileNotFoundError:
                raise CacheError(
                    f"segment {name} of {self.index} was removed after the cache was opened (a compaction or "
                    "an extract replaced it); run the command again"
                ) from None
            self.opened += 1
            while len(self._open) >= self.limit:
                self._open.popitem(last=False)[1].close()
        self._open[i] = f
        ds = f.get("features")
        if not isinstance(ds, h5py.Dataset):
            raise CacheError(f"segment {name} of {self.index} has no /features dataset; {fix_hint(self.index)}")
        return name, ds

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()


def locate(
    f: h5py.File, rows: slice | np.ndarray, n_rows: int, n_segments: int | None, index: Path
) -> tuple[np.ndarray, np.ndarray]:
    """Each of index rows ``rows``' segment and row in it, from the index ``f``'s ``/location``,
    read for the rows' span only (a stream holds one chunk's locations). ``n_segments`` None:
    schema v1, whose rows are its own ``/features`` (source 0)."""
    if isinstance(rows, slice):
        lo, hi, _ = rows.indices(n_rows)
        take = None
    else:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) and (rows.min() < 0 or rows.max() >= n_rows):
            raise IndexError(f"row numbers must be in 0 .. {n_rows - 1}")
        lo, hi = (int(rows.min()), int(rows.max()) + 1) if len(rows) else (0, 0)
        take = rows - lo
    hi = max(lo, hi)
    if n_segments is None:
        seg, row = np.zeros(hi - lo, np.int64), np.arange(lo, hi, dtype=np.int64)
    else:
        seg, row = f["location/segment"][lo:hi], f["location/row"][lo:hi]
        if len(seg) and (seg.min() < 0 or seg.max() >= n_segments or row.min() < 0):
            raise CacheError(
                f"{index} is damaged: /location points outside the {n_segments} segment(s) of /segments; "
                + fix_hint(index)
            )
    return (seg, row) if take is None else (seg[take], row[take])


def read_into(out: np.ndarray, seg: np.ndarray, row: np.ndarray, source: Source, index: Path) -> None:
    """``out[i]`` = row ``row[i]`` of source ``seg[i]``'s features, for every ``i`` (any order,
    repeats allowed). Rows are read grouped by source, in ascending order, a run of wanted rows
    with gaps under :data:`GAP_ROWS` as one piece (each chunk is decoded once)."""
    n = len(seg)
    if not n:
        return
    seg, row = np.asarray(seg, np.int64), np.asarray(row, np.int64)
    step_s, step_r = np.diff(seg), np.diff(row)
    if bool(np.all((step_s > 0) | ((step_s == 0) & (step_r > 0)))):
        order = np.arange(n)  # storage order already (a stream of a cache not reordered)
    else:
        order = np.lexsort((row, seg))
        seg, row = seg[order], row[order]
        step_s, step_r = np.diff(seg), np.diff(row)
    breaks = np.flatnonzero((step_s != 0) | (step_r > GAP_ROWS)) + 1
    bounds = np.concatenate([[0], breaks, [n]]).tolist()
    for a, b in pairwise(bounds):
        name, ds = source(int(seg[a]))
        _read_group(out, ds, row[a:b], order[a:b], name, index)


def _read_group(out: np.ndarray, ds: h5py.Dataset, rows: np.ndarray, dest: np.ndarray, name: str, index: Path) -> None:
    """Rows ``rows`` (ascending) of ``ds`` into ``out[dest]``: one read straight into ``out``
    when they are a run stored as ``out`` is, else in pieces of about PIECE_BYTES cut at
    multiples of GAP_ROWS (chunk boundaries), each read as stored and then placed and converted
    by numpy (HDF5's float16 -> float32 conversion is about 3x slower than numpy's here, and a
    piece that fits the CPU's cache converts faster than a whole segment)."""
    d, k = out.shape[1], len(rows)
    if ds.ndim != 2 or ds.shape[1] != d or int(rows[-1]) >= ds.shape[0]:
        raise CacheError(
            f"{index} is damaged: /location points at row {int(rows[-1])} of segment {name}, whose /features "
            f"has shape {ds.shape} (expected [rows > {int(rows[-1])}, {d}]); {fix_hint(index)}"
        )
    lo, hi = int(rows[0]), int(rows[-1]) + 1
    run = hi - lo == k and (k == 1 or bool(np.all(np.diff(dest) == 1)))
    if run and out.dtype == ds.dtype:
        ds.read_direct(out, np.s_[lo:hi], np.s_[int(dest[0]) : int(dest[0]) + k])  # no copy
        return
    span = max(1, PIECE_BYTES // (d * ds.dtype.itemsize) // GAP_ROWS) * GAP_ROWS
    buf = np.empty((min(span, hi - lo), d), ds.dtype)
    i = 0
    while i < k:
        a = int(rows[i])
        j = i + int(np.searchsorted(rows[i:], (a // span + 1) * span, "left"))
        b = int(rows[j - 1]) + 1
        ds.read_direct(buf, np.s_[a:b], np.s_[0 : b - a])
        if run:
            out[int(dest[i]) : int(dest[i]) + j - i] = buf[: b - a]
        else:
            out[dest[i:j]] = buf[rows[i:j] - a]
        i = j
