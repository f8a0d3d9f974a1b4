"""The segmented cache (schema v2): one HDF5 file for every reader, immutable checksummed
segments beside it, commits that cost the new rows, the stat cache, old caches converted."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import age_files, copy_sample_photos, extract_config

import pipeline.extract as extract_mod
from pipeline.cache import statcache
from pipeline.cache.inspection import info, verify
from pipeline.cache.store import SCHEMA_VERSION, Cache, segment_dir
from pipeline.data import SAMPLE_CATALOG
from pipeline.errors import CacheError
from pipeline.extract import extract

OLD = Path(__file__).parent / "data" / "release-0.1.0"
OPTS = ["--backbone", "tiny", "--precision", "fp32", "--workers", "0", "--batch-size", "8", "--no-progress"]


def _segments(out: Path) -> list[Path]:
    return sorted(segment_dir(out).glob("seg-*.h5"))


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    return copy_sample_photos(tmp_path / "images", per_class=10)


def test_plain_h5py_reads_one_file_from_anywhere_after_a_move_and_a_copy(catalog, tmp_path, monkeypatch):
    out = tmp_path / "cache" / "features.h5"
    extract(extract_config(catalog, out))
    with Cache(out) as c:
        want = c.features()
        hashes = c.content_hash
        assert c.schema_version == SCHEMA_VERSION == 2 and c.segments
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def check(path: Path) -> None:
        with h5py.File(path, "r") as f:
            for name in (
                "features",
                "content_hash",
                "paths",
                "labels",
                "class_names",
                "skipped/path",
                "skipped/reason",
                "duplicates/path",
                "duplicates/content_hash",
            ):
                assert name in f, name
            assert f["features"].is_virtual
            assert all(not s.file_name.startswith("/") for s in f["features"].virtual_sources())
            assert f.attrs["backbone"] == "tiny" and f.attrs["precision"] == "fp32"
            np.testing.assert_array_equal(f["features"][()].astype(np.float32), want)
            assert [h.decode() for h in f["content_hash"][()]] == hashes
        assert not verify(path)

    check(out)
    moved = shutil.move(tmp_path / "cache", tmp_path / "moved")
    check(Path(moved) / "features.h5")
    copied = shutil.copytree(Path(moved), tmp_path / "copied")
    shutil.rmtree(moved)  # the copy must not lean on the original
    check(Path(copied) / "features.h5")
    # The index alone, without its segments: an Error, never zeros read from missing files.
    shutil.copy(Path(copied) / "features.h5", elsewhere / "alone.h5")
    with pytest.raises(CacheError, match="segment file"):
        Cache(elsewhere / "alone.h5")


def test_a_commit_writes_the_new_rows_and_rewrites_no_old_segment(catalog, tmp_path):
    out = tmp_path / "f.h5"
    extract(extract_config(catalog, out))
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in _segments(out)}
    with Cache(out) as c:
        old = dict(zip(c.content_hash, c.features(), strict=True))
    for p in sorted((SAMPLE_CATALOG / "test" / "bag").glob("*.png"))[:4]:
        shutil.copy(p, catalog / "bag" / p.name)
    s = extract(extract_config(catalog, out))
    assert (s.extracted, s.reused) == (4, 30)
    after = _segments(out)
    assert len(after) == len(before) + 1  # one new segment
    for p in after:
        if p.name in before:
            assert (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) == before[p.name]
    with Cache(out) as c:
        got = dict(zip(c.content_hash, c.features(), strict=True))
    assert len(got) == 34
    for h, f in old.items():
        np.testing.assert_array_equal(got[h], f)
    # A deleted photo drops out of the index at once; its bytes stay until compaction.
    gone = sorted((catalog / "trouser").glob("*.png"))[0]
    gone.unlink()
    extract(extract_config(catalog, out))
    d = info(out)
    assert d["rows"] == 33 and d["dead_rows"] == 1 and not verify(out)


def _flip_chunk_bytes(segment: Path) -> None:
    with h5py.File(segment, "r") as f:
        ds = f["features"]
        assert ds.fletcher32
        chunk = ds.id.get_chunk_info(0)
    with open(segment, "r+b") as fh:
        fh.seek(chunk.byte_offset + 16)
        b = bytearray(fh.read(8))
        fh.seek(chunk.byte_offset + 16)
        fh.write(bytes(x ^ 0x5A for x in b))


def test_a_flipped_byte_in_a_segment_is_an_error(catalog, tmp_path, run_cli):
    out = tmp_path / "f.h5"
    extract(extract_config(catalog, out))
    seg = _segments(out)[0]
    _flip_chunk_bytes(seg)
    with Cache(out) as c, pytest.raises(CacheError, match="checksum"):
        c.features()
    problems = verify(out)
    assert any(f"segment {seg.name} is damaged" in p for p in problems), problems
    r = run_cli("cache", "verify", out)
    assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output
    r = run_cli("similar", catalog / "bag" / sorted(os.listdir(catalog / "bag"))[0], "--cache", out)
    assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output


def test_release_0_1_0_cache_is_read_then_converted_by_extract(tmp_path):
    cache = tmp_path / "features.h5"
    shutil.copy(OLD / "features.h5", cache)
    with Cache(cache) as c:
        assert c.schema_version == 1
        want = dict(zip(c.content_hash, c.features(), strict=True))
    photos = copy_sample_photos(tmp_path / "images", per_class=4)
    s = extract(extract_config(photos, cache))
    assert (s.rows, s.extracted, s.reused) == (12, 0, 12)
    with Cache(cache) as c:
        assert c.schema_version == 2 and len(c.segments) == 1
        got = dict(zip(c.content_hash, c.features(), strict=True))
    assert got.keys() == want.keys()
    for h, f in want.items():
        np.testing.assert_array_equal(got[h], f)
    assert not verify(cache)


def test_kill_9_while_converting_keeps_the_old_cache(tmp_path):
    cache = tmp_path / "features.h5"
    shutil.copy(OLD / "features.h5", cache)
    photos = copy_sample_photos(tmp_path / "images", per_class=4)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "extract", str(photos), "--out", str(cache), *OPTS],
        capture_output=True,
        text=True,
        env={**os.environ, "HEADSTART_CRASH_AT": "migrate-segment-written"},
        timeout=300,
    )
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert cache.read_bytes() == (OLD / "features.h5").read_bytes() and len(_segments(cache)) == 1
    s = extract(extract_config(photos, cache))
    assert (s.rows, s.extracted) == (12, 0) and not verify(cache)
    with Cache(cache) as c:
        assert {p.name for p in _segments(cache)} == set(c.segments)


def test_unchanged_rerun_reads_no_photo_bytes(catalog, tmp_path, monkeypatch):
    age_files(catalog)
    out = tmp_path / "f.h5"
    extract(extract_config(catalog, out))
    calls: list[str] = []
    real = statcache.hash_file

    def counting(path):  # type: ignore[no-untyped-def]
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(statcache, "hash_file", counting)
    s = extract(extract_config(catalog, out))
    assert calls == [] and (s.rows, s.extracted, s.reused) == (30, 0, 30)

    # A new mtime (touched) or a new size (rewritten): only those files are read again.
    touched, rewritten = sorted((catalog / "bag").glob("*.png"))[:2]
    os.utime(touched, ns=(touched.stat().st_atime_ns, touched.stat().st_mtime_ns - 10**9))
    mtime = rewritten.stat().st_mtime_ns
    shutil.copyfile(sorted((SAMPLE_CATALOG / "test" / "bag").glob("*.png"))[0], rewritten)
    os.utime(rewritten, ns=(mtime, mtime))  # the old mtime, a new size: still a stat change
    calls.clear()
    s = extract(extract_config(catalog, out))
    assert sorted(calls) == sorted([str(touched), str(rewritten)]) and s.extracted == 1

    calls.clear()
    s = extract(extract_config(catalog, out, rehash=True))
    assert len(calls) == 30 and s.extracted == 0


def test_an_unchanged_rerun_writes_no_index_and_a_relabel_does(catalog, tmp_path):
    age_files(catalog)
    out = tmp_path / "f.h5"
    extract(extract_config(catalog, out))
    before = out.stat()
    extract(extract_config(catalog, out))  # nothing changed: the index is left as it is
    after = out.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    moved = sorted((catalog / "bag").glob("*.png"))[0]
    moved.rename(catalog / "sneaker" / moved.name)
    s = extract(extract_config(catalog, out))
    assert s.relabelled == 1 and out.stat().st_ino != before.st_ino  # a new index, renamed into place
    with Cache(out) as c:
        assert c.labels[c.paths.index(f"sneaker/{moved.name}")] == c.class_names.index("sneaker")


def test_in_place_rewrite_with_same_size_and_mtime_needs_rehash(catalog, tmp_path):
    """The documented trade-off (as in git and rsync): same size, mtime and inode = unchanged."""
    age_files(catalog)
    out = tmp_path / "f.h5"
    extract(extract_config(catalog, out))
    a = sorted((catalog / "bag").glob("*.png"))[0]
    st = a.stat()
    data = bytearray(a.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    with open(a, "r+b") as fh:  # in place: same inode
        fh.write(data)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert extract(extract_config(catalog, out)).extracted == 0  # missed
    assert extract(extract_config(catalog, out, rehash=True)).extracted == 1  # --rehash finds it


def test_new_rows_go_to_segments_as_they_come(catalog, tmp_path, monkeypatch):
    """Bounded memory: a segment every SEGMENT_ROWS rows, so no run holds all its new rows."""
    monkeypatch.setattr(extract_mod, "SEGMENT_ROWS", 8)
    sizes: list[int] = []
    real = extract_mod.SegmentWriter.flush

    def spy(self):  # type: ignore[no-untyped-def]
        sizes.append(self.pending)
        assert self.pending < 8 + 16  # never more than one segment plus one batch held
        real(self)

    monkeypatch.setattr(extract_mod.SegmentWriter, "flush", spy)
    out = tmp_path / "f.h5"
    extract(extract_config(catalog, out, batch_size=4))
    assert [n for n in sizes if n] == [8, 8, 8, 6]
    with Cache(out) as c:
        assert len(c.segments) == 4 and c.n_rows == 30
