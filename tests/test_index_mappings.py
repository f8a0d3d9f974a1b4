"""The index's virtual ``/features``: one mapping per segment whatever rows were deleted (the
source side an irregular hyperslab of the live rows), the values read exactly as the per-row
locations say, and indexes written with one mapping per run of rows (before) still read."""

from __future__ import annotations

import hashlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import synthetic_fingerprint

from pipeline.cache import compact as compact_mod
from pipeline.cache import index as index_mod
from pipeline.cache.index import IndexContents, commit, mapping_blocks, mapping_runs
from pipeline.cache.inspection import verify
from pipeline.cache.segments import SegmentWriter
from pipeline.cache.store import Cache, segment_dir
from pipeline.errors import CacheError

DIM = 12


def _hash(i: int) -> str:
    return hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).hexdigest()


def _segments(out: Path, n: int, seg_rows: int, dtype: str) -> tuple[list[str], list[tuple[str, int]], np.ndarray]:
    """``n`` random rows in segments of ``seg_rows``: their keys, locations and features."""
    hashes = [_hash(i) for i in range(n)]
    feats = np.random.default_rng(1).standard_normal((n, DIM), dtype=np.float32).astype(dtype)
    w = SegmentWriter(out, synthetic_fingerprint(DIM), np.dtype(dtype), DIM, seg_rows)
    for a in range(0, n, 50):
        w.add(hashes[a : a + 50], feats[a : a + 50])
    w.flush()
    return hashes, [w.locations[h] for h in hashes], feats


def _commit(out: Path, hashes: list[str], location: list[tuple[str, int]], dtype: str) -> None:
    seg_rows: dict[str, int] = {}
    for p in sorted(segment_dir(out).glob("seg-*.h5")):
        with h5py.File(p, "r") as f:
            seg_rows[p.name] = int(f["features"].shape[0])
    n = len(hashes)
    commit(
        out,
        IndexContents(
            content_hash=hashes,
            paths=[f"bag/photo-{i:05d}.jpg" for i in range(n)],
            labels=np.zeros(n, dtype=np.int32),
            class_names=["bag"],
            attrs=dict(synthetic_fingerprint(DIM).to_record(), image_root="/photos", layout="folders"),
            location=location,
            segment_rows={s: seg_rows[s] for s, _ in location},
            dtype=dtype,
            feature_dim=DIM,
        ),
    )


def _virtual_count(out: Path) -> int:
    with h5py.File(out, "r") as f:
        return f["features"].id.get_create_plist().get_virtual_count()


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_scattered_deletions_leave_one_mapping_per_segment(tmp_path, monkeypatch, dtype):
    out = tmp_path / "cache" / "features.h5"
    hashes, location, feats = _segments(out, 300, 100, dtype)
    keep = [i for i in range(300) if i % 10 >= 3]  # 3 of every 10 deleted: 90 runs of live rows
    _commit(out, [hashes[i] for i in keep], [location[i] for i in keep], dtype)
    seg = np.array([int(s.split("-")[-1].split(".")[0]) for s, _ in (location[i] for i in keep)])
    row = np.array([location[i][1] for i in keep])
    assert len(mapping_runs(seg, row)[0]) == 30
    assert _virtual_count(out) == compact_mod.mappings(out) == 3  # one per segment, not one per run
    monkeypatch.chdir(tmp_path)  # relative source names: read from elsewhere
    with h5py.File(out, "r") as f:
        ds = f["features"]
        assert ds.dtype == np.dtype(dtype) and np.isnan(ds.fillvalue)
        assert {s.file_name for s in ds.virtual_sources()} == {f"features.h5.segments/{s}" for s, _ in location}
        np.testing.assert_array_equal(ds[()], feats[keep])
        np.testing.assert_array_equal(ds[65:150], feats[keep][65:150])  # across a segment boundary
    with Cache(out) as c:
        np.testing.assert_array_equal(c.features(dtype=np.dtype(dtype)), feats[keep])
        pick = np.array([200, 3, 71, 70, 150, 0])
        np.testing.assert_array_equal(c.features(pick, dtype=np.dtype(dtype)), feats[keep][pick])
        assert [b for _, b in c.iter_features(64)][-1].shape == (210 - 192, DIM)
    assert not verify(out)


