"""Damaged or hand-made feature caches (issue 18 item 9) and a first extract that was
interrupted before it wrote an index (issue 17 item 13).

Every damage is made with h5py on a copy of a real cache: one extracted here in schema v2
(index + segments) and the release-0.1.0 file in schema v1. Each reader is run as a user runs
it (the click CLI); the promise is one ``Error:`` that names the dataset and says to run
``headstart cache verify`` and extract with ``--rebuild``, never a traceback. The interrupted
extract is a real ``python -m pipeline extract`` killed by the project's own crash points.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import copy_sample_photos

from pipeline.cache.segments import write_segment
from pipeline.cache.store import Cache, segment_dir, writer_lock
from pipeline.config import ExtractConfig
from pipeline.extract import extract

RELEASE_0_1_0 = Path(__file__).parents[1] / "data" / "release-0.1.0" / "features.h5"
OPTS = ["--backbone", "tiny", "--precision", "fp32", "--workers", "0", "--batch-size", "8", "--no-progress"]


def _cfg(images: Path, out: Path, **kw: object) -> ExtractConfig:
    base: dict[str, object] = dict(backbone="tiny", precision="fp32", workers=0, batch_size=8, progress=False)
    base.update(kw)
    return ExtractConfig(images=str(images), out=str(out), **base)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def v2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cache, images): 18 real photos of 3 classes, extracted in schema v2."""
    root = tmp_path_factory.mktemp("v2")
    images = copy_sample_photos(root / "images")
    out = root / "features.h5"
    extract(_cfg(images, out))
    return out, images


