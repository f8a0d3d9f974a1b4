"""Peak memory and speed of a streaming read of a segmented cache, in a fresh process.

    python bench/read_memory.py --n 100000 1000000 [--dim 1280] [--workdir /tmp/...]
                                [--before DIR] [--delete even] [--rounds 2]

For each N: a cache of N synthetic float16 rows (segments of 8,192 rows) built once through
the store API (as ``bench/store_scale.py``), optionally with 30 % of its rows deleted evenly
(``--delete even``: rows no longer contiguous in their segments, about N / 10 mappings), then
each reader in a process of its own (``python -c``, exec'd: its ``VmHWM`` from
``/proc/self/status`` is its own, not a forked copy of this one's) that streams the whole cache
with ``Cache.iter_features(65536)`` as float16 and as float32 and prints its peak RSS, its RSS
after opening, the rows/s and the file descriptors open at the end of the stream. ``--before
DIR``: also run the readers with ``DIR`` (e.g. ``git archive COMMIT | tar -x -C DIR``) first on
``PYTHONPATH``, interleaved with this tree, ``--rounds`` times. After the stream (and its
peak), each reader also times ``Cache.features`` of 20,000 random rows (sorted), as
``fit-head``'s row sources and ``audit`` ask for them. ``--keep`` / ``--reuse``: keep
the caches built, read the ones kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import store_scale as ss

READER = r"""
import json, os, sys, time
import numpy as np
import pipeline
from pipeline.cache.store import Cache

def status(key):
    return int([l.split()[1] for l in open('/proc/self/status') if l.startswith(key)][0]) * 1024

path, dtype = sys.argv[1], np.dtype(sys.argv[2])
base = status('VmRSS')
t = time.perf_counter()
rows, total = 0, 0.0
with Cache(path) as c:
    opened = status('VmRSS')
    for _, chunk in c.iter_features(65536, dtype=dtype):
        rows += len(chunk)
        total += float(chunk[:, 0].astype(np.float64).sum())
    fds = len(os.listdir('/proc/self/fd'))
    s = time.perf_counter() - t
    hwm = status('VmHWM')
    pick = np.sort(np.random.default_rng(0).choice(c.n_rows, min(20000, c.n_rows), replace=False))
    t = time.perf_counter()
    c.features(pick, dtype=dtype)
    pick_s = time.perf_counter() - t
tree = os.path.dirname(os.path.dirname(pipeline.__file__))
print(json.dumps(dict(tree=tree, rows=rows, s=s, rows_s=rows / s, hwm=hwm, base=base, opened=opened, fds=fds,
                      checksum=total, pick_rows_s=len(pick) / pick_s)))
"""


def _reader(out: Path, dtype: str, tree: Path | None) -> dict:
    root = tree or Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root))
    # cwd: ``python -c`` puts the working directory first on sys.path, ahead of PYTHONPATH.
    r = subprocess.run(
        [sys.executable, "-c", READER, str(out.resolve()), dtype],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        check=False,
    )
    if r.returncode:
        raise SystemExit(r.stderr)
    return dict(json.loads(r.stdout.splitlines()[-1]), load=os.getloadavg()[0])


def build(n: int, dim: int, workdir: Path, delete: str | None, reuse: bool = False) -> Path:
    root = workdir / f"read-memory-{n}-{delete or 'all'}"
    if reuse and (root / "features.h5").is_file():
        return root / "features.h5"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    out = root / "features.h5"
    ss._make_keys(n)
    w = ss.Rows()
    ss._write(out, ss._fingerprint(dim), dim, 0, n, w)
    if delete == "even":
        ss._index_rows(out, dim, np.flatnonzero(np.arange(n) % 10 >= 3), w)
    else:
        ss._index(out, dim, n, w, 0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--workdir", default="artifacts/bench")
    ap.add_argument("--before", type=Path, default=None, help="an older tree to compare with")
    ap.add_argument("--delete", choices=["even"], default=None)
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--keep", action="store_true", help="keep the cache built")
    ap.add_argument("--reuse", action="store_true", help="read the cache an earlier --keep run left, if any")
    args = ap.parse_args()
    print(f"D = {args.dim} float16, segments of {ss.SEGMENT_ROWS} rows; load {os.getloadavg()[0]:.1f}", flush=True)
    trees: list[tuple[str, Path | None]] = [("after", None)]
    if args.before:
        trees.insert(0, ("before", args.before.resolve()))
    for n in args.n:
        out = build(n, args.dim, Path(args.workdir), args.delete, args.reuse)
        for rnd in range(args.rounds):
            for name, tree in trees:
                for dtype in ("float16", "float32"):
                    r = _reader(out, dtype, tree)
                    print(
                        f"N={n:>9,} {args.delete or 'all'} round {rnd + 1} {name:6} {dtype}: "
                        f"peak RSS {r['hwm'] / 1e6:,.0f} MB (imports {r['base'] / 1e6:.0f}, "
                        f"opened {r['opened'] / 1e6:.0f}) | {r['rows_s']:,.0f} rows/s "
                        f"({r['rows']:,} rows, {r['s']:.1f} s) | {r['fds']} fds open at the end | "
                        f"checksum {r['checksum']:.3f} | 20,000 random rows {r['pick_rows_s']:,.0f} rows/s | "
                        f"load {r['load']:.1f} | {r['tree']}",
                        flush=True,
                    )
        if not args.keep:
            shutil.rmtree(out.parent)


if __name__ == "__main__":
    main()
