"""Cache maintenance as a user runs it: ``cache compact`` (and the automatic one at the end of
``extract``), ``cache migrate``, ``cache export --format parquet``.

Most caches here are synthetic rows written through the real store API (segments + index, as
``bench/store_scale.py`` does), so each test takes well under a second; the kills are real
``python -m pipeline cache compact`` processes that SIGKILL themselves at a named point."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import copy_sample_photos

from pipeline.cache import compact as compact_mod
from pipeline.cache.index import RUNS_PER_MAPPING, IndexContents, RowLocations, commit, migrate_v1
from pipeline.cache.inspection import info, verify
from pipeline.cache.segments import SegmentWriter
from pipeline.cache.store import Cache, segment_dir
from pipeline.models.fingerprint import Fingerprint

OLD = Path(__file__).parent / "data" / "release-0.1.0"
DATA = Path(__file__).parent / "data" / "images"
CLASSES = ["bag", "sneaker", "口红"]  # sorted, as a cache keeps them
DIM = 96


def _fingerprint(dim: int = DIM) -> Fingerprint:
    prep = {"crop": 32, "draft": True, "interpolation": "bilinear", "letterbox": False}
    prep.update(mean=[0.5] * 3, resize=40, std=[0.5] * 3)
    record = dict(backbone="synthetic", weights="random", weights_sha256="none", precision="fp32")
    return Fingerprint.from_record({**record, "preprocessing": json.dumps(prep), "feature_dim": dim}, source="test")


def _synthetic(out: Path, n: int, seg_rows: int, dtype: type = np.float16) -> IndexContents:
    """A cache of ``n`` random rows in segments of ``seg_rows``; every 7th row unlabelled."""
    fp = _fingerprint()
    hashes = [hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).hexdigest() for i in range(n)]
    feats = np.random.default_rng(0).standard_normal((n, DIM), dtype=np.float32).astype(dtype)
    w = SegmentWriter(out, fp, dtype, DIM, seg_rows)
    for a in range(0, n, 50):
        w.add(hashes[a : a + 50], feats[a : a + 50])
    w.flush()
    c = IndexContents(
        content_hash=hashes,
        paths=[f"{CLASSES[i % 3]}/photo-{i:05d}.jpg" for i in range(n)],
        labels=np.array([-1 if i % 7 == 3 else i % 3 for i in range(n)], dtype=np.int32),
        class_names=CLASSES,
        attrs=dict(fp.to_record(), image_root="/photos", layout="folders"),
        location=[w.locations[h] for h in hashes],
        segment_rows={s.name: s.n_rows for s in w.segments},
        dtype=np.dtype(dtype).name,
        feature_dim=DIM,
        duplicates=[("bag/copy.jpg", hashes[-1])],
        skipped=[("bag/broken.jpg", "cannot decode")],
    )
    commit(out, c)
    return c


def _delete(out: Path, c: IndexContents, gone: set[int]) -> IndexContents:
    """Commit the index without rows ``gone``, as extract does when those photos are deleted."""
    keep = [i for i in range(len(c.content_hash)) if i not in gone]
    d = IndexContents(
        content_hash=[c.content_hash[i] for i in keep],
        paths=[c.paths[i] for i in keep],
        labels=c.labels[keep],
        class_names=c.class_names,
        attrs=c.attrs,
        location=[c.location[i] for i in keep],
        segment_rows=c.segment_rows,
        dtype=c.dtype,
        feature_dim=c.feature_dim,
        duplicates=c.duplicates,
        skipped=c.skipped,
    )
    commit(out, d)
    return d


def _state(out: Path) -> tuple[list[str], list[str], list[int], np.ndarray]:
    with Cache(out) as c:
        return c.content_hash, c.paths, c.labels.tolist(), c.features(dtype=np.float16)


def _extract_api():  # type: ignore[no-untyped-def]
    """Imported by the tests that run a real extract only (torch): the others need the store."""
    import pipeline.extract as extract_mod
    from pipeline.config import ExtractConfig

    return extract_mod, extract_mod.extract, ExtractConfig


def _on_disk(out: Path) -> int:
    return out.stat().st_size + sum(p.stat().st_size for p in segment_dir(out).iterdir())


def _files(out: Path) -> set[str]:
    return {p.name for p in segment_dir(out).iterdir()}


# Rows deleted from a cache of 600 rows in 6 segments of 100: segment 0 loses 60 %, segment 1
# 10 %, segment 2 all of it (its file goes at that commit already), segment 4 30 %.
GONE = set(range(0, 60)) | set(range(100, 110)) | set(range(200, 300)) | set(range(400, 430))


@pytest.fixture
def deleted(tmp_path: Path) -> Path:
    out = tmp_path / "cache" / "features.h5"
    _delete(out, _synthetic(out, 600, 100), GONE)
    return out


def test_compact_reclaims_dead_rows_and_keeps_every_row(deleted, run_cli):
    out = deleted
    before, size_before = _state(out), _on_disk(out)
    assert info(out)["dead_rows"] == 100 and not verify(out)  # 60 + 10 + 30; segment 2 went at the commit
    r = run_cli("cache", "compact", out)
    assert r.exit_code == 0, r.output
    assert "reclaimed 90 dead row(s)" in r.output and "from 2 segment(s) into 1" in r.output  # 0 and 4; 1 is at 10 %
    after = _state(out)
    assert after[:3] == before[:3]  # hashes, paths, labels, in the same order
    np.testing.assert_array_equal(after[3], before[3])  # bit-identical features
    assert _on_disk(out) < size_before - 90 * DIM * 2  # at least the dead rows' bytes are gone
    d = info(out)
    assert d["dead_rows"] == 10 and d["unindexed_rows"] == 0 and not verify(out)
    with Cache(out) as c:
        assert _files(out) == set(c.segments)  # the old files are gone, nothing unindexed is left

    r = run_cli("cache", "compact", out)  # under the threshold now
    assert r.exit_code == 0 and "nothing to compact" in r.output and "10 dead row(s) left" in r.output
    r = run_cli("cache", "compact", out, "--min-dead-share", "0")
    assert r.exit_code == 0 and "reclaimed 10 dead row(s)" in r.output
    assert info(out)["dead_rows"] == 0 and not verify(out)
    np.testing.assert_array_equal(_state(out)[3], before[3])


def test_compact_keeps_every_index_dataset_of_a_real_extract(tmp_path, monkeypatch, run_cli):
    """Everything but where the rows live is carried over byte for byte: duplicates, skips,
    the stat cache, attributes (so a newly added index field cannot be silently dropped)."""
    extract_mod, extract, cfg_type = _extract_api()
    monkeypatch.setattr(extract_mod, "SEGMENT_ROWS", 8)
    images = copy_sample_photos(tmp_path / "images", per_class=8)
    shutil.copy(sorted((images / "bag").glob("*.png"))[0], images / "bag" / "copy.png")
    shutil.copy(DATA / "truncated_jpeg.jpg", images / "sneaker" / "broken.jpg")
    hour_ago = time.time_ns() - 3600 * 10**9  # freshly copied files are "racy": not stat-cached
    for p in images.rglob("*.*"):
        os.utime(p, ns=(hour_ago, hour_ago))
    out = tmp_path / "f.h5"
    cfg = cfg_type(images=str(images), out=str(out), backbone="tiny", precision="fp32", workers=0, progress=False)
    extract(cfg)
    sorted((images / "trouser").glob("*.png"))[0].unlink()  # 1 of 24 rows: no automatic compaction
    extract(cfg)
    assert info(out)["dead_rows"] == 1

    def datasets(path: Path) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        with h5py.File(path, "r") as f:

            def one(name: str, obj: object) -> None:
                if isinstance(obj, h5py.Dataset):
                    v = obj[()]
                    out[name] = repr(v.tolist()).encode() if v.dtype == object else v.tobytes()

            f.visititems(one)
            attrs = {k: str(v) for k, v in f.attrs.items() if k != compact_mod.SUPERSEDED}
            out["attrs"] = repr(sorted(attrs.items())).encode()
        return out

    before = datasets(out)
    want = _state(out)
    assert run_cli("cache", "compact", out, "--min-dead-share", "0").exit_code == 0
    after = datasets(out)
    moved = {"features", "segments/name", "segments/rows", "location/segment", "location/row"}
    assert set(after) == set(before)
    assert {k for k in before if before[k] != after[k]} <= moved
    for name in ("stat/path", "skipped/path", "duplicates/path", "rejected/content_hash"):
        assert before[name] not in (b"", b"[]"), name  # really compared
    got = _state(out)
    assert got[:3] == want[:3]
    np.testing.assert_array_equal(got[3], want[3])
    assert not verify(out)
    assert extract(cfg).extracted == 0  # the compacted cache is extended as before


CRASH_POINTS = [
    "segment-writing",  # half of a new segment written to its temporary file
    "segment-before-rename",
    "compact-segment-written",
    "compact-segment-written:2",
    "index-writing",
    "index-before-rename",
    "index-replaced",  # the new index is in place, the old segments not yet deleted
    "compact-removing",  # one old segment deleted, one not
]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_during_compaction_leaves_a_valid_cache(deleted, point, run_cli):
    out = deleted
    before = _state(out)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "cache", "compact", str(out), "--min-dead-share", "0"],
        capture_output=True,
        text=True,
        env={**os.environ, "HEADSTART_CRASH_AT": point, "HEADSTART_COMMIT_ROWS": "64"},  # 4 new segments
        timeout=120,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    v = run_cli("cache", "verify", out)
    assert v.exit_code == 0 and "OK" in v.output, v.output
    killed = _state(out)
    assert killed[:3] == before[:3]
    np.testing.assert_array_equal(killed[3], before[3])

    r = run_cli("cache", "compact", out, "--min-dead-share", "0")  # the re-run finishes the job
    assert r.exit_code == 0, r.output
    assert info(out)["dead_rows"] == 0 and not verify(out)
    with Cache(out) as c:
        assert _files(out) == set(c.segments)  # leftovers of the killed run are gone too
    got = _state(out)
    assert got[:3] == before[:3]
    np.testing.assert_array_equal(got[3], before[3])


def test_a_reader_open_across_a_compaction_gets_an_error_not_zeros(deleted, run_cli):
    """The reader reads the segments themselves: one that a compaction deleted after the cache
    was opened is an Error that says to run again, never zeros that look like features. (A
    plain h5py reader of the virtual dataset gets its fill value there: NaN.)"""
    from pipeline.errors import CacheError

    with Cache(deleted) as reader:
        assert run_cli("cache", "compact", deleted).exit_code == 0  # deletes segments 0 and 4
        with pytest.raises(CacheError, match=r"removed after the cache was opened.*run the command again"):
            reader.features()
    with Cache(deleted) as fresh:  # opened again: every row
        assert np.isfinite(fresh.features()).all()


def test_compaction_keeps_segments_a_killed_extract_left_for_adoption(deleted, run_cli):
    """An unindexed segment with content the index lacks is a killed extract's work: kept."""
    out = deleted
    w = SegmentWriter(out, _fingerprint(), np.float16, DIM, 100)
    w.add(["f" * 32], np.ones((1, DIM), np.float16))
    w.flush()
    orphan = w.segments[0].name
    assert run_cli("cache", "compact", out).exit_code == 0
    assert orphan in _files(out) and info(out)["unindexed_rows"] == 1


