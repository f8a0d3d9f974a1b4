"""The stat cache: (path, size, mtime_ns, inode, device) -> content hash, kept in the index.

A file whose stat equals the index's entry is not read: its hash is taken from the index. The
trade-off, as in git and rsync: a file rewritten in place with the same size and mtime is
missed until ``--rehash``. A file modified less than ``RACY_NS`` before the scan is not
remembered, since a later write within the filesystem's timestamp granularity could leave its
stat unchanged (git's "racy" rule). No torch here.

The check is columnar: every file's stat goes into one int64 array compared with the index's
in one numpy operation, and the index keeps its table in catalog order, so an unchanged folder
is matched path for path by one list comparison. Why: at 100,000 files a Python step per file
(a dict lookup, a tuple, a comparison) cost half as much as the ``stat`` calls themselves,
and those are the floor of an unchanged re-run (docs/benchmarks.md).
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain, compress, repeat
from operator import attrgetter

import numpy as np
from tqdm.auto import tqdm

from ..core.hashing import hash_file
from .h5io import StatTable, _decode

RACY_NS = 2_000_000_000
_KEY = attrgetter("st_size", "st_mtime_ns", "st_ino", "st_dev")
NO_STAT = -1  # a key row of a file that could not be stat-ed (or read): all four fields


@dataclass
class Remembered:
    """The index's stat cache as the next run checks against it: paths and hashes as ``str``,
    the four stat fields as one ``[n, 4]`` int64 array, a row per file."""

    paths: list[str] = field(default_factory=list)
    keys: np.ndarray = field(default_factory=lambda: np.zeros((0, 4), dtype=np.int64))
    hashes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @functools.cached_property
    def row_of(self) -> dict[str, int]:
        """Path -> row; built only when the folder is not the table's, path for path."""
        return dict(zip(self.paths, range(len(self.paths)), strict=True))

    @classmethod
    def of(cls, t: StatTable) -> Remembered:
        """From a stat table: columns as lists, or as stored (``Cache.stat_table()``:
        the strings as bytes, decoded here in one piece per column)."""
        if not len(t.path):
            return cls()
        keys = np.stack([np.asarray(getattr(t, k), dtype=np.int64) for k in ("size", "mtime_ns", "inode", "device")], 1)
        return cls(_strings(t.path), keys, _strings(t.content_hash))


def _strings(values: list[str] | np.ndarray) -> list[str]:
    return _decode(values) if isinstance(values, np.ndarray) else list(values)


@dataclass
class Checked:
    """Files in the order given: each one's content hash, or the error that kept it from being
    stat-ed or read, and its stat (``keys``, ``NO_STAT`` rows where there is none)."""

    values: list[str | OSError]
    keys: np.ndarray  # int64 [n, 4]: size, mtime_ns, inode, device


def hash_files(
    paths: Sequence[str], rels: Sequence[str], known: Remembered, *, rehash: bool, progress: bool
) -> Checked:
    """Content hash (or why it cannot be read) and stat of every file ``paths[i]`` (relative
    path ``rels[i]``). Files whose stat equals ``known``'s entry are not read (unless
    ``rehash``): their hash is the remembered one."""
    n = len(paths)
    values: list[str | OSError] = [None] * n  # type: ignore[list-item]  # every slot is filled below
    keys, failed = _stat_all(paths, values)
    rows: np.ndarray | None = None  # each file's row in ``known``; None: file i is row i (or none)
    if rehash or not len(known):
        same = np.zeros(n, dtype=bool)
    elif known.paths == rels:  # the folder as the index saw it, path for path: the common case
        same = (keys == known.keys).all(axis=1)
    else:
        rows = np.fromiter(map(known.row_of.get, rels, repeat(-1)), dtype=np.int64, count=n)
        same = (rows >= 0) & (keys == known.keys[rows]).all(axis=1)
    if failed:
        same[sorted(failed)] = False
    if rows is None and len(known) == n and same.all():  # every file unchanged, path for path
        values[:] = known.hashes
    else:
        hit = np.flatnonzero(same)
        at = hit if rows is None else rows[hit]
        for i, r in zip(hit.tolist(), at.tolist(), strict=True):
            values[i] = known.hashes[r]
    todo = np.flatnonzero(~same)
    misses = [(i, paths[i], int(keys[i, 0])) for i in todo.tolist() if i not in failed]
    for i, result in _hash_misses(misses, progress):
        values[i] = result
        if not isinstance(result, str):
            keys[i] = NO_STAT
    return Checked(values, keys)


