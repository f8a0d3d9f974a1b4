"""The cost of one index commit per row, with the lists ``extract`` hands over.

    python bench/index_commit.py N REPEATS [--workdir DIR]

A cache of N synthetic rows (D = 32, segments of 8,192: the feature bytes are not the point),
then REPEATS + 1 commits that each change every label (the first is not counted). It uses only
APIs older than issue 12's changes, so the same file times an older revision: run it with that
revision's tree on ``PYTHONPATH`` (e.g. from ``git archive REV | tar -x -C DIR``)."""

import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.cache.index import IndexContents, StatTable, commit
from pipeline.cache.segments import SegmentWriter
from pipeline.models.fingerprint import Fingerprint

n, reps = int(sys.argv[1]), int(sys.argv[2])
workdir = Path(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[3] == "--workdir" else Path("artifacts/bench")
prep = {
    "crop": 32,
    "draft": True,
    "interpolation": "bilinear",
    "letterbox": False,
    "mean": [0.5] * 3,
    "resize": 40,
    "std": [0.5] * 3,
}
fp = Fingerprint.from_record(
    dict(
        backbone="synthetic",
        weights="random",
        weights_sha256="none",
        precision="fp32",
        preprocessing=json.dumps(prep),
        feature_dim=32,
    ),
    source="bench",
)
root = workdir / f"index-commit-{os.getpid()}"
shutil.rmtree(root, ignore_errors=True)
root.mkdir(parents=True)
out = root / "features.h5"
hashes = [hashlib.blake2b(i.to_bytes(8, "little"), digest_size=16).hexdigest() for i in range(n)]
paths = [f"class{i % 20:02d}/photo-{i:09d}.jpg" for i in range(n)]
w = SegmentWriter(out, fp, np.float16, 32, 8192)
for a in range(0, n, 4096):
    w.add(hashes[a : a + 4096], np.zeros((min(4096, n - a), 32), np.float16))
w.flush()
location = [w.locations[h] for h in hashes]
seg_rows = {s.name: s.n_rows for s in w.segments}
stat = StatTable(
    path=paths,
    size=[150_000 + (i * 7919) % 200_000 for i in range(n)],
    mtime_ns=[1_700_000_000 * 10**9 + i for i in range(n)],
    inode=list(range(n)),
    device=[2049] * n,
    content_hash=hashes,
)
ts = []
for r in range(reps + 1):
    c = IndexContents(
        content_hash=hashes,
        paths=paths,
        labels=np.array([(i + r) % 20 for i in range(n)], np.int32),
        class_names=[f"class{k:02d}" for k in range(20)],
        attrs=dict(fp.to_record()),
        location=location,
        segment_rows=seg_rows,
        dtype="float16",
        feature_dim=32,
        stat=stat,
    )
    t = time.perf_counter()
    commit(out, c)
    ts.append(time.perf_counter() - t)
print(
    json.dumps(
        dict(
            tree=os.environ.get("PYTHONPATH", ""),
            n=n,
            us_per_row=[round(x / n * 1e6, 2) for x in ts[1:]],
            load=round(os.getloadavg()[0], 1),
        )
    )
)
shutil.rmtree(root)