def test_compact_if_needed_runs_above_the_threshold_only(tmp_path):
    out = tmp_path / "f.h5"
    c = _synthetic(out, 400, 100)
    lines: list[str] = []
    d = _delete(out, c, set(range(0, 100, 2)))  # 50 of 400 dead (12.5 %), all in segment 0
    assert compact_mod.compact_if_needed(out, say=lines.append) is None
    assert lines == [] and info(out)["dead_rows"] == 50
    _delete(out, d, set(range(50, 110)) | set(range(150, 200)))  # 60 of segment 1, 50 of segment 2
    assert info(out)["dead_rows"] == 160  # of 400: 40 %
    result = compact_mod.compact_if_needed(out, say=lines.append)
    assert result is not None and result.reclaimed_rows == 160 and result.reclaimed_bytes > 0
    assert result.segments_rewritten == 3 and result.rows_copied == 140
    assert len(lines) == 1 and "reclaimed 160 dead row(s)" in lines[0]
    assert info(out)["dead_rows"] == 0 and not verify(out)


def test_scattered_deletions_wait_for_the_dead_share_and_keep_the_index_small(tmp_path):
    """Every other row deleted: a run of live rows per dead row, but the index maps each
    segment once (runs cost bytes, not mappings: docs/benchmarks.md), so nothing is compacted
    until the dead share is above the threshold."""
    out = tmp_path / "f.h5"
    c = _synthetic(out, 400, 200)  # two segments
    _delete(out, c, set(range(0, 200, 2)))  # 100 dead (25 %, not above it): 100 runs in segment 0
    assert compact_mod.mappings(out) == -(-100 // RUNS_PER_MAPPING) + 1  # 2 + 1, not 100 + 1
    assert compact_mod.compact_if_needed(out, say=print) is None
    _delete(out, c, set(range(0, 200, 2)) | {201, 203})  # 102 dead: above 25 %
    result = compact_mod.compact_if_needed(out, say=print)
    assert result is not None and result.reclaimed_rows == 100  # segment 1 is 1 % dead: kept
    assert compact_mod.mappings(out) == 2 and not verify(out)


def test_extract_compacts_on_its_own_above_the_threshold(tmp_path, monkeypatch, capsys):
    extract_mod, extract, cfg_type = _extract_api()
    monkeypatch.setattr(extract_mod, "SEGMENT_ROWS", 8)
    images = copy_sample_photos(tmp_path / "images", per_class=10)
    out = tmp_path / "f.h5"
    cfg = cfg_type(images=str(images), out=str(out), backbone="tiny", precision="fp32", workers=0, progress=False)
    extract(cfg)
    with Cache(out) as c:
        want = dict(zip(c.content_hash, c.features(), strict=True))
    photos = sorted(images.rglob("*.png"))
    for p in photos[::10]:  # 3 of 30: 10 % dead, under the threshold
        p.unlink()
    extract(cfg)
    assert "compacted" not in capsys.readouterr().err and info(out)["dead_rows"] == 3
    for p in photos[1::3]:  # 9 more: 12 of 30 dead
        p.unlink(missing_ok=True)
    s = extract(cfg)
    err = capsys.readouterr().err
    assert "compacted: reclaimed" in err, err
    d = info(out)
    assert d["rows"] == s.rows == 18 and d["dead_rows"] / (d["rows"] + d["dead_rows"]) < 0.25 and not verify(out)
    with Cache(out) as c:
        for h, f in zip(c.content_hash, c.features(), strict=True):
            np.testing.assert_array_equal(f, want[h])
        assert _files(out) == set(c.segments)


def test_migrate_converts_the_release_0_1_0_cache(tmp_path, run_cli):
    cache = tmp_path / "features.h5"
    shutil.copy(OLD / "features.h5", cache)  # never the fixture itself
    with Cache(cache) as c:
        assert c.schema_version == 1
        want = (c.content_hash, c.paths, c.labels.tolist(), c.features())
    r = run_cli("cache", "compact", cache)
    assert r.exit_code == 1 and "cache migrate" in r.output and "Traceback" not in r.output
    r = run_cli("cache", "migrate", cache)
    assert r.exit_code == 0 and "converted from schema v1 to v2: 12 rows" in r.output, r.output
    assert run_cli("cache", "verify", cache).exit_code == 0
    with Cache(cache) as c:
        assert c.schema_version == 2 and len(c.segments) == 1
        assert (c.content_hash, c.paths, c.labels.tolist()) == want[:3]
        np.testing.assert_array_equal(c.features(), want[3])
    r = run_cli("cache", "migrate", cache)
    assert r.exit_code == 0 and "already schema v2; nothing to do" in r.output


def _record_feature_reads(monkeypatch, cache: Path) -> list[int]:
    """Rows of every read of ``cache``'s ``/features`` (h5py is the only way in)."""
    reads: list[int] = []
    real = h5py.Dataset.__getitem__

    def recording(self, sel):  # type: ignore[no-untyped-def]
        out = real(self, sel)
        if self.name == "/features" and Path(self.file.filename) == cache:
            reads.append(len(out) if getattr(out, "ndim", 0) == 2 else 0)
        return out

    real_direct = h5py.Dataset.read_direct

    def recording_direct(self, dest, source_sel=None, dest_sel=None):  # type: ignore[no-untyped-def]
        real_direct(self, dest, source_sel, dest_sel)
        if self.name == "/features" and Path(self.file.filename) == cache:  # the Cache reader reads so
            reads.append(self.shape[0] if source_sel is None else len(range(*source_sel.indices(self.shape[0]))))

    monkeypatch.setattr(h5py.Dataset, "__getitem__", recording)
    monkeypatch.setattr(h5py.Dataset, "read_direct", recording_direct)
    return reads


def _v1_cache_like_the_release(out: Path, n: int) -> None:
    """A schema-v1 cache of ``n`` rows laid out as release 0.1.0 wrote one (its attributes,
    dataset types and chunked, resizable ``/features``; ``tests/data/release-0.1.0`` is the
    template): bigger than the 12-row file, so that converting it takes several segments."""
    rng = np.random.default_rng(0)
    string = h5py.string_dtype("utf-8")
    with h5py.File(OLD / "features.h5", "r") as src, h5py.File(out, "w") as f:
        d = src["features"].shape[1]
        f.create_dataset(
            "features", data=rng.standard_normal((n, d)).astype(np.float16), chunks=(64, d), maxshape=(None, d)
        )
        f.create_dataset("content_hash", data=np.array([f"{i:032x}" for i in range(n)], dtype="S32"))
        f.create_dataset("paths", data=np.array([f"bag/p{i:05d}.png" for i in range(n)], dtype=object), dtype=string)
        f.create_dataset("labels", data=(np.arange(n) % 3).astype(np.int32))
        f.create_dataset("class_names", data=src["class_names"][()], dtype=string)
        for group, names in (("duplicates", ("path", "content_hash")), ("skipped", ("path", "reason"))):
            for name in names:
                f.create_dataset(f"{group}/{name}", data=src[f"{group}/{name}"][()], dtype=src[f"{group}/{name}"].dtype)
        f.attrs.update(dict(src.attrs))
        f.attrs["n_rows"] = n


@pytest.mark.parametrize("source", ["release", "larger"])
def test_migrate_streams_the_features_one_segment_at_a_time(tmp_path, monkeypatch, source):
    """The v1 file's features are read and written a segment at a time (memory: one segment,
    not the file); every row keeps its key, path, label and features. On the release's own
    bytes (12 rows, segments of 5) and on a larger v1 file laid out the same way."""
    cache = tmp_path / "features.h5"
    n, rows = (12, 5) if source == "release" else (1000, 256)
    if source == "release":
        shutil.copy(OLD / "features.h5", cache)
    else:
        _v1_cache_like_the_release(cache, n)
    with Cache(cache) as c:
        assert c.schema_version == 1 and c.n_rows == n
        want = (c.content_hash, c.paths, c.labels.tolist(), c.features(dtype=np.float16))
    reads = _record_feature_reads(monkeypatch, cache)
    migrate_v1(cache, segment_rows=rows)
    assert reads and max(reads) <= rows, reads  # never the whole /features at once
    monkeypatch.undo()
    assert not verify(cache)
    with Cache(cache) as c:
        assert c.schema_version == 2 and list(c.segment_rows.values()) == [rows] * (n // rows) + [n % rows]
        assert (c.content_hash, c.paths, c.labels.tolist()) == want[:3]
        np.testing.assert_array_equal(c.features(dtype=np.float16), want[3])
        assert _files(cache) == set(c.segments)


def test_row_locations_index_as_the_list_of_pairs(tmp_path):
    """An index committed with ``RowLocations`` (arrays) is the one the list of (segment, row)
    pairs gives, byte for byte in every dataset, and names the segments in first-use order."""
    out = tmp_path / "a" / "features.h5"
    c = _synthetic(out, 150, seg_rows=50)  # three segments of 50
    order = np.r_[np.arange(100, 150), np.arange(0, 100)]  # the last segment's rows first
    names = list(dict.fromkeys(s for s, _ in c.location))
    pairs = [c.location[i] for i in order.tolist()]
    keys = [c.content_hash[i] for i in order.tolist()]
    paths = [c.paths[i] for i in order.tolist()]
    as_list = IndexContents(
        **{**vars(c), "location": pairs, "content_hash": keys, "paths": paths, "labels": c.labels[order]}
    )
    seg = np.array([names.index(s) for s, _ in pairs])
    row = np.array([r for _, r in pairs])
    as_arrays = IndexContents(**{**vars(as_list), "location": RowLocations(names, seg, row)})
    other = tmp_path / "b" / "features.h5"
    shutil.copytree(segment_dir(out), segment_dir(other))
    commit(out, as_list)
    commit(other, as_arrays)
    with h5py.File(out, "r") as f, h5py.File(other, "r") as g:
        assert f.attrs["contents_digest"] == g.attrs["contents_digest"]
        for name in (
            "content_hash",
            "paths",
            "labels",
            "segments/name",
            "segments/rows",
            "location/segment",
            "location/row",
        ):
            np.testing.assert_array_equal(f[name][()], g[name][()], err_msg=name)
        np.testing.assert_array_equal(f["features"][()], g["features"][()])
        assert [s.decode() for s in f["segments/name"][()]] == [names[2], names[0], names[1]]


def test_kill_9_while_migrating_keeps_the_v1_file(tmp_path, run_cli):
    cache = tmp_path / "features.h5"
    shutil.copy(OLD / "features.h5", cache)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "cache", "migrate", str(cache)],
        capture_output=True,
        text=True,
        env={**os.environ, "HEADSTART_CRASH_AT": "migrate-segment-written"},
        timeout=120,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert cache.read_bytes() == (OLD / "features.h5").read_bytes()
    assert run_cli("cache", "migrate", cache).exit_code == 0
    assert not verify(cache)
    with Cache(cache) as c:
        assert _files(cache) == set(c.segments)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_parquet_export_round_trip_checks_every_row(tmp_path, monkeypatch, run_cli, dtype):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    out = tmp_path / "f.h5"
    c = _delete(out, _synthetic(out, 500, 64, dtype=np.dtype(dtype).type), {5, 77, 300})
    monkeypatch.setattr("pipeline.cache.parquet._CHUNK_BYTES", 40 * DIM * 2)  # several row groups
    dest = tmp_path / "export"
    r = run_cli("cache", "export", out, "--format", "parquet", dest, "--rows-per-file", "200")
    assert r.exit_code == 0 and "497 rows x 96" in r.output, r.output
    parts = sorted(dest.iterdir())
    assert [p.name for p in parts] == [f"part-0000{k}.parquet" for k in range(3)]
    assert pq.ParquetFile(parts[0]).metadata.num_row_groups > 1
    t = pq.read_table(dest)
    want_type = pa.float16() if dtype == "float16" else pa.float32()
    assert t.schema.field("features").type == pa.list_(want_type, DIM)
    assert t.num_rows == 497
    hashes, paths, labels, _ = _state(out)
    assert t.column("content_hash").to_pylist() == hashes == c.content_hash
    assert t.column("path").to_pylist() == paths
    assert t.column("label").to_pylist() == [CLASSES[k] if k >= 0 else None for k in labels]
    assert t.column("label_id").to_pylist() == [k if k >= 0 else None for k in labels]
    got = t.column("features").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(-1, DIM)
    with Cache(out) as cache:
        np.testing.assert_array_equal(got, cache.features(dtype=np.dtype(dtype)))
    meta = json.loads(t.schema.metadata[b"headstart"])
    assert meta["class_names"] == CLASSES and meta["fingerprint"]["backbone"] == "synthetic"

    # float16 cache exported as float32 for readers without Parquet float16; exact widening.
    r = run_cli("cache", "export", out, dest, "--dtype", "float32")  # replaces the earlier export
    assert r.exit_code == 0, r.output
    t = pq.read_table(dest)
    assert len(list(dest.iterdir())) == 1 and t.schema.field("features").type == pa.list_(pa.float32(), DIM)
    got = t.column("features").combine_chunks().values.to_numpy().reshape(-1, DIM)
    with Cache(out) as cache:
        np.testing.assert_array_equal(got, cache.features(dtype=np.float32))


def test_parquet_export_of_the_release_0_1_0_cache(tmp_path, run_cli):
    pq = pytest.importorskip("pyarrow.parquet")
    cache = tmp_path / "features.h5"
    shutil.copy(OLD / "features.h5", cache)
    assert run_cli("cache", "export", cache, tmp_path / "x").exit_code == 0
    t = pq.read_table(tmp_path / "x")
    with Cache(cache) as c:
        assert t.column("content_hash").to_pylist() == c.content_hash and t.num_rows == 12
        got = t.column("features").combine_chunks().values.to_numpy(zero_copy_only=False).reshape(12, -1)
        np.testing.assert_array_equal(got, c.features(dtype=np.float16))


def test_parquet_export_without_pyarrow_names_the_extra(deleted, tmp_path, monkeypatch, run_cli):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    r = run_cli("cache", "export", deleted, tmp_path / "x")
    assert r.exit_code == 1 and "pip install '.[parquet]'" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "x").exists()