def test_a_segment_with_many_runs_is_mapped_in_groups_of_runs(tmp_path, monkeypatch):
    """HDF5 decodes an irregular selection in time quadratic in its runs: a mapping takes at
    most RUNS_PER_MAPPING of them (4 here: 10 runs a segment -> 3 mappings each)."""
    monkeypatch.setattr(index_mod, "RUNS_PER_MAPPING", 4)
    out = tmp_path / "features.h5"
    hashes, location, feats = _segments(out, 300, 100, "float32")
    keep = [i for i in range(300) if i % 10 >= 3]
    _commit(out, [hashes[i] for i in keep], [location[i] for i in keep], "float32")
    assert compact_mod.mappings(out) == 9
    with Cache(out) as c:
        np.testing.assert_array_equal(c.features(), feats[keep])
        np.testing.assert_array_equal(c.features(np.arange(20, 190, 3)), feats[keep][20:190:3])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_rows_out_of_order_and_from_several_segments_read_as_their_locations_say(tmp_path, dtype):
    """One mapping per block of index rows that come from one segment in ascending row order:
    a row that goes back in its segment, or to another segment, starts a new one."""
    out = tmp_path / "features.h5"
    _, location, feats = _segments(out, 250, 100, dtype)
    take = [*range(0, 40, 3), 120, 121, 5, 6, 7, *range(200, 250, 4), 60, 130, *range(99, 93, -1), 101, 249]
    rows = [location[i] for i in take]
    rows += [location[2], location[2]]  # one segment row behind two index rows (two mappings)
    n = len(rows)
    _commit(out, [_hash(10_000 + i) for i in range(n)], rows, dtype)
    seg = np.array([int(s.split("-")[-1].split(".")[0]) for s, _ in rows])
    row = np.array([r for _, r in rows])
    blocks = len(mapping_blocks(seg, row)[0])
    assert blocks < len(mapping_runs(seg, row)[0]) and _virtual_count(out) == blocks
    want = feats[[*take, 2, 2]]
    with Cache(out) as c:
        np.testing.assert_array_equal(c.features(dtype=np.dtype(dtype)), want)
        for a, b in ((0, 7), (5, 30), (13, n)):
            np.testing.assert_array_equal(c.features(np.arange(a, b), dtype=np.dtype(dtype)), want[a:b])


def _per_run_features(out: Path) -> None:
    """Rewrite the index's ``/features`` as the index writer did before: one mapping per run
    of consecutive rows, through h5py's ``VirtualLayout``."""
    with h5py.File(out, "r+") as f:
        names = [s.decode() for s in f["segments/name"][()]]
        counts = f["segments/rows"][()].tolist()
        seg, row = f["location/segment"][()], f["location/row"][()]
        dt, d, folder = f["features"].dtype, f["features"].shape[1], f.attrs["segment_dir"]
        del f["features"]
        layout = h5py.VirtualLayout(shape=(len(seg), d), dtype=dt)
        src = [
            h5py.VirtualSource(f"{folder}/{s}", "features", shape=(k, d), dtype=dt)
            for s, k in zip(names, counts, strict=True)
        ]
        for a, b in zip(*mapping_runs(seg, row), strict=True):
            r0 = int(row[a])
            layout[a:b] = src[int(seg[a])][r0 : r0 + (b - a)]
        f.create_virtual_dataset("features", layout, fillvalue=np.nan)


def test_an_index_with_one_mapping_per_run_still_reads_verifies_and_compacts(tmp_path, run_cli):
    out = tmp_path / "features.h5"
    hashes, location, feats = _segments(out, 300, 100, "float16")
    keep = [i for i in range(300) if i % 10 >= 3]
    _commit(out, [hashes[i] for i in keep], [location[i] for i in keep], "float16")
    _per_run_features(out)
    assert compact_mod.mappings(out) == 30
    with Cache(out) as c:
        np.testing.assert_array_equal(c.features(dtype=np.float16), feats[keep])
    assert run_cli("cache", "verify", out).exit_code == 0
    assert run_cli("cache", "info", out).exit_code == 0
    # The next commit that changes anything writes one mapping per segment.
    gone = {keep[0], keep[100]}
    kept = [i for i in keep if i not in gone]
    _commit(out, [hashes[i] for i in kept], [location[i] for i in kept], "float16")
    assert compact_mod.mappings(out) == 3
    _per_run_features(out)
    r = run_cli("cache", "compact", out)  # every segment is 30 % dead
    assert r.exit_code == 0 and "reclaimed 92 dead row(s)" in r.output, r.output
    assert compact_mod.mappings(out) == 1 and not verify(out)
    with Cache(out) as c:
        np.testing.assert_array_equal(c.features(dtype=np.float16), feats[kept])


