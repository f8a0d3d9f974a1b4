"""The segmented feature cache at scale: synthetic rows through the real store API.

    python bench/store_scale.py [--n 100000 400000] [--dim 1280] [--workdir artifacts/bench]

For each N (float16 rows of ``--dim``; the backbone is not the point here), each in a fresh
process so its peak RSS is its own: a full build (segments of ``SEGMENT_ROWS`` rows as
``extract`` writes them, then the index); adding 5 % (new segments + a new index: time, bytes
written, and both as a share of the full build - the previous release rewrote the whole file,
a share of 1.0); a commit that only relabels (index only); peak RSS, and the part of it that
is the store's own (how far the RSS rose above what the caller already held, during segment
writes, during a commit and during a stream: that part should not grow with N); and the
streaming read
rate of ``Cache.iter_features`` (what ``fit-head`` streaming and ``similar`` use; the files
are in the page cache, so this is the decode rate, not the disk's). Then the cost of
compaction: 30 % of the rows are deleted evenly (every segment 30 % dead, over the 25 %
threshold, so every segment is rewritten: the worst case at that share), committed as
``extract`` would, and ``headstart cache compact`` runs as its own process (time, bytes
written and reclaimed, its peak RSS).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from pipeline.cache.index import IndexContents, RowLocations, StatTable, commit
from pipeline.cache.segments import DEFAULT_SEGMENT_ROWS as SEGMENT_ROWS
from pipeline.cache.segments import SegmentWriter
from pipeline.cache.store import Cache, segment_dir
from pipeline.models.fingerprint import Fingerprint

CLASSES = [f"class{k:02d}" for k in range(20)]
T = TypeVar("T")


def _fingerprint(dim: int) -> Fingerprint:
    """The tiny backbone's record with another width (built here: importing torch would add
    some 700 MB to the peak RSS measured)."""
    prep = {"crop": 32, "draft": True, "interpolation": "bilinear", "letterbox": False}
    prep.update(mean=[0.5] * 3, resize=40, std=[0.5] * 3)
    record = dict(backbone="synthetic", weights="random", weights_sha256="none", precision="fp32")
    return Fingerprint.from_record({**record, "preprocessing": json.dumps(prep), "feature_dim": dim}, source="bench")


_KEYS: tuple[list[str], list[str]] = ([], [])
_STAT: dict[str, np.ndarray] = {}


def _rows(start: int, n: int) -> tuple[list[str], list[str]]:
    """Keys as random as real content hashes (sequential ones would compress to nothing);
    made once by ``_make_keys``, outside the timings: generating them is not the store's cost."""
    return _KEYS[0][start : start + n], _KEYS[1][start : start + n]


def _make_keys(n: int) -> None:
    """The synthetic photos' keys, paths and stat entries (size, mtime, inode, device), as the
    caller of the store (``extract``'s scan) has them: keys and paths as Python lists of str,
    the stat fields as int64 arrays (statcache's columnar check), made outside the timings."""
    _KEYS[0][:] = [hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).hexdigest() for i in range(n)]
    _KEYS[1][:] = [f"{CLASSES[i % len(CLASSES)]}/photo-{i:09d}.jpg" for i in range(n)]
    i = np.arange(n, dtype=np.int64)
    _STAT.update(size=150_000 + (i * 7919) % 200_000, mtime_ns=1_700_000_000 * 10**9 + i, inode=i)
    _STAT.update(device=np.full(n, 2049, dtype=np.int64))


