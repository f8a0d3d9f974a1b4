"""The stat cache: (path, size, mtime_ns, inode, device) -> content hash, kept in the index.

A file whose stat equals the index's entry is not read: its hash is taken from the index. The
trade-off, as in git and rsync: a file rewritten in place with the same size and mtime is
missed until ``--rehash``. A file modified less than ``RACY_NS`` before the scan is not
remembered, since a later write within the filesystem's timestamp granularity could leave its
stat unchanged (git's "racy" rule). No torch here.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm.auto import tqdm

from ..core.hashing import hash_file
from .h5io import StatTable

RACY_NS = 2_000_000_000
StatKey = tuple[int, int, int, int]  # size, mtime_ns, inode, device
Known = Mapping[str, tuple[int, int, int, int, str]]  # rel path -> StatKey + content hash
Result = tuple[str | OSError, StatKey | None]


def hash_files(
    files: Sequence[tuple[int, str | Path, str]], known: Known, *, rehash: bool, progress: bool
) -> dict[int, Result]:
    """``{i: (content hash or why it cannot be read, stat)}`` for ``(i, path, rel)`` files.
    Files the stat cache knows unchanged are not read (unless ``rehash``)."""
    values: dict[int, Result] = {}
    misses: list[tuple[int, str | Path, StatKey]] = []
    for i, path, rel in files:  # stat in this thread: far cheaper than a task per file
        try:
            st = os.stat(path)
        except OSError as e:
            values[i] = (OSError(e.errno, e.strerror), None)  # plain, so it pickles across ranks
            continue
        key = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)
        hit = None if rehash else known.get(rel)
        if hit is not None and hit[:4] == key:
            values[i] = (hit[4], key)
        else:
            misses.append((i, path, key))

    def chunk(jobs: list[tuple[int, str | Path, StatKey]]) -> list[Result]:
        out: list[Result] = []
        for _, path, key in jobs:
            try:
                out.append((hash_file(path), key))  # stat first: a change after it shows on the next run
            except OSError as e:
                out.append((OSError(e.errno, e.strerror), None))
        return out

    # hashlib releases the GIL on large buffers, so threads overlap the reads. A task is a
    # chunk of files, not one file: a pool task costs more than hashing a small photo (100,000
    # files of 150 bytes took 5x longer one task each than in one thread).
    chunks = list(_chunks(misses))
    bar = tqdm(total=len(misses), desc="hashing", unit="file", disable=not progress, leave=False)
    with ThreadPoolExecutor(max_workers=8) as pool, bar:
        for jobs, results in zip(chunks, pool.map(chunk, chunks), strict=True):
            values.update(zip((i for i, _, _ in jobs), results, strict=True))
            bar.update(len(jobs))
    return values


def _chunks(
    misses: list[tuple[int, str | Path, StatKey]], files: int = 64, size: int = 8 << 20
) -> Iterator[list[tuple[int, str | Path, StatKey]]]:
    """Consecutive runs of at most ``files`` files or ``size`` bytes (by their stat): enough
    work per task to hide the pool's cost, small enough that large photos still spread over
    the threads."""
    start, total = 0, 0
    for k, (_, _, key) in enumerate(misses):
        total += key[0]
        if k + 1 - start >= files or total >= size:
            yield misses[start : k + 1]
            start, total = k + 1, 0
    if start < len(misses):
        yield misses[start:]


def unreadable(e: OSError | str) -> str:
    """The skip reason of a file that could not be stat-ed or read (``e``: why)."""
    if isinstance(e, OSError) and e.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return f"cannot read file: {e}"


def table(entries: Sequence[tuple[str, StatKey | None, str]], scan_ns: int) -> StatTable:
    """The index's stat cache from ``(rel, stat, content hash)`` of the files hashed this run."""
    racy = scan_ns - RACY_NS
    kept = [e for e in entries if e[1] is not None and e[1][1] < racy]
    if not kept:
        return StatTable()
    # Columns by transposing in C (zip), not six appends per file in Python.
    paths, keys, hashes = zip(*kept, strict=True)
    size, mtime_ns, inode, device = zip(*keys, strict=True)
    return StatTable(list(paths), list(size), list(mtime_ns), list(inode), list(device), list(hashes))
