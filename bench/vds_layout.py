"""One mapping per run against one mapping per segment, with h5py alone (no headstart code).

    python bench/vds_layout.py [N] [--dim D] [--deleted even|quarter] [--caps 64 ...] [--workdir DIR]

N synthetic float16 rows (default 1,000,000, rounded up to whole segments; D = 32) in segment
files of 8,192 rows (chunks of 512 rows, Fletcher-32, as ``pipeline/cache/segments.py`` writes
them), rows deleted evenly
(``even``: 3 of every 10, 819 runs of live rows a segment; ``quarter``: every 4th row, 25 %, the
most extract leaves uncompacted, 2,048 runs a segment), and three virtual ``/features`` over the
remaining rows: one mapping per run of consecutive rows (h5py's ``VirtualLayout``, what the
index wrote before), one mapping per segment whose source selection is the union of its runs
(an irregular hyperslab), and the same split every 64 runs (``--caps``: each a layout; 64 is
what ``pipeline/cache/index.py`` writes: HDF5 decodes an irregular selection in time quadratic
in its runs). For each:
the seconds to write the index, its bytes, the seconds to open ``/features`` (best of 3), the
``VmHWM`` of a process that only opens it, and the rows/s of a process that reads all of it in
slices of 65,536 rows as float32 (as ``Cache.iter_features``; best of 3 processes), summing
every column: ``same_values`` says whether the layouts gave the same sums."""

import argparse
import functools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

SEG, CHUNK = 8192, 512
HWM = "[l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0]"
CHILD = f"""
import sys, time, h5py, numpy as np
if sys.argv[2] == "base":
    print(int({HWM}) // 1024); sys.exit()
f = h5py.File(sys.argv[1], "r"); ds = f["features"]
if sys.argv[2] == "open":
    print(int({HWM}) // 1024)
else:
    t, total = time.perf_counter(), np.zeros(ds.shape[1])
    for a in range(0, ds.shape[0], 65536):
        total += np.asarray(ds[a : a + 65536], dtype=np.float32).sum(axis=0, dtype=np.float64)
    print(ds.shape[0] / (time.perf_counter() - t), repr(total.tolist()))
"""


def per_run(f: h5py.File, folder: str, names: list[str], seg: np.ndarray, row: np.ndarray, d: int) -> None:
    layout = h5py.VirtualLayout(shape=(len(seg), d), dtype=np.float16)
    src = {s: h5py.VirtualSource(f"{folder}/{s}", "features", shape=(SEG, d), dtype=np.float16) for s in names}
    brk = np.flatnonzero((np.diff(seg) != 0) | (np.diff(row) != 1)) + 1
    for a, b in zip(np.r_[0, brk].tolist(), np.r_[brk, len(seg)].tolist(), strict=True):
        r0 = int(row[a])
        layout[a:b] = src[names[int(seg[a])]][r0 : r0 + b - a]
    f.create_virtual_dataset("features", layout, fillvalue=np.nan)


def per_segment(
    f: h5py.File, folder: str, names: list[str], seg: np.ndarray, row: np.ndarray, d: int, cap: int = 1 << 30
) -> None:
    h5s = h5py.h5s
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.VIRTUAL)
    dcpl.set_fill_value(np.array([np.nan], dtype=np.float16))
    vspace = h5s.create_simple((len(seg), d))
    bounds = np.searchsorted(seg, np.arange(len(names) + 1))  # rows are sorted by segment here
    for k, name in enumerate(names):
        a, b = int(bounds[k]), int(bounds[k + 1])
        r = row[a:b]
        brk = np.flatnonzero(np.diff(r) != 1) + 1
        runs = list(zip(np.r_[0, brk].tolist(), np.r_[brk, len(r)].tolist(), strict=True))
        for j in range(0, len(runs), cap):
            src, op = h5s.create_simple((SEG, d)), h5s.SELECT_SET
            for x, y in runs[j : j + cap]:
                src.select_hyperslab((int(r[x]), 0), (y - x, d), op=op)
                op = h5s.SELECT_OR
            x, y = runs[j][0], runs[min(j + cap, len(runs)) - 1][1]
            vspace.select_hyperslab((a + x, 0), (y - x, d))
            dcpl.set_virtual(vspace, f"{folder}/{name}".encode(), b"features", src)
    h5py.h5d.create(f.id, b"features", h5py.h5t.py_create(np.dtype(np.float16), logical=True),
                    h5s.create_simple((len(seg), d)), dcpl=dcpl)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", type=int, nargs="?", default=1_000_000)
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--deleted", choices=["even", "quarter"], default="even")
    ap.add_argument("--caps", type=int, nargs="+", default=[64], help="runs per mapping, a layout each")
    ap.add_argument("--workdir", default="artifacts/bench")
    a = ap.parse_args()
    n, d = a.n, a.dim
    root = Path(a.workdir) / f"vds-layout-{n}"
    shutil.rmtree(root, ignore_errors=True)
    (root / "s").mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = []
    for i in range(0, n, SEG):
        names.append(f"seg-{i // SEG:05d}.h5")
        with h5py.File(root / "s" / names[-1], "w") as f:
            x = rng.standard_normal((SEG, d), dtype=np.float32).astype(np.float16)
            f.create_dataset("features", data=x, chunks=(CHUNK, d), fletcher32=True)
    i = np.arange(len(names) * SEG)
    keep = np.flatnonzero(i % 10 >= 3 if a.deleted == "even" else i % 4 != 0)
    seg, row = (keep // SEG).astype(np.int64), (keep % SEG).astype(np.int64)
    result: dict[str, object] = dict(n=n, dim=d, deleted=a.deleted, segments=len(names), rows_kept=len(keep))
    sums = {}
    capped = [(f"per_{k}_runs", functools.partial(per_segment, cap=k)) for k in a.caps]
    for label, write in [("per_run", per_run), ("per_segment", per_segment), *capped]:
        out = root / f"{label}.h5"
        t = time.perf_counter()
        with h5py.File(out, "w") as f:
            write(f, "s", names, seg, row, d)
        write_s = time.perf_counter() - t
        opens = []
        for _ in range(3):
            with h5py.File(out, "r") as f:
                t = time.perf_counter()
                ds = f["features"]
                opens.append(time.perf_counter() - t)
                count = ds.id.get_create_plist().get_virtual_count()
                del ds

        def child(what: str, out: Path = out) -> str:
            cmd = [sys.executable, "-c", CHILD, str(out), what]
            return subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=root).stdout

        hwm = int(child("open"))
        result["hwm_import_mb"] = int(child("base"))
        reads = [child("read").split(" ", 1) for _ in range(3)]
        rate = max(float(r) for r, _ in reads)
        sums[label] = reads[0][1]
        result[label] = dict(
            mappings=count,
            write_s=round(write_s, 2),
            index_bytes=out.stat().st_size,
            open_s=round(min(opens), 3),
            hwm_open_mb=hwm,
            read_rows_s=round(rate),
        )
    result["same_values"] = len(set(sums.values())) == 1
    result["load"] = os.getloadavg()
    print(json.dumps(result))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
