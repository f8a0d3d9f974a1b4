"""The stat cache's file check (cache/statcache.py): columnar, path for path when the folder is
the table's, by lookup otherwise; a file that cannot be stat-ed is an error value, not a crash."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from pipeline.cache import statcache
from pipeline.cache.statcache import NO_STAT, Remembered, hash_files
from pipeline.core.hashing import hash_file


@pytest.fixture
def folder(tmp_path):
    hour_ago = time.time_ns() - 3600 * 10**9  # older than the racy window
    paths = []
    for i in range(6):
        p = tmp_path / f"f{i}.png"
        p.write_bytes(bytes([i]) * (100 + i))
        os.utime(p, ns=(hour_ago, hour_ago))
        paths.append(str(p))
    return paths, [os.path.basename(p) for p in paths]


def _counting(monkeypatch) -> list[str]:
    calls: list[str] = []

    def counting(path):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return hash_file(path)

    monkeypatch.setattr(statcache, "hash_file", counting)
    return calls


def _remembered(paths, rels) -> Remembered:
    first = hash_files(paths, rels, Remembered(), rehash=False, progress=False)
    return Remembered.of(statcache.table(rels, first, time.time_ns()))


def test_unchanged_files_are_not_read_in_the_tables_order_or_any_other(folder, monkeypatch):
    paths, rels = folder
    known = _remembered(paths, rels)
    assert known.paths == rels and len(known) == 6  # catalog order: the next check is path for path
    calls = _counting(monkeypatch)
    same = hash_files(paths, rels, known, rehash=False, progress=False)
    assert calls == [] and same.values == [hash_file(p) for p in paths]
    assert same.keys.shape == (6, 4) and (same.keys == known.keys).all()

    back = hash_files(paths[::-1], rels[::-1], known, rehash=False, progress=False)  # by lookup
    assert calls == [] and back.values == same.values[::-1]
    assert (back.keys == known.keys[::-1]).all()

    hash_files(paths, rels, known, rehash=True, progress=False)
    assert sorted(calls) == sorted(paths)


def test_a_changed_stat_is_read_again_and_a_vanished_file_is_an_error_value(folder, monkeypatch):
    paths, rels = folder
    known = _remembered(paths, rels)
    calls = _counting(monkeypatch)
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # touched: a new mtime
    with open(paths[2], "ab") as f:
        f.write(b"more")  # rewritten: a new size and content
    os.unlink(paths[4])
    checked = hash_files(paths, rels, known, rehash=False, progress=False)
    assert sorted(calls) == sorted([paths[1], paths[2]])
    assert checked.values[2] == hash_file(paths[2]) != known.hashes[2]
    assert isinstance(checked.values[4], OSError) and (checked.keys[4] == NO_STAT).all()
    assert statcache.unreadable(checked.values[4]).startswith("cannot read file")
    # The table of this check keeps catalog order and leaves out the vanished file and the one
    # written just now (racy).
    table = statcache.table(rels, checked, time.time_ns())
    assert list(table.path) == [r for i, r in enumerate(rels) if i not in (2, 4)]


def test_files_modified_within_the_racy_window_are_not_remembered(folder):
    paths, rels = folder
    os.utime(paths[0])  # now: a write later within the timestamp granularity could go unseen
    checked = hash_files(paths, rels, Remembered(), rehash=False, progress=False)
    table = statcache.table(rels, checked, time.time_ns())
    assert list(table.path) == rels[1:]


def test_the_slices_of_several_ranks_merge_into_one_check(folder):
    paths, rels = folder
    parts = [
        (idx, hash_files([paths[i] for i in idx], [rels[i] for i in idx], Remembered(), rehash=False, progress=False))
        for idx in ([0, 2, 4], [1, 3, 5])
    ]
    merged = statcache.merge(parts, 6)
    whole = hash_files(paths, rels, Remembered(), rehash=False, progress=False)
    assert merged.values == whole.values and np.array_equal(merged.keys, whole.keys)


def test_no_files_against_a_remembered_table(folder):
    """A folder whose every file was skipped (none left to check) against an index that
    remembers files: nothing checked, nothing taken from the table, with or without --rehash."""
    paths, rels = folder
    known = _remembered(paths, rels)
    for rehash in (False, True):
        empty = hash_files([], [], known, rehash=rehash, progress=False)
        assert empty.values == [] and empty.keys.shape == (0, 4)
