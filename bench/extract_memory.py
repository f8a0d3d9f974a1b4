"""Peak RSS of ``extract`` per file of the catalog: the same runs on two folder sizes.

    python bench/extract_memory.py [--files 20000 100000] [--kb 0] [--workdir artifacts/bench] [--keep]

Makes a folder of each size as ``bench/rerun_unchanged.py`` does (``--kb 0``: files of about 150
bytes; the memory per file does not depend on their size), extracts it once with the ``tiny``
backbone, then runs, each in a fresh process that reports its own peak RSS (``VmHWM``): an
unchanged re-run (the stat check, the index kept) and a re-run that commits (one file touched,
so the run takes the full path: every file's key, the next index assembled and written, the
removed/relabelled counts). No new photo, so no feature row is in memory: what differs between
the two sizes is the per-file metadata. Prints each peak and the slope in bytes per file; the
intercept is the imports (torch, the CLI) and one segment's rows.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import rerun_unchanged

# One extract in a process of its own, printing its summary line and its own peak RSS.
_RUN = r"""
import sys
from pipeline.config import ExtractConfig
from pipeline.extract import extract
cfg = ExtractConfig(images=sys.argv[1], out=sys.argv[2], backbone="tiny", precision="fp32", workers=0,
                    batch_size=64, progress=False)
s = extract(cfg)
print(s.line())
print(next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")))
"""


def _extract(images: Path, out: Path) -> tuple[str, int]:
    r = subprocess.run([sys.executable, "-c", _RUN, str(images), str(out)], check=True, capture_output=True, text=True)
    line, peak = r.stdout.strip().splitlines()[-2:]
    return line, int(peak)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, nargs=2, default=[20_000, 100_000])
    ap.add_argument("--kb", type=int, default=0)
    ap.add_argument("--workdir", default="artifacts/bench")
    ap.add_argument("--keep", action="store_true", help="keep the folders and caches, and reuse them next time")
    args = ap.parse_args()
    peaks: dict[str, list[int]] = {"unchanged": [], "commit": []}
    for n in args.files:
        root = Path(args.workdir) / f"memory-{n}-{args.kb}"
        images, out = root / "images", root / "features.h5"
        if not (args.keep and out.is_file()):
            shutil.rmtree(root, ignore_errors=True)
            t = time.perf_counter()
            rerun_unchanged.make_folder(images, n, args.kb)
            line, _ = _extract(images, out)
            print(f"N={n:,}: made and extracted in {time.perf_counter() - t:.0f} s: {line}")
        _extract(images, out)  # an index in this tree's form, before the measured runs
        _, unchanged = _extract(images, out)
        touched = next(iter(sorted((images / "class0").iterdir())))
        st = touched.stat()
        os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # a stat change: the full path
        line, commit = _extract(images, out)
        assert "extracted 0" in line, line
        peaks["unchanged"].append(unchanged)
        peaks["commit"].append(commit)
        print(f"N={n:,}: peak RSS unchanged re-run {unchanged / 1e6:.0f} MB, re-run that commits {commit / 1e6:.0f} MB")
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    a, b = args.files
    for what, (pa, pb) in peaks.items():
        print(f"{what}: {(pb - pa) / (b - a):.0f} bytes per file ({pa / 1e6:.0f} -> {pb / 1e6:.0f} MB)")
    print(f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