def _copy(src: Path, dst_dir: Path) -> Path:
    """The cache file and its segment folder, as a user copies a cache."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    shutil.copy(src, dst)
    if segment_dir(src).is_dir():
        shutil.copytree(segment_dir(src), segment_dir(dst))
    return dst


def _replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def _labels_out_of_range(f: h5py.File) -> None:
    labels = f["labels"][()]
    labels[0], labels[1] = 99, -7
    f["labels"][...] = labels


def _rows(f: h5py.File) -> int:
    return int(f["features"].shape[0])


# damage -> (what it does to the file, what the error must name)
DAMAGES: dict[str, tuple[Callable[[h5py.File], None], str]] = {
    "labels out of range": (_labels_out_of_range, "outside -1 .. 2"),
    "lying n_rows": (lambda f: f.attrs.__setitem__("n_rows", 1000), "attribute n_rows is 1000 but /features has"),
    "schema_version abc": (lambda f: f.attrs.__setitem__("schema_version", "abc"), "schema_version is 'abc'"),
    "1-D features": (lambda f: _replace(f, "features", np.zeros(_rows(f), np.float16)), "/features has shape ("),
    "3-D features": (lambda f: _replace(f, "features", np.zeros((_rows(f), 4, 8), np.float16)), "/features has shape"),
    "string features": (
        lambda f: _replace(f, "features", np.array([[b"x"]] * _rows(f))),
        "/features holds |S1, not floating-point numbers",
    ),
    "no /labels": (lambda f: f.__delitem__("labels"), "/labels is missing"),
    "no /paths": (lambda f: f.__delitem__("paths"), "/paths is missing"),
    "no /class_names": (lambda f: f.__delitem__("class_names"), "/class_names is missing"),
    "no /content_hash": (lambda f: f.__delitem__("content_hash"), "/content_hash is missing"),
    "no /skipped": (lambda f: f.__delitem__("skipped"), "/skipped is missing"),
    "float labels": (
        lambda f: _replace(f, "labels", f["labels"][()].astype(np.float32) + 0.5),
        "/labels holds float32",
    ),
    "short /paths": (lambda f: _replace(f, "paths", f["paths"][()][:-3]), "/paths has"),
    "int class names": (lambda f: _replace(f, "class_names", np.arange(3)), "/class_names holds int64, not strings"),
}
V2_ONLY = {"no /location": (lambda f: f.__delitem__("location"), "/location is missing")}


def _cases() -> list[tuple[str, str]]:
    return [(s, d) for s in ("v1", "v2") for d in DAMAGES] + [("v2", d) for d in V2_ONLY]


def _damaged(schema: str, damage: str, v2: tuple[Path, Path], tmp_path: Path) -> Path:
    src = RELEASE_0_1_0 if schema == "v1" else v2[0]
    cache = _copy(src, tmp_path / "cache")
    with h5py.File(cache, "r+") as f:
        {**DAMAGES, **V2_ONLY}[damage][0](f)
    return cache


def _assert_error(r, *needles: str) -> str:  # type: ignore[no-untyped-def]
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: "), r.output
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, (n, r.output)
    return str(r.output)


@pytest.mark.parametrize(("schema", "damage"), _cases())
def test_every_reader_refuses_a_damaged_cache_with_one_error(schema, damage, v2, tmp_path, run_cli):
    cache = _damaged(schema, damage, v2, tmp_path)
    named = {**DAMAGES, **V2_ONLY}[damage][1]
    photo = sorted((v2[1] / "bag").glob("*.png"))[0]
    for args in (
        ("fit-head", cache, "--out", tmp_path / "head"),
        ("similar", photo, "--cache", cache),
        ("cache", "info", cache),
        ("cache", "info", cache, "--json"),
    ):
        _assert_error(run_cli(*args), named, f"headstart cache verify {cache}", "--rebuild")
    assert not (tmp_path / "head").exists()
    # verify lists the same problem as a verdict (it is the command the others point at)
    _assert_error(run_cli("cache", "verify", cache), "failed verification", named, "--rebuild")


def test_extract_refuses_a_damaged_cache_and_rebuild_repairs_it(v2, tmp_path, run_cli):
    cache = _damaged("v2", "float labels", v2, tmp_path)
    _assert_error(run_cli("extract", v2[1], "--out", cache, *OPTS), "/labels holds float32", "--rebuild")
    r = run_cli("extract", v2[1], "--out", cache, *OPTS, "--rebuild")
    assert r.exit_code == 0, r.output
    assert "OK (18 rows" in run_cli("cache", "verify", cache).output


@pytest.mark.parametrize("schema", ["v1", "v2"])
def test_nan_features_are_an_error_in_every_reader_that_uses_them(schema, v2, tmp_path, run_cli):
    cache = _copy(RELEASE_0_1_0 if schema == "v1" else v2[0], tmp_path / "cache")
    with h5py.File(cache, "r+") as f:  # through the virtual dataset, into the segment (v2)
        x = f["features"][()]
        x[3, 0] = np.nan
        f["features"][...] = x
    photo = sorted((v2[1] / "bag").glob("*.png"))[0]
    for args in (("fit-head", cache, "--out", tmp_path / "head"), ("similar", photo, "--cache", cache)):
        _assert_error(run_cli(*args), "1 row(s) have features that are not finite numbers: row 3", "--rebuild")
    _assert_error(run_cli("cache", "verify", cache), "1 row(s) of /features contain NaN or inf")
    # cache info reads no feature: it still describes the file (opening is O(1) in the rows)
    r = run_cli("cache", "info", cache, "--json")
    assert r.exit_code == 0 and json.loads(r.output)["rows"] == (12 if schema == "v1" else 18)


def test_opening_a_cache_reads_no_feature_bytes(v2, tmp_path, run_cli):
    """Every chunk of every segment is unreadable (checksums broken), yet opening and describing
    the cache work: the check at open looks at metadata only, and the damage is an Error where
    the features are read."""
    cache = _copy(v2[0], tmp_path / "cache")
    for seg in segment_dir(cache).glob("seg-*.h5"):
        with h5py.File(seg, "r") as f:
            offset, size = f["features"].id.get_offset(), f["features"].id.get_storage_size()
        if offset is None:  # chunked: find the first chunk
            with h5py.File(seg, "r") as f:
                info = f["features"].id.get_chunk_info(0)
                offset, size = info.byte_offset, info.size
        data = bytearray(seg.read_bytes())
        for i in range(offset, offset + min(size, 64)):
            data[i] ^= 0xFF
        seg.write_bytes(bytes(data))
    with Cache(cache) as c:
        assert c.n_rows == 18 and len(c.labels) == 18
    assert run_cli("cache", "info", cache).exit_code == 0
    _assert_error(run_cli("fit-head", cache, "--out", tmp_path / "head"), "a segment is damaged", "--rebuild")


# --------------------------------------------------------------------------- issue 17 item 13


def _extract_killed_at(point: str, images: Path, out: Path) -> None:
    env = {**os.environ, "HEADSTART_COMMIT_ROWS": "8", "HEADSTART_COMMIT_SECONDS": "3600", "HEADSTART_CRASH_AT": point}
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "extract", str(images), "--out", str(out), *OPTS],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert not out.exists()  # killed before its first index


def test_cache_info_shows_an_interrupted_first_extract(v2, tmp_path, run_cli):
    images = v2[1]
    out = tmp_path / "features.h5"
    _extract_killed_at("segment-written:2", images, out)  # two segments of 8 rows, no index
    r = run_cli("cache", "info", out)
    assert r.exit_code == 0, r.output
    assert (
        "no index yet: 2 finished segments with 16 rows from an interrupted extract; run extract again to resume"
        in r.output
    )
    assert "backbone      tiny" in r.output
    d = json.loads(run_cli("cache", "info", out, "--json").output)
    assert d["index"] is False and d["state"] == "interrupted" and d["segments"] == 2 and d["unindexed_rows"] == 16
    # a reader says the same, instead of "does not exist"
    _assert_error(run_cli("fit-head", out, "--out", tmp_path / "head"), "has no index yet", "2 finished segment(s)")
    # ... and what it says is true: the re-run adopts the 16 rows and finishes
    s = extract(_cfg(images, out))
    assert s.rows == 18 and s.extracted == 2
    d = json.loads(run_cli("cache", "info", out, "--json").output)
    assert d["rows"] == 18 and d["unindexed_rows"] == 0


def test_cache_info_shows_the_temporaries_of_a_killed_first_extract(v2, tmp_path, run_cli):
    out = tmp_path / "features.h5"
    _extract_killed_at("segment-writing:2", v2[1], out)  # one segment, one half-written
    r = run_cli("cache", "info", out)
    assert r.exit_code == 0, r.output
    assert "no index yet: 1 finished segment with 8 rows from an interrupted extract" in r.output
    assert "temporaries   1 half-written file(s) of a killed writer, removed by the next extract" in r.output


def test_cache_info_shows_a_first_extract_that_is_running(v2, tmp_path, run_cli):
    out = tmp_path / "features.h5"
    with Cache(v2[0]) as c:
        fp = c.fingerprint
    with writer_lock(out):  # a writer holds the lock and has finished one segment
        write_segment(out, fp, ["0" * 32], np.zeros((1, 32), np.float16))
        r = run_cli("cache", "info", out)
        assert r.exit_code == 0, r.output
        assert f"1 finished segment with 1 row from an extract that is running now (pid {os.getpid()})" in r.output
    r = run_cli("cache", "info", out)  # the writer is gone: the same files are unfinished work
    assert "from an interrupted extract; run extract again to resume" in r.output