class Rows:
    """Where the synthetic rows went, in the order they were written (row k of the catalog is
    the k-th row added): the segment names in order and each one's row count, as the
    ``SegmentWriter`` reports them. The caller keeps them as arrays, as the store takes them."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.counts: list[int] = []

    def locations(self, rows: np.ndarray | None = None) -> RowLocations:
        """Of every row written so far, or of the catalog rows ``rows`` (ascending)."""
        counts = np.array(self.counts, dtype=np.int64)
        seg = np.repeat(np.arange(len(counts), dtype=np.int32), counts)
        row = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        if rows is not None:
            seg, row = seg[rows], row[rows]
        return RowLocations(list(self.names), seg, row)

    @property
    def segment_rows(self) -> dict[str, int]:
        return dict(zip(self.names, self.counts, strict=True))


def _write(out: Path, fp: Fingerprint, dim: int, start: int, n: int, rows: Rows) -> None:
    rng = np.random.default_rng(start)
    w = SegmentWriter(out, fp, np.float16, dim, SEGMENT_ROWS)

    def rows_in() -> None:
        for a in range(start, start + n, 4096):
            k = min(4096, start + n - a)
            hashes, _ = _rows(a, k)
            w.add(hashes, rng.standard_normal((k, dim), dtype=np.float32).astype(np.float16))
        w.flush()

    _peak_above("segments", rows_in)
    rows.names += [s.name for s in w.segments]
    rows.counts += [s.n_rows for s in w.segments]


def _index(out: Path, dim: int, n: int, rows: Rows, shift: int) -> int:
    hashes, paths = _rows(0, n)
    stat = StatTable(path=paths, content_hash=hashes, **{k: v[:n] for k, v in _STAT.items()})
    c = IndexContents(
        content_hash=hashes,
        paths=paths,
        labels=(np.arange(n, dtype=np.int32) + shift) % len(CLASSES),
        class_names=CLASSES,
        attrs=dict(_fingerprint(dim).to_record()),
        location=rows.locations(),
        segment_rows=rows.segment_rows,
        dtype="float16",
        feature_dim=dim,
        stat=stat,
    )
    return _peak_above("commit", lambda: commit(out, c))


def _index_rows(out: Path, dim: int, keep: np.ndarray, rows: Rows) -> int:
    """An index holding only the rows ``keep``: what extract commits once the others are deleted."""
    hashes, paths = _rows(0, int(keep[-1]) + 1)
    c = IndexContents(
        content_hash=[hashes[i] for i in keep.tolist()],
        paths=[paths[i] for i in keep.tolist()],
        labels=(keep % len(CLASSES)).astype(np.int32),
        class_names=CLASSES,
        attrs=dict(_fingerprint(dim).to_record()),
        location=rows.locations(keep),
        segment_rows=rows.segment_rows,
        dtype="float16",
        feature_dim=dim,
    )
    return commit(out, c)


def _compact_cost(out: Path, dim: int, total: int, rows: Rows) -> dict:
    """Delete 30 % of the rows evenly, then run ``headstart cache compact`` as its own process."""
    keep = np.flatnonzero(np.arange(total) % 10 >= 3)
    t0 = time.perf_counter()
    _index_rows(out, dim, keep, rows)
    delete_s = time.perf_counter() - t0
    before = _disk_bytes(out)
    old = {p.name for p in segment_dir(out).glob("seg-*.h5")}
    t0 = time.perf_counter()
    # The CLI command in a process of its own that reports its own peak RSS: VmHWM, which starts
    # afresh at exec. ru_maxrss (also RUSAGE_CHILDREN) carries over the forked copy of this
    # process, gigabytes here, across the exec.
    code = (
        "import sys; from pipeline.cli import cli; "
        "cli.main(['cache', 'compact', sys.argv[1]], standalone_mode=False); "
        "print([line.split()[1] for line in open('/proc/self/status') if line.startswith('VmHWM')][0])"
    )
    r = subprocess.run([sys.executable, "-c", code, str(out)], check=True, capture_output=True, text=True)
    compact_s = time.perf_counter() - t0
    new = [p for p in segment_dir(out).glob("seg-*.h5") if p.name not in old]
    with Cache(out) as c:
        assert c.n_rows == len(keep) and sum(c.segment_rows.values()) == len(keep), r.stdout
    return dict(
        delete_s=delete_s,
        compact_s=compact_s,
        compact_rows=len(keep),
        compact_written=sum(p.stat().st_size for p in new) + out.stat().st_size,
        compact_reclaimed=before - _disk_bytes(out),
        compact_before=before,
        compact_rss=int(r.stdout.split()[-1]) * 1024,
        compact_line=r.stdout.splitlines()[0],
    )


def _stream(out: Path, dtype: Any) -> int:
    rows = 0
    with Cache(out) as c:
        for _, chunk in c.iter_features(65536, dtype=dtype):
            rows += len(chunk)
    return rows


def _vm(key: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (the peak since the last :func:`_reset_peak`) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))


PEAKS = {"segments": 0, "commit": 0, "read": 0}


def _peak_above(phase: str, work: Callable[[], T]) -> T:
    """``work()``, keeping in ``PEAKS[phase]`` the most its peak RSS rose above the RSS it
    started at: the store's own memory, apart from what the caller already holds."""
    _reset_peak()
    before = _vm("VmRSS")
    out = work()
    PEAKS[phase] = max(PEAKS[phase], _vm("VmHWM") - before)
    return out


