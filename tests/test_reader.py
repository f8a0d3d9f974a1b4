"""The cache's reader reads rows straight from the segment files (``pipeline/cache/reader.py``):
the same values as the index's virtual ``/features`` gives plain h5py, in any order, after
deletions, converted; with a few segment files open at a time, never all of them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import synthetic_fingerprint

from pipeline.cache import reader
from pipeline.cache.index import IndexContents, commit
from pipeline.cache.segments import SegmentWriter
from pipeline.cache.store import Cache, segment_dir
from pipeline.errors import CacheError

DIM = 24


def _cache(out: Path, n: int, seg_rows: int, keep: np.ndarray | None = None, dtype: type = np.float16) -> None:
    """``n`` random rows in segments of ``seg_rows``; the index holds rows ``keep`` in that
    order (default: all, in storage order), as extract commits after deletions and reorders."""
    hashes = [hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).hexdigest() for i in range(n)]
    feats = (np.random.default_rng(1).standard_normal((n, DIM), dtype=np.float32) * 100).astype(dtype)
    w = SegmentWriter(out, synthetic_fingerprint(DIM), dtype, DIM, seg_rows)
    for a in range(0, n, 37):
        w.add(hashes[a : a + 37], feats[a : a + 37])
    w.flush()
    keep = np.arange(n) if keep is None else keep
    commit(
        out,
        IndexContents(
            content_hash=[hashes[i] for i in keep],
            paths=[f"bag/photo-{i:05d}.jpg" for i in keep],
            labels=np.zeros(len(keep), dtype=np.int32),
            class_names=["bag"],
            attrs=dict(synthetic_fingerprint(DIM).to_record(), image_root="/photos", layout="folders"),
            location=[w.locations[hashes[i]] for i in keep],
            segment_rows={s.name: s.n_rows for s in w.segments},
            dtype=np.dtype(dtype).name,
            feature_dim=DIM,
        ),
    )


def _scrambled(n: int, seg_rows: int) -> np.ndarray:
    """3 of every 10 rows deleted, a block of 700 rows (more than a chunk) gone from the middle
    of the first segment, and blocks of the rest reversed: runs short, gaps wide, order not
    the segments' own."""
    rows = np.arange(n)
    rows = rows[(rows % 10 >= 3) & ~((rows >= 100) & (rows < 800) & (rows < seg_rows))]
    return np.concatenate([block[::-1] if k % 2 else block for k, block in enumerate(np.array_split(rows, 9))])


@pytest.mark.parametrize("piece_bytes", [reader.PIECE_BYTES, 1])  # 1: pieces of one chunk (512 rows)
@pytest.mark.parametrize(("n", "seg_rows", "scrambled"), [(1000, 64, False), (1000, 64, True), (3000, 1200, True)])
def test_reads_equal_the_virtual_dataset(tmp_path, monkeypatch, piece_bytes, n, seg_rows, scrambled):
    monkeypatch.setattr(reader, "PIECE_BYTES", piece_bytes)
    out = tmp_path / "features.h5"
    _cache(out, n, seg_rows, _scrambled(n, seg_rows) if scrambled else None)
    with h5py.File(out, "r") as f:
        vds = f["features"][()]  # what any h5py user reads: the virtual dataset
    assert vds.dtype == np.float16 and np.isfinite(vds).all()
    rows = np.random.default_rng(2).integers(0, len(vds), 300)  # any order, repeats
    with Cache(out) as c:
        all32 = c.features()
        assert all32.dtype == np.float32
        np.testing.assert_array_equal(all32, vds.astype(np.float32))
        np.testing.assert_array_equal(c.features(dtype=np.float16), vds)
        np.testing.assert_array_equal(c.read_all().features, vds)
        assert c.read_all().features.dtype == np.float16
        streamed = list(c.iter_features(chunk_rows=77))
        assert [s for s, _ in streamed] == list(range(0, len(vds), 77))
        np.testing.assert_array_equal(np.concatenate([b for _, b in streamed]), vds.astype(np.float32))
        np.testing.assert_array_equal(c.features(rows), vds[rows].astype(np.float32))
        np.testing.assert_array_equal(c.features(rows[::-1], dtype=np.float64), vds[rows[::-1]].astype(np.float64))
        assert c.features(np.array([], dtype=np.int64)).shape == (0, DIM)
        with pytest.raises(IndexError):
            c.features(np.array([len(vds)]))


def test_float32_caches_are_read_without_a_copy_and_as_float16(tmp_path):
    out = tmp_path / "features.h5"
    _cache(out, 300, 64, _scrambled(300, 64), dtype=np.float32)
    with h5py.File(out, "r") as f:
        vds = f["features"][()]
    with Cache(out) as c:
        np.testing.assert_array_equal(c.features(), vds)
        np.testing.assert_array_equal(c.features(dtype=np.float16), vds.astype(np.float16))


def _open_segments(out: Path) -> int:
    """Segment files this process has open (HDF5 opens a virtual dataset's sources itself:
    only the file descriptors show them)."""
    folder = str(segment_dir(out))
    fds = Path("/proc/self/fd")
    return sum(1 for fd in fds.iterdir() if os.path.realpath(fd).startswith(folder + os.sep))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts /proc/self/fd")
def test_a_stream_keeps_a_few_segment_files_open_not_all(tmp_path):
    """HDF5 keeps every source of a virtual dataset open once read, with its chunk cache: the
    reader's memory grew with the cache (1.4 GB for a 1 M-row stream). Now at most
    OPEN_SEGMENTS segment files are open at once, each opened once per stream."""
    out = tmp_path / "features.h5"
    _cache(out, 1000, 40)
    assert _open_segments(out) == 0
    with Cache(out) as c:
        assert len(c.segments) > 1.5 * reader.OPEN_SEGMENTS
        most = 0
        for _, block in c.iter_features(chunk_rows=60):
            assert len(block)
            most = max(most, _open_segments(out))
        assert 0 < most <= reader.OPEN_SEGMENTS
        assert c._files is not None and c._files.opened == len(c.segments)  # each opened once
    assert _open_segments(out) == 0  # closed with the cache


def test_a_location_past_a_segments_end_is_a_damaged_cache(tmp_path):
    out = tmp_path / "features.h5"
    _cache(out, 100, 40)
    with h5py.File(out, "r+") as f:
        row = f["location/row"][()]
        row[50] = 10**6
        f["location/row"][...] = row
    with Cache(out) as c, pytest.raises(CacheError, match=r"is damaged.*cache verify"):
        c.features()