def _stat_all(paths: Sequence[str], values: list[str | OSError]) -> tuple[np.ndarray, set[int]]:
    """Every file's stat as a ``[n, 4]`` array, and which files could not be stat-ed (their
    error put in ``values``). One C-level ``map`` over the files, each ``stat`` in this thread
    (threads did not make it faster here), a Python step per file only once one fails."""
    n = len(paths)
    try:
        flat = chain.from_iterable(map(_KEY, map(os.stat, paths)))
        return np.fromiter(flat, dtype=np.int64, count=4 * n).reshape(n, 4), set()
    except OSError:
        pass  # a file went away or cannot be stat-ed: go file by file
    keys = np.full((n, 4), NO_STAT, dtype=np.int64)
    failed: set[int] = set()
    for i, path in enumerate(paths):
        try:
            keys[i] = _KEY(os.stat(path))
        except OSError as e:
            values[i] = OSError(e.errno, e.strerror)  # plain, so it pickles across ranks
            failed.add(i)
    return keys, failed


def _hash_misses(misses: list[tuple[int, str, int]], progress: bool) -> Iterator[tuple[int, str | OSError]]:
    """``(i, content hash or why it cannot be read)`` of each ``(i, path, size)``. Stat first,
    read after: a change after the stat shows on the next run."""

    def chunk(jobs: list[tuple[int, str, int]]) -> list[str | OSError]:
        out: list[str | OSError] = []
        for _, path, _ in jobs:
            try:
                out.append(hash_file(path))
            except OSError as e:
                out.append(OSError(e.errno, e.strerror))
        return out

    # hashlib releases the GIL on large buffers, so threads overlap the reads. A task is a
    # chunk of files, not one file: a pool task costs more than hashing a small photo (100,000
    # files of 150 bytes took 5x longer one task each than in one thread).
    chunks = list(_chunks(misses))
    bar = tqdm(total=len(misses), desc="hashing", unit="file", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=8) as pool, bar:
        for jobs, results in zip(chunks, pool.map(chunk, chunks), strict=True):
            yield from zip((i for i, _, _ in jobs), results, strict=True)
            bar.update(len(jobs))


def _chunks(
    misses: list[tuple[int, str, int]], files: int = 64, size: int = 8 << 20
) -> Iterator[list[tuple[int, str, int]]]:
    """Consecutive runs of at most ``files`` files or ``size`` bytes (by their stat): enough
    work per task to hide the pool's cost, small enough that large photos still spread over
    the threads."""
    start, total = 0, 0
    for k, (_, _, nbytes) in enumerate(misses):
        total += nbytes
        if k + 1 - start >= files or total >= size:
            yield misses[start : k + 1]
            start, total = k + 1, 0
    if start < len(misses):
        yield misses[start:]


def merge(parts: Sequence[tuple[Sequence[int], Checked]], n: int) -> Checked:
    """Every rank's ``(its file indices, Checked)`` -> one :class:`Checked` of ``n`` files."""
    if len(parts) == 1 and len(parts[0][0]) == n:
        return parts[0][1]
    values: list[str | OSError] = [None] * n  # type: ignore[list-item]
    keys = np.full((n, 4), NO_STAT, dtype=np.int64)
    for idx, part in parts:
        for i, v in zip(idx, part.values, strict=True):
            values[i] = v
        keys[np.asarray(idx, dtype=np.int64)] = part.keys
    return Checked(values, keys)


def unreadable(e: OSError | str) -> str:
    """The skip reason of a file that could not be stat-ed or read (``e``: why)."""
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot read file: {e}"


def table(rels: Sequence[str], checked: Checked, scan_ns: int) -> StatTable:
    """The index's stat cache from this run's check of the files ``rels``: every file hashed,
    in catalog order (what the next run's check matches path for path), except those modified
    within ``RACY_NS`` of the scan."""
    racy = scan_ns - RACY_NS
    is_hash = np.fromiter(map(str.__instancecheck__, checked.values), dtype=bool, count=len(rels))
    keys = checked.keys
    kept = is_hash & (keys[:, 0] >= 0) & (keys[:, 1] < racy)
    if not kept.any():
        return StatTable()
    k = keys[kept]
    return StatTable(
        list(compress(rels, kept)),
        k[:, 0],
        k[:, 1],
        k[:, 2],
        k[:, 3],
        list(compress(checked.values, kept)),  # type: ignore[arg-type]
    )
