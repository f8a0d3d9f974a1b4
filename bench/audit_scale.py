"""How long ``headstart audit`` takes on a large, mostly unlabelled catalog (issue 13: "1 M rows
audit on this 2-core machine in minutes").

The rows: the 10,000 EfficientNet-Lite0 feature rows of real Fashion-MNIST photos that
``bench/audit_label_issues.py --per-class 1000`` extracted (``--source``, labelled as they are),
then ``--rows`` minus 10,000 **synthetic** rows, each a random real row plus Gaussian noise of
``--noise`` times the row's norm (cosine to its source about ``1/sqrt(1 + noise^2)``: 0.89 at
0.5, under the 0.96 near-duplicate threshold), unlabelled, written through the real store API
(segments + index, as ``extract`` writes them). A timing and memory benchmark of the audit's
large-catalog path (cross-fit of the labelled rows, FAISS near-duplicate search over every
row, outliers, label next over a pool of 100,000), **not** of its findings: the synthetic rows
are not photos, and their duplicates, outliers and suggestions mean nothing.

    pip install '.[faiss]'        # the approximate index used above 10,000 rows
    python bench/audit_scale.py [--rows 1000000] [--noise 0.5] [--workdir artifacts/bench/audit_scale]

Prints the build time, the audit's wall time and peak RSS (the child's ``ru_maxrss``) and its
``--json`` counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.cache.index import IndexContents, commit
from pipeline.cache.segments import DEFAULT_SEGMENT_ROWS, SegmentWriter
from pipeline.cache.store import Cache

CHUNK = 4096


def build(source: Path, out: Path, rows: int, noise: float, seed: int) -> float:
    """The cache at ``out``: ``source``'s rows, then synthetic ones (see the module docstring)."""
    t0 = time.perf_counter()
    with Cache(source) as c:
        feats = c.features()
        labels, names, hashes, paths = c.labels, c.class_names, c.content_hash, c.paths
        fp, attrs = c.fingerprint, c.attrs
    n0, dim = feats.shape
    rng = np.random.default_rng(seed)
    scale = noise * np.linalg.norm(feats, axis=1, keepdims=True) / np.sqrt(dim)
    writer = SegmentWriter(out, fp, np.float16, dim, DEFAULT_SEGMENT_ROWS)
    writer.add(hashes, feats.astype(np.float16))
    all_hashes, all_paths = list(hashes), list(paths)
    for start in range(n0, rows, CHUNK):
        k = min(CHUNK, rows - start)
        src = rng.integers(0, n0, k)
        made = feats[src] + scale[src] * rng.standard_normal((k, dim), dtype=np.float32)
        keys = [
            hashlib.blake2b(f"synthetic-{seed}-{i}".encode(), digest_size=16).hexdigest()
            for i in range(start, start + k)
        ]
        writer.add(keys, np.maximum(made, 0).astype(np.float16))  # features after a ReLU: not negative
        all_hashes += keys
        all_paths += [f"synthetic/{i:07d}.png" for i in range(start, start + k)]
    writer.flush()
    # The writer fills segments in the order rows were added: that is the storage order.
    location = [(s.name, r) for s in writer.segments for r in range(s.n_rows)]
    assert len(location) == rows
    commit(
        out,
        IndexContents(
            content_hash=all_hashes,
            paths=all_paths,
            labels=np.concatenate([labels, np.full(rows - n0, -1)]).astype(np.int32),
            class_names=names,
            attrs={**attrs, "image_root": attrs.get("image_root", "")},
            location=location,
            segment_rows={s.name: s.n_rows for s in writer.segments},
            dtype="float16",
            feature_dim=dim,
        ),
    )
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--noise", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--source", type=Path, default=Path("artifacts/bench/audit10k/clean.h5"))
    ap.add_argument("--workdir", type=Path, default=Path("artifacts/bench/audit_scale"))
    args = ap.parse_args()
    if not args.source.is_file():
        sys.exit(f"{args.source} is missing: run `python bench/audit_label_issues.py --per-class 1000` first")
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    cache = args.workdir / "features.h5"
    built = build(args.source, cache, args.rows, args.noise, args.seed)
    print(f"built {cache}: {args.rows:,} rows in {built:.1f} s")
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "pipeline", "audit", str(cache), "--out", str(args.workdir / "report"), "--json",
           "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if r.returncode:
        sys.exit(f"audit failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
    counts = json.loads(r.stdout)
    labelled = counts.get("labelled")
    print(f"audit of {args.rows:,} rows ({labelled} labelled): {wall:.1f} s wall, peak RSS {peak_mb:,.0f} MB")
    print(json.dumps({k: v for k, v in counts.items() if k != "warnings"}, indent=1))
    for w in counts.get("warnings", []):
        print("warning:", w)


if __name__ == "__main__":
    main()
