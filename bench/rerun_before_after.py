"""The unchanged re-run against ``--rehash``, for an older revision and this tree, on one folder.

    python bench/rerun_before_after.py FILES KB ROUNDS BEFORE_TREE [--workdir DIR]

BEFORE_TREE: a checkout of the older revision (e.g. ``git archive REV | tar -x -C DIR``). The
folder is made as ``bench/rerun_unchanged.py`` makes it (FILES files of KB KB, ``0``: about 150
bytes) and extracted once with the ``tiny`` backbone; each tree gets its own copy of the cache
(their index digests differ, and neither may rewrite the other's). Then, in interleaved rounds,
each tree in a process of its own: one warm-up run (page cache, imports, an index in that tree's
own digest), then one timed unchanged run and one timed ``--rehash`` run. Prints the best of the
rounds and the ratio for each tree."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

files, kb, rounds, before = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
workdir = Path(sys.argv[6]) if len(sys.argv) > 6 and sys.argv[5] == "--workdir" else Path("artifacts/bench")
root = (workdir / f"rerun-before-after-{files}-{kb}").resolve()
images = root / "images"
PY = sys.executable
TREES = {"before": str(Path(before).resolve()), "after": str(Path(__file__).resolve().parent.parent)}
CHILD = r"""
import sys, time, json
from pipeline.config import ExtractConfig
from pipeline.extract import extract
images, out, rehash, reps = sys.argv[1], sys.argv[2], sys.argv[3] == "1", int(sys.argv[4])
opts = dict(backbone="tiny", precision="fp32", workers=0, batch_size=64, progress=False)
cfg = lambda r: ExtractConfig(images=images, out=out, rehash=r, **opts)
extract(cfg(False))  # warm-up: page cache, imports, and an index in this tree's own digest
ts = []
for _ in range(reps):
    t = time.perf_counter(); s = extract(cfg(rehash)); ts.append(time.perf_counter() - t)
    assert s.extracted == 0 and s.rows == int(sys.argv[5]), s.line()
import pipeline
assert pipeline.__file__.startswith(sys.argv[6]), (pipeline.__file__, sys.argv[6])  # the tree asked for
print(json.dumps(ts))
"""
if not (root / "after.h5").exists():
    shutil.rmtree(root, ignore_errors=True)
    sys.path.insert(0, str(Path(__file__).parent))
    import rerun_unchanged as ru

    t = time.perf_counter()
    ru.make_folder(images, files, kb)
    print(f"made {files} files in {time.perf_counter() - t:.0f} s", flush=True)
    t = time.perf_counter()
    subprocess.run(
        [
            PY,
            "-c",
            "import sys; from pipeline.config import ExtractConfig; from pipeline.extract import extract; "
            "opts = dict(backbone='tiny', precision='fp32', workers=0, batch_size=64, progress=False); "
            "print(extract(ExtractConfig(images=sys.argv[1], out=sys.argv[2], **opts)).line())",
            str(images),
            str(root / "after.h5"),
        ],
        check=True,
        env={**os.environ, "PYTHONPATH": TREES["after"]},
    )
    print(f"first extraction {time.perf_counter() - t:.0f} s", flush=True)
    shutil.copy(root / "after.h5", root / "before.h5")
    shutil.copytree(root / "after.h5.segments", root / "before.h5.segments")
res = {}
for r in range(rounds):
    for tree, path in TREES.items():
        for rehash in (0, 1):
            out = subprocess.run(
                [PY, "-c", CHILD, str(images), str(root / f"{tree}.h5"), str(rehash), "1", str(files), path],
                check=True,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": path},
                cwd=path,  # ``python -c`` puts the working directory first on sys.path: each tree its own
            )
            res.setdefault((tree, rehash), []).extend(json.loads(out.stdout.splitlines()[-1]))
    print(
        r,
        {f"{k[0]}-{'rehash' if k[1] else 'stat'}": [round(x, 3) for x in v] for k, v in res.items()},
        "load",
        os.getloadavg()[0],
        flush=True,
    )
for tree in TREES if rounds else ():
    s, h = min(res[(tree, 0)]), min(res[(tree, 1)])
    print(
        f"{tree}: unchanged {s:.3f} s ({files / s:,.0f} files/s), --rehash {h:.3f} s "
        f"({files / h:,.0f} files/s): {h / s:.1f}x (best of {rounds})"
    )
print("load", os.getloadavg())