def test_a_segment_deleted_under_an_open_reader_reads_as_nan(tmp_path):
    """The fill value of the low-level dataset creation: NaN (refused by readers), not zeros,
    for a plain h5py reader of the virtual dataset; headstart's own reader (cache/reader.py)
    says the segment is gone."""
    out = tmp_path / "features.h5"
    hashes, location, _ = _segments(out, 200, 100, "float32")
    keep = [i for i in range(200) if i % 4]
    _commit(out, [hashes[i] for i in keep], [location[i] for i in keep], "float32")
    with h5py.File(out, "r") as f, Cache(out) as c:
        (segment_dir(out) / location[150][0]).unlink()
        got = f["features"][()]
        with pytest.raises(CacheError, match="removed after the cache was opened"):
            c.features()
    assert np.isnan(got[75:]).all() and np.isfinite(got[:75]).all()


def test_an_index_written_in_small_chunks_straight_to_disk_equals_one_built_in_memory(tmp_path, monkeypatch):
    """The commit converts and writes its per-row datasets a chunk of rows at a time, and an
    index over INDEX_IN_MEMORY_LIMIT goes straight to disk: both must give the same file
    contents as one piece in memory, non-ASCII paths in a later chunk included (the UTF-8
    width is the whole column's), with rows out of storage order (the bounds across chunks)."""
    from pipeline.cache import h5io

    out = tmp_path / "features.h5"
    hashes, location, feats = _segments(out, 300, 100, "float32")
    order = [*range(150, 300), *range(0, 150)]  # segment 2 and 3 first, then 1: first use != name order
    paths = [f"口红/照片-{i}.jpg" if i > 250 else f"bag/photo-{i:05d}.jpg" for i in range(300)]
    seg_rows = {s: 100 for s, _ in location}

    def contents() -> IndexContents:
        return IndexContents(
            content_hash=[hashes[i] for i in order],
            paths=[paths[i] for i in order],
            labels=np.arange(300, dtype=np.int32) % 3,
            class_names=["a", "b", "c"],
            attrs=dict(synthetic_fingerprint(DIM).to_record(), image_root="/photos", layout="folders"),
            location=index_mod.RowLocations(
                sorted(seg_rows), np.array([sorted(seg_rows).index(location[i][0]) for i in order]),
                np.array([location[i][1] for i in order]),
            ),
            segment_rows=seg_rows,
            dtype="float32",
            feature_dim=DIM,
            stat=h5io.StatTable(
                [paths[i] for i in order], np.arange(300), np.arange(300) + 7, np.arange(300), np.full(300, 3),
                [hashes[i] for i in order],
            ),
        )  # fmt: skip

    def datasets() -> dict[str, object]:
        got: dict[str, object] = {}
        with h5py.File(out, "r") as f:
            f.visititems(lambda name, obj: got.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
            got["attrs"] = dict(f.attrs)
        return got

    index_mod.write_index(out, contents())
    whole, digest = datasets(), index_mod.contents_digest(contents())
    monkeypatch.setattr(h5io, "ROW_CHUNK", 64)
    monkeypatch.setattr(h5io, "_H5_CHUNK", 32)
    monkeypatch.setattr(index_mod, "ROW_CHUNK", 64)
    monkeypatch.setattr(index_mod, "INDEX_IN_MEMORY_LIMIT", 0)
    index_mod.write_index(out, contents())
    chunked = datasets()
    assert whole.keys() == chunked.keys()
    for name in whole:
        if name == "attrs":
            assert whole[name] == chunked[name]
        else:
            np.testing.assert_array_equal(whole[name], chunked[name], err_msg=name)
    assert index_mod.contents_digest(contents()) == digest  # the same bytes, chunk by chunk
    with Cache(out) as c:
        assert c.paths == [paths[i] for i in order]
        np.testing.assert_array_equal(c.features(), feats[order])
    assert not verify(out)
