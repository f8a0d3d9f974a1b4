"""An unchanged re-run of ``extract``: the stat cache against reading and hashing every file.

    python bench/rerun_unchanged.py [--files 20000] [--kb 200] [--workdir artifacts/bench] [--keep]
                                    [--previous-release TREE]

Makes a folder of ``--files`` distinct PNG files in 10 class folders (8x8 pixels, padded with
a private ancillary chunk to ``--kb`` KB; 200 KB is the issue's 2 TB for 10 M photos; ``--kb 0``
makes tiny files of about 150 bytes, as for the issue's folder of 100,000), so
hashing has photo-like bytes to read while decoding stays cheap. Extracts it once with the
``tiny`` backbone, then times, in the same process and interleaved: the unchanged re-run
(the stat cache: one ``stat`` per file, no file read) and the same re-run with ``--rehash``
(every byte read and hashed, as the previous release did on every run; it also rewrote the
whole cache, which 32-wide rows make negligible here). Prints both, their ratio and the
files/s the unchanged re-run checked. ``--previous-release TREE`` (a checkout of the release
before the segmented cache, ``git archive e6d03dd^``) also times that release's re-run of the
same folder, in a process of its own.
"""

from __future__ import annotations

import argparse
import os
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

from pipeline.cache import statcache
from pipeline.cache.previous import read_previous
from pipeline.config import ExtractConfig
from pipeline.data.catalog import discover
from pipeline.extract import extract


def _png(i: int, pad: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes((i * 7 + x * 31 + y * 17) % 256 for x in range(8 * 3)) for y in range(8))
    ihdr = struct.pack(">IIBBBBB", 8, 8, 8, 2, 0, 0, 0)
    pad = max(pad, 8)  # the file's number in it: every file distinct, even with --kb 0 (about 150 bytes)
    filler = (i.to_bytes(8, "little") * (pad // 8 + 1))[:pad]
    body = chunk(b"IHDR", ihdr) + chunk(b"hsPd", filler) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def make_folder(root: Path, n: int, kb: int) -> None:
    t = time.time_ns() - 3600 * 10**9  # an hour ago: older than the stat cache's racy window
    for i in range(n):
        d = root / f"class{i % 10}"
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"img-{i:07d}.png"
        p.write_bytes(_png(i, kb * 1024))
        os.utime(p, ns=(t, t))


# The previous release's extract, in a process of its own run from its tree (``python -c`` puts
# the working directory first on sys.path): built once (untimed, its own cache: the release
# wrote schema v1), then the re-run of the unchanged folder, timed in the process.
_PREVIOUS = r"""
import sys, time
from pipeline.config import ExtractConfig
from pipeline.extract import extract
import pipeline
assert pipeline.__file__.startswith(sys.argv[3]), pipeline.__file__
cfg = ExtractConfig(images=sys.argv[1], out=sys.argv[2], backbone="tiny", precision="fp32", workers=0,
                    batch_size=64, progress=False)
extract(cfg)
t = time.perf_counter(); s = extract(cfg); print(time.perf_counter() - t, s.extracted)
"""


def _previous_release(tree: Path, images: Path, out: Path) -> float:
    tree = tree.resolve()
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run(
        [sys.executable, "-c", _PREVIOUS, str(images.resolve()), str(out.resolve()), str(tree)],
        check=True, capture_output=True, text=True, env=env, cwd=tree,
    )  # fmt: skip
    seconds, extracted = r.stdout.split()[-2:]
    assert extracted == "0", r.stdout
    return float(seconds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--kb", type=int, default=200, help="size of each file")
    ap.add_argument("--workdir", default="artifacts/bench")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the folder and cache, and reuse them next time")
    ap.add_argument(
        "--previous-release",
        metavar="TREE",
        help="a checkout of the previous release (`git archive e6d03dd^`): time its re-run of the same folder too",
    )
    args = ap.parse_args()
    root = Path(args.workdir) / f"rerun-{args.files}-{args.kb}"
    images = root / "images"
    out = root / "features.h5"
    if not (args.keep and out.is_file()):  # a kept folder of the same settings is reused as it is
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        make_folder(images, args.files, args.kb)
        print(f"made {args.files} files of {args.kb} KB in {time.perf_counter() - t0:.1f} s")

    def run(rehash: bool) -> tuple[float, int]:
        opts = dict(backbone="tiny", precision="fp32", workers=0, batch_size=64, progress=False)
        cfg = ExtractConfig(images=str(images), out=str(out), rehash=rehash, **opts)  # type: ignore[arg-type]
        t = time.perf_counter()
        s = extract(cfg)
        return time.perf_counter() - t, s.extracted

    first, n = run(False)
    print(f"first extraction: {n} rows in {first:.1f} s" + (" (kept from an earlier run)" if n == 0 else ""))
    stat_t, hash_t = [], []
    for _ in range(args.repeats):  # interleaved pairs: load on a shared machine hits both
        t, k = run(False)
        assert k == 0
        stat_t.append(t)
        t, k = run(True)
        assert k == 0
        hash_t.append(t)
    # The same two, for the file check alone (statcache.hash_files), without discovery,
    # model load and the index commit that every run pays.
    previous = read_previous(out, rebuild=False)
    assert previous is not None
    cat = discover(images)
    files, rels = [it.file for it in cat.items], [it.rel for it in cat.items]
    check: dict[bool, float] = {}
    for rehash in (False, True, False, True):
        t = time.perf_counter()
        statcache.hash_files(files, rels, previous.stat, rehash=rehash, progress=False)
        check[rehash] = min(check.get(rehash, 1e9), time.perf_counter() - t)
    s, h = min(stat_t), min(hash_t)
    print(f"unchanged re-run (stat cache): {s:.2f} s, {args.files / s:,.0f} files/s checked")
    print(f"same re-run with --rehash:     {h:.2f} s, {args.files / h:,.0f} files/s")
    print(f"ratio: {h / s:.1f}x faster end to end (target >= 20x)")
    print(
        f"file check alone: stat cache {check[False]:.3f} s ({args.files / check[False]:,.0f} files/s), "
        f"hashing every file {check[True]:.2f} s: {check[True] / check[False]:.0f}x"
    )
    if args.previous_release:
        before = _previous_release(Path(args.previous_release), images, root / "previous-release.h5")
        print(
            f"previous release, same re-run: {before:.2f} s (hashing every file, rewriting the cache): "
            f"{before / s:.1f}x"
        )
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
