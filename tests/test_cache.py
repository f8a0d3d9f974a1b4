"""A cache you can trust: kill -9 at any moment, one writer, full disk, verify/info.

The extractor runs as a real ``python -m pipeline extract`` subprocess. Kills at exact
instants use ``HEADSTART_CRASH_AT`` (the process SIGKILLs itself at a named point, see
``cache.crash_point``); the slow test kills from outside at whatever moment it lands.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.cache.inspection import info, verify
from pipeline.cache.segments import unindexed_segments, write_segment
from pipeline.cache.store import Cache, segment_dir, writer_lock
from pipeline.config import ExtractConfig
from pipeline.data import SAMPLE_CATALOG
from pipeline.errors import CacheError
from pipeline.extract import extract

DATA = Path(__file__).parent / "data" / "images"
OPTS = ["--backbone", "tiny", "--precision", "fp32", "--workers", "0", "--batch-size", "8", "--no-progress"]


def _catalog(root: Path, per_class: int = 16) -> Path:
    """Real Fashion-MNIST photos in 3 classes, one identical copy and one broken file."""
    for cls in ("bag", "sneaker", "trouser"):
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE_CATALOG / "train" / cls).glob("*.png"))[:per_class]:
            shutil.copy(p, root / cls / p.name)
    first = sorted((root / "bag").glob("*.png"))[0]
    shutil.copy(first, root / "bag" / "copy-of-first.png")
    shutil.copy(DATA / "truncated_jpeg.jpg", root / "trouser" / "broken.jpg")
    return root


def _cfg(images: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(backbone="tiny", precision="fp32", workers=0, batch_size=8, progress=False)
    base.update(kw)
    return ExtractConfig(images=str(images), out=str(out), **base)


def _cli(
    images: Path, out: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (), **kw
) -> subprocess.CompletedProcess[str]:
    # Commit every 8 rows and never by time, so a loaded machine cannot change where batches end.
    full_env = {**os.environ, "HEADSTART_COMMIT_ROWS": "8", "HEADSTART_COMMIT_SECONDS": "3600", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline", "extract", str(images), "--out", str(out), *OPTS, *args],
        capture_output=True,
        text=True,
        env=full_env,
        timeout=300,
        **kw,
    )


def _snapshot(path: Path) -> dict[str, object]:
    """Everything that must be equal between an interrupted-and-resumed and a clean run."""
    with Cache(path) as c:
        assert not verify(path), verify(path)
        feats = c.features(dtype=np.float32)
        return {
            "rows": {h: (p, int(lab)) for h, p, lab in zip(c.content_hash, c.paths, c.labels, strict=True)},
            "features": {h: feats[i] for i, h in enumerate(c.content_hash)},
            "skipped": sorted(c.skipped),
            "duplicates": sorted(c.duplicates),
            "classes": c.class_names,
            "fingerprint": c.fingerprint,
        }


def _assert_same(got: dict[str, object], want: dict[str, object]) -> None:
    assert got["rows"] == want["rows"]  # same keys, paths, labels: nothing lost or duplicated
    for k in ("skipped", "duplicates", "classes", "fingerprint"):
        assert got[k] == want[k], k
    for h, f in want["features"].items():  # type: ignore[union-attr]
        np.testing.assert_array_equal(got["features"][h], f)  # type: ignore[index]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run over the catalog: 49 files, 48 distinct, 1 broken."""
    root = _catalog(tmp_path_factory.mktemp("ref") / "images")
    out = root.parent / "ref.h5"
    s = extract(_cfg(root, out))
    assert s.rows == 48 and len(s.skipped) == 1
    return root, _snapshot(out)


# Where to die. segment-written:2 = after the second finished segment; the others are the
# windows around writing a segment and the atomic replace of the index (the removal of
# segments a new index no longer uses: test_kill_9_while_removing_unused_segments).
FAST_POINTS = ["segment-written:2", "index-writing"]
SLOW_POINTS = ["segment-writing:3", "segment-before-rename:3", "index-before-rename", "index-replaced"]


def _segments(out: Path) -> list[Path]:
    d = segment_dir(out)
    return sorted(d.glob("seg-*.h5")) if d.is_dir() else []


def _temporaries(out: Path) -> list[Path]:
    d = segment_dir(out)
    return list(out.parent.glob(f".{out.name}.tmp-*")) + (list(d.glob(".seg-*.tmp-*")) if d.is_dir() else [])


def _crash_then_resume(reference, tmp_path: Path, point: str) -> None:
    root, want = reference
    images = tmp_path / "images"
    shutil.copytree(root, images, symlinks=True)
    out = tmp_path / "f.h5"
    r = _cli(images, out, env={"HEADSTART_CRASH_AT": point})
    assert r.returncode == -signal.SIGKILL, (point, r.returncode, r.stderr[-2000:])
    if point.startswith("segment-written"):
        assert not out.exists() and len(_segments(out)) == 2
    if point in ("index-writing", "segment-writing:3"):
        assert not out.exists() and _temporaries(out)  # a half-written temporary
    if point == "index-replaced":
        assert out.exists() and len(_segments(out)) == 6  # 48 rows, 8 a segment
    s = extract(_cfg(images, out))  # run it again
    assert not _temporaries(out)
    with Cache(out) as c:  # every segment left is one the index uses
        assert set(c.segments) == {p.name for p in _segments(out)}
    _assert_same(_snapshot(out), want)
    if point.startswith("segment-written"):
        assert s.extracted == 48 - 16  # the two finished segments (16 rows) are not redone


