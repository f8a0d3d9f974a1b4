"""Peak memory of ``cache compact``: per row and per virtual-dataset mapping.

    python bench/compact_memory.py N even|block [--workdir DIR]

A cache of N synthetic rows (D = 32) through the store API (as ``bench/store_scale.py``), 30 % of
the rows deleted either evenly (3 of every 10: about N / 10 runs of live rows, each one mapping of
the index's virtual ``/features`` before commit ``e88743b``, one mapping per 64 runs since) or as
one block per segment (one mapping per segment), then
``headstart cache compact`` in a process of its own that prints its ``VmHWM`` (peak resident
memory, which starts afresh at exec). Also the ``VmHWM`` of a process that only imports the CLI,
and of one that only opens the index's ``/features`` with h5py; and the rows/s of a process that
reads the deleted index's features through ``Cache.iter_features`` (float32) before compacting
(best of 3), and the seconds ``Cache(path)`` takes to open it (best of 3)."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import store_scale as ss

n, mode = int(sys.argv[1]), sys.argv[2]
workdir = Path(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--workdir" else Path("artifacts/bench")
dim = 32
root = workdir / f"compact-memory-{n}-{mode}"
shutil.rmtree(root, ignore_errors=True)
root.mkdir(parents=True)
out = root / "features.h5"
fp = ss._fingerprint(dim)
ss._make_keys(n)
w = ss.Rows()
ss._write(out, fp, dim, 0, n, w)
if mode == "even":
    keep = np.flatnonzero(np.arange(n) % 10 >= 3)
else:  # the first 30 % of each segment's rows
    loc = w.locations()
    keep = np.flatnonzero(loc.row >= (0.3 * np.array(w.counts)[loc.seg]).astype(int))
t = time.perf_counter()
ss._index_rows(out, dim, keep, w)
commit_s = time.perf_counter() - t
hwm = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
base = subprocess.run(
    [sys.executable, "-c", "import pipeline.cli; " + hwm], capture_output=True, text=True, check=True
).stdout.split()[-1]
opened = subprocess.run(
    [
        sys.executable,
        "-c",
        f"import sys, h5py, pipeline.cli; f = h5py.File(sys.argv[1]); d = f['features']; {hwm}",
        str(out),
    ],
    capture_output=True,
    text=True,
    check=True,
).stdout.split()[-1]
read = (
    "import sys, time; from pipeline.cache.store import Cache; t = time.perf_counter(); c = Cache(sys.argv[1]); "
    "o = time.perf_counter() - t; t = time.perf_counter(); k = sum(len(b) for _, b in c.iter_features()); "
    "print(round(k / (time.perf_counter() - t)), o)"
)
reads = [  # best of 3 processes: (rows/s, seconds to open the Cache)
    subprocess.run([sys.executable, "-c", read, str(out)], capture_output=True, text=True, check=True).stdout.split()
    for _ in range(3)
]
code = (
    "import sys; from pipeline.cli import cli; cli.main(['cache', 'compact', sys.argv[1]], standalone_mode=False); "
    + hwm
)
t = time.perf_counter()
r = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True)
print(
    json.dumps(
        dict(
            n=n,
            mode=mode,
            rows_kept=len(keep),
            commit_s=round(commit_s, 1),
            compact_s=round(time.perf_counter() - t, 1),
            hwm_imports_mb=int(base) // 1024,
            hwm_open_index_mb=int(opened) // 1024,
            read_rows_s=max(int(r) for r, _ in reads),
            cache_open_s=round(min(float(o) for _, o in reads), 2),
            hwm_compact_mb=int(r.stdout.split()[-1]) // 1024,
            line=r.stdout.splitlines()[0][-90:],
            load=os.getloadavg()[0],
        )
    )
)
shutil.rmtree(root)
