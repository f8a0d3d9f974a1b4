"""The stat cache: (path, size, mtime_ns, inode, device) -> content hash, kept in the index.

A file whose stat equals the index's entry is not read: its hash is taken from the index. The
trade-off, as in git and rsync: a file rewritten in place with the same size and mtime is
missed until ``--rehash``. A file modified less than ``RACY_NS`` before the scan is not
remembered, since a later write within the filesystem's timestamp granularity could leave its
stat unchanged (git's "racy" rule). No torch here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
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

    def one(job: tuple[int, str | Path, StatKey]) -> Result:
        _, path, key = job
        try:
            return hash_file(path), key  # stat first: a change after it shows on the next run
        except OSError as e:
            return OSError(e.errno, e.strerror), None

    # hashlib releases the GIL on large buffers, so threads overlap the reads.
    with ThreadPoolExecutor(max_workers=8) as pool:
        hashed = pool.map(one, misses)
        bar = tqdm(hashed, total=len(misses), desc="hashing", unit="file", disable=not progress, leave=False)
        values.update(zip((i for i, _, _ in misses), bar, strict=True))
    return values


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