@pytest.mark.parametrize("point", FAST_POINTS)
def test_kill_9_then_resume_equals_an_uninterrupted_run(reference, tmp_path, point):
    _crash_then_resume(reference, tmp_path, point)


@pytest.mark.slow
@pytest.mark.parametrize("point", SLOW_POINTS)
def test_kill_9_at_more_points(reference, tmp_path, point):
    _crash_then_resume(reference, tmp_path, point)


@pytest.mark.slow
def test_kill_9_while_removing_unused_segments(reference, tmp_path):
    """A re-run under other decode limits tries the broken file again (an unchanged broken file
    is otherwise remembered, not decoded again); its skip-only segment is unused by the new index
    and removed after it. A kill right there leaves a valid cache; the next run cleans up."""
    root, want = reference
    images = tmp_path / "images"
    shutil.copytree(root, images, symlinks=True)
    out = tmp_path / "f.h5"
    extract(_cfg(images, out))
    r = _cli(images, out, env={"HEADSTART_CRASH_AT": "segments-removing"}, args=("--max-pixels", "50000000"))
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    _assert_same(_snapshot(out), want)  # the new index is in place and sound
    extract(_cfg(images, out))
    with Cache(out) as c:
        assert set(c.segments) == {p.name for p in _segments(out)}
    _assert_same(_snapshot(out), want)


@pytest.mark.slow
def test_kill_9_from_outside_repeatedly(reference, tmp_path):
    """kill -9 from another process as soon as the run has made progress, again and again,
    until a run finishes on its own; then the cache equals the uninterrupted one."""
    root, want = reference
    images = tmp_path / "images"
    shutil.copytree(root, images, symlinks=True)
    out = tmp_path / "f.h5"
    cmd = [sys.executable, "-m", "pipeline", "extract", str(images), "--out", str(out), *OPTS]
    env = {**os.environ, "HEADSTART_COMMIT_ROWS": "4", "HEADSTART_COMMIT_SECONDS": "0"}
    cmd[cmd.index("--batch-size") + 1] = "4"
    kills = 0
    for _attempt in range(30):
        before = len(_segments(out))
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        while proc.poll() is None:
            now = len(_segments(out))
            if now >= before + 2:  # progress made: two new segments finished
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.005)
        proc.wait(timeout=120)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
    assert kills >= 3 and proc.returncode == 0
    _assert_same(_snapshot(out), want)


# --------------------------------------------------------------------------- one writer


def test_second_writer_gets_an_error_while_readers_work(reference, tmp_path, run_cli):
    root, _ = reference
    out = tmp_path / "f.h5"
    extract(_cfg(root, out))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from pipeline.cache.store import writer_lock\n"
            "with writer_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)",
            str(out),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        r = run_cli("extract", root, "--out", out, *OPTS)
        assert r.exit_code == 1 and "Traceback" not in r.output
        assert f"Error: {out} is being written by pid {holder.pid}; wait for it to finish" in r.output
        with Cache(out) as c:  # readers are not blocked
            assert c.n_rows == 48
        assert run_cli("cache", "info", out).exit_code == 0
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the dead holder's lock: no stale lock file blocks the next writer.
    r = run_cli("extract", root, "--out", out, *OPTS)
    assert r.exit_code == 0, r.output
    with writer_lock(out):  # and it was released again after that run
        pass


# --------------------------------------------------------------------------- full disk


def _limit_file_size(limit: int):
    def apply() -> None:
        # Python ignores SIGXFSZ, so writing past the limit fails with EFBIG (errno 27), the
        # same path an ENOSPC takes through the writer.
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_gives_an_error_and_loses_nothing_committed(reference, tmp_path):
    root, want = reference
    images = tmp_path / "images"
    shutil.copytree(root, images, symlinks=True)
    moved = tmp_path / "later"
    moved.mkdir()
    for p in sorted((images / "sneaker").glob("*.png")):
        shutil.move(p, moved / p.name)
    out = tmp_path / "f.h5"
    first = extract(_cfg(images, out))
    assert first.rows == 32
    before = out.read_bytes()
    for p in moved.iterdir():
        shutil.move(p, images / "sneaker" / p.name)
    # The new segments (8 rows each) fit, the new index does not.
    limit = max(p.stat().st_size for p in _segments(out)) + 512
    assert out.stat().st_size > limit
    r = _cli(images, out, preexec_fn=_limit_file_size(limit))
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    assert f"Error: disk full while writing {out}" in r.stderr and "re-run the same command" in r.stderr
    assert out.read_bytes() == before  # the committed cache is untouched ...
    with Cache(out) as c:
        assert c.n_rows == 32 and not verify(out)
    assert info(out)["unindexed_rows"] == 16  # ... and the new rows wait in finished segments
    s = extract(_cfg(images, out))  # space freed: the same command finishes the job
    assert s.extracted == 0 and s.rows == 48
    _assert_same(_snapshot(out), want)