def test_parquet_export_refuses_a_folder_with_other_files(deleted, tmp_path, run_cli):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    r = run_cli("cache", "export", deleted, dest)
    assert r.exit_code == 1 and "not an earlier Parquet export" in r.output
    assert (dest / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", [["compact"], ["migrate"], ["export", "DIR"], ["verify"]])
def test_errors_for_a_missing_cache_and_a_file_that_is_not_one(tmp_path, run_cli, command):
    def run(cache: Path):  # type: ignore[no-untyped-def]
        args = [str(tmp_path / "x") if a == "DIR" else a for a in command[1:]]
        return run_cli("cache", command[0], cache, *args)

    r = run(tmp_path / "nope.h5")
    assert r.exit_code == 1 and "does not exist" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "nope.h5.lock").exists()  # nothing made beside a missing cache
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5")
    r = run(text)
    assert r.exit_code == 1 and "not a readable HDF5 feature cache" in r.output
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = [1, 2]
    r = run(other)
    assert r.exit_code == 1 and "not a headstart feature cache" in r.output


def test_the_new_commands_have_help_and_are_in_the_readme(run_cli):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    for command in ("compact", "migrate", "export"):
        r = run_cli("cache", command, "--help")
        assert r.exit_code == 0 and len(r.output) > 200
        assert f"headstart cache {command}" in readme