def _reset_peak() -> None:
    """Start ``VmHWM`` afresh from the current RSS (Linux: clear_refs 5), so each phase's peak
    is its own."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _disk_bytes(out: Path) -> int:
    return out.stat().st_size + sum(p.stat().st_size for p in segment_dir(out).glob("seg-*.h5"))


def one(n: int, dim: int, workdir: Path, compaction: bool = True) -> dict[str, float]:
    root = workdir / f"store-{n}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = root / "features.h5"
    fp = _fingerprint(dim)
    k = n // 20
    base_rss = _vm("VmRSS")
    _make_keys(n + k)
    inputs_rss = _vm("VmRSS")  # the caller's per-row metadata: keys, paths, stat entries

    written = Rows()
    t0 = time.perf_counter()
    _write(out, fp, dim, 0, n, written)
    _index(out, dim, n, written, 0)
    full_s = time.perf_counter() - t0
    full_bytes = _disk_bytes(out)

    before = {p.name for p in segment_dir(out).glob("seg-*.h5")}
    t0 = time.perf_counter()
    _write(out, fp, dim, n, k, written)
    t_index = time.perf_counter()
    index_bytes = _index(out, dim, n + k, written, 0)
    add_s = time.perf_counter() - t0
    add_index_s = time.perf_counter() - t_index
    add_bytes = index_bytes + sum(p.stat().st_size for p in segment_dir(out).glob("seg-*.h5") if p.name not in before)

    t0 = time.perf_counter()
    relabel_bytes = _index(out, dim, n + k, written, 1)
    relabel_s = time.perf_counter() - t0

    write_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # builds and commits only
    rates = []
    for dtype in (np.float16, np.float32):  # as stored; as fit-head gets it (numpy's f16 -> f32 is slow)
        t0 = time.perf_counter()
        rows = _peak_above("read", lambda dtype=dtype: _stream(out, dtype))
        rates.append(rows / (time.perf_counter() - t0))
    assert rows == n + k
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    compacted = _compact_cost(out, dim, n + k, written) if compaction else {}
    result = dict(
        n=n,
        full_s=full_s,
        full_bytes=full_bytes,
        add_s=add_s,
        add_index_s=add_index_s,
        add_bytes=add_bytes,
        relabel_s=relabel_s,
        relabel_bytes=relabel_bytes,
        read_rows_s=rates[0],
        read_f32_rows_s=rates[1],
        read_mb_s=rates[0] * dim * 2 / 1e6,
        peak_rss=rss,
        write_rss=write_rss,
        inputs_rss=inputs_rss - base_rss,
        store_segments_rss=PEAKS["segments"],
        store_commit_rss=PEAKS["commit"],
        store_read_rss=PEAKS["read"],
        index_bytes=index_bytes,
        segments=len(written.names),
        **compacted,
    )
    shutil.rmtree(root, ignore_errors=True)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000, 400_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--workdir", default="artifacts/bench")
    ap.add_argument("--no-compact", action="store_true", help="skip the deletion and compaction part")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one(args.n[0], args.dim, Path(args.workdir), not args.no_compact)))
        return
    print(f"D = {args.dim} float16, segments of {SEGMENT_ROWS} rows; load {os.getloadavg()[0]:.1f}")
    for n in args.n:
        cmd = [sys.executable, __file__, "--one", "--n", str(n), "--dim", str(args.dim), "--workdir", args.workdir]
        cmd += ["--no-compact"] if args.no_compact else []
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        print(
            f"N={n:>9,}: full build {r['full_s']:.2f} s, {r['full_bytes'] / 1e6:.0f} MB ({r['segments']} segments) | "
            f"+5 %: {r['add_s']:.2f} s ({r['add_s'] / r['full_s']:.3f} of full; index {r['add_index_s']:.2f} s), "
            f"{r['add_bytes'] / 1e6:.1f} MB ({r['add_bytes'] / r['full_bytes']:.3f} of full; "
            f"index {r['index_bytes'] / 1e6:.1f} MB) | relabel {r['relabel_s']:.2f} s, "
            f"{r['relabel_bytes'] / 1e6:.1f} MB | peak RSS {r['write_rss'] / 1e6:.0f} MB writing, "
            f"{r['peak_rss'] / 1e6:.0f} MB with 65536-row reads; of it the caller's per-row metadata "
            f"{r['inputs_rss'] / 1e6:.0f} MB ({r['inputs_rss'] / (n + n // 20):.0f} B/row); the store's own "
            f"peak above what its caller holds: {r['store_segments_rss'] / 1e6:.0f} MB writing segments, "
            f"{r['store_commit_rss'] / 1e6:.0f} MB in a commit, {r['store_read_rss'] / 1e6:.0f} MB in a 65536-row "
            "stream | "
            f"read {r['read_rows_s']:,.0f} rows/s ({r['read_mb_s']:.0f} MB/s), "
            f"as float32 {r['read_f32_rows_s']:,.0f} rows/s"
        )
        if args.no_compact:
            continue
        print(
            f"{'':13}delete 30 % evenly: commit {r['delete_s']:.2f} s | cache compact (own process): "
            f"{r['compact_s']:.2f} s = {r['compact_s'] / r['full_s']:.3f} of a full build, copied "
            f"{r['compact_rows']:,} rows ({r['compact_rows'] / r['compact_s']:,.0f} rows/s), wrote "
            f"{r['compact_written'] / 1e6:.0f} MB, reclaimed {r['compact_reclaimed'] / 1e6:.0f} MB of "
            f"{r['compact_before'] / 1e6:.0f} MB, peak RSS {r['compact_rss'] / 1e6:.0f} MB"
        )
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