# --------------------------------------------------------------------------- verify & info


def test_info_and_verify(reference, tmp_path, run_cli):
    root, _ = reference
    out = tmp_path / "f.h5"
    extract(_cfg(root, out))
    r = run_cli("cache", "info", out, "--json")
    assert r.exit_code == 0
    d = json.loads(r.output)
    assert d["rows"] == 48 and d["classes"] == 3 and d["feature_dim"] == 32 and d["duplicates"] == 1
    assert d["rows_per_class"] == {"bag": 16, "sneaker": 16, "trouser": 16}
    assert d["fingerprint"]["backbone"] == "tiny" and d["fingerprint"]["precision"] == "fp32"
    assert d["skipped"][0]["path"] == "trouser/broken.jpg" and "truncated" in d["skipped"][0]["reason"]
    text = run_cli("cache", "info", out).output
    assert "48 rows x 32" in text and "backbone      tiny" in text and "trouser/broken.jpg" in text
    r = run_cli("cache", "verify", out)
    assert r.exit_code == 0 and "OK (48 rows x 32, 48 distinct content hashes" in r.output

    # Damage it in ways a bug or a foreign tool could: a duplicated key, a wrong count, a NaN.
    bad = tmp_path / "bad.h5"
    shutil.copy(out, bad)
    shutil.copytree(segment_dir(out), segment_dir(bad))
    with h5py.File(bad, "r+") as f:
        h = f["content_hash"][()]
        h[1] = h[0]
        f["content_hash"][...] = h
        f.attrs["n_rows"] = 47
        # The NaN goes into bad.h5's own copy of the segment, which its reader reads (writing
        # through the virtual /features would write into f.h5's segments: the source names are
        # the index's name when it was written).
        name = f["segments/name"][int(f["location/segment"][5])].decode()
        with h5py.File(segment_dir(bad) / name, "r+") as g:
            g["features"][int(f["location/row"][5]), 0] = np.nan
    problems = verify(bad)
    assert any("1 duplicate value(s) in /content_hash" in p for p in problems)
    assert any("n_rows is 47 but /features has 48 rows" in p for p in problems)
    assert any("1 row(s) of /features contain NaN" in p for p in problems)
    assert any("1 row(s) of the index point at a segment row with another content hash" in p for p in problems)
    r = run_cli("cache", "verify", bad)
    assert r.exit_code == 1 and "Error:" in r.output and "failed verification (4 problem(s))" in r.output

    # Not HDF5 at all, and a truncated HDF5 file: an Error, never a traceback.
    (tmp_path / "junk.h5").write_text("hello")
    r = run_cli("cache", "verify", tmp_path / "junk.h5")
    assert r.exit_code == 1 and "is not a readable HDF5 feature cache" in r.output
    (tmp_path / "cut.h5").write_bytes(out.read_bytes()[:3000])
    r = run_cli("cache", "info", tmp_path / "cut.h5")
    assert r.exit_code == 1 and "Error:" in r.output and "Traceback" not in r.output


def test_info_reports_unindexed_segments(reference, tmp_path):
    root, _ = reference
    images = tmp_path / "images"
    shutil.copytree(root, images, symlinks=True)
    out = tmp_path / "f.h5"
    extract(_cfg(images, out))
    with Cache(out) as c:
        fp = c.fingerprint
    write_segment(out, fp, ["0" * 32], np.zeros((1, 32), np.float16))
    assert info(out)["unindexed_rows"] == 1 and len(unindexed_segments(out, set())) == 2  # 48 rows in one


def test_fingerprint_mismatch_is_refused_with_what_differs(reference, tmp_path, run_cli):
    root, _ = reference
    out = tmp_path / "f.h5"
    extract(_cfg(root, out))
    r = run_cli("extract", root, "--out", out, *[o if o != "fp32" else "bf16" for o in OPTS])
    assert r.exit_code == 1
    assert (
        f"Error: {out} was extracted with tiny (random (seed 0), fp32) but this run uses tiny (random (seed 0), bf16) "
        "(precision: cache has fp32, this run uses bf16)" in r.output
    )
    assert "pass --rebuild to start the cache over" in r.output
    r = run_cli("extract", root, "--out", out, *OPTS, "--no-draft")
    assert r.exit_code == 1 and '"draft": true' in r.output and '"draft": false' in r.output
    # Only the switch that differs, not the whole preprocessing JSON twice (a 900-character line).
    assert max(len(line) for line in r.output.splitlines()) < 400, r.output
    with pytest.raises(CacheError, match="efficientnet_lite0"):
        extract(_cfg(root, out, backbone="efficientnet_lite0"))
    s = extract(_cfg(root, out, precision="bf16", rebuild=True))  # --rebuild: on purpose
    assert s.extracted == 48 and s.reused == 0 and len(s.skipped) == 1
    with Cache(out) as c:
        assert c.fingerprint.precision == "bf16"
