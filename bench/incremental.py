"""Incremental extraction: adding 5% new photos to an extracted folder should cost at most 10%
of the full extraction.

    python bench/incremental.py [--n 400] [--backbone efficientnet_lite0]

Full extraction of ``n`` real photos (JPEG, long side 640 px; see ``photos.py``), then 5% more
photos are added and ``extract`` runs again on the grown folder: it hashes every file, reuses
every known row, runs the backbone on the new photos only and rewrites the cache. Both timings
are end to end (model load, hashing, decoding, network, cache write), in the same process.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import make_photos

from pipeline.config import ExtractConfig
from pipeline.extract import extract


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="photos in the first extraction")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--workdir", default="artifacts/bench")
    args = ap.parse_args()

    root = Path(args.workdir) / "incremental"
    shutil.rmtree(root, ignore_errors=True)
    photos = root / "photos"
    make_photos(photos / "all", args.n)
    out = root / "features.h5"

    def run() -> tuple[float, int]:
        t0 = time.perf_counter()
        s = extract(ExtractConfig(images=str(photos), out=str(out), backbone=args.backbone, progress=False))
        return time.perf_counter() - t0, s.extracted

    # Pay the one-off lazy imports on a 3-photo folder, so the full run is not inflated by them.
    warm = root / "warm"
    warm.mkdir()
    for p in sorted((photos / "all").glob("*.jpg"))[:3]:
        shutil.copy(p, warm / p.name)
    extract(ExtractConfig(images=str(warm), out=str(root / "warm.h5"), backbone=args.backbone, progress=False))
    full, n_full = run()
    k = max(1, round(args.n * 0.05))
    make_photos(photos / "all", k, start=args.n)
    inc, n_inc = run()
    print(f"full extraction: {n_full} photos in {full:.2f} s ({n_full / full:.1f} images/s)")
    print(f"after adding {k} photos (5%): extracted {n_inc} in {inc:.2f} s")
    print(
        f"ratio: {inc / full:.3f} of a full extraction (target <= 0.10); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )


if __name__ == "__main__":
    main()
