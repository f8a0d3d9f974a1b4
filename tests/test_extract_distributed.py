"""``torchrun --nproc_per_node=2 -m pipeline extract``: two real processes on the CPU (gloo)
give the same cache as one process (each rank writes its own segments, rank 0 the index), and
a killed distributed run resumes from the segments the ranks finished."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.inspection import verify
from pipeline.cache.store import Cache, segment_dir
from pipeline.config import ExtractConfig
from pipeline.data import SAMPLE_CATALOG
from pipeline.extract import extract

DATA = Path(__file__).parent / "data" / "images"
OPTS = ["--backbone", "tiny", "--precision", "fp32", "--workers", "0", "--batch-size", "8", "--no-progress"]


@pytest.fixture(scope="module")
def catalog(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist") / "images"
    for cls in ("bag", "sneaker", "trouser"):
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE_CATALOG / "train" / cls).glob("*.png"))[:16]:
            shutil.copy(p, root / cls / p.name)
    shutil.copy(sorted((root / "bag").glob("*.png"))[0], root / "sneaker" / "same-bytes.png")
    shutil.copy(DATA / "truncated_jpeg.jpg", root / "trouser" / "broken.jpg")
    return root


def _torchrun(images: Path, out: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    cmd += ["-m", "pipeline", "extract", str(images), "--out", str(out), *OPTS]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HEADSTART_COMMIT_ROWS": "8", "HEADSTART_COMMIT_SECONDS": "3600"}
    full_env.update(env or {})
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=600)


def _same(a: Path, b: Path) -> None:
    """The same rows (rows are in storage order, which depends on which rank wrote which)."""
    assert not verify(a) and not verify(b)
    with Cache(a) as x, Cache(b) as y:
        rx = {h: (p, lab) for h, p, lab in zip(x.content_hash, x.paths, x.labels.tolist(), strict=True)}
        ry = {h: (p, lab) for h, p, lab in zip(y.content_hash, y.paths, y.labels.tolist(), strict=True)}
        assert rx == ry and len(rx) == x.n_rows == y.n_rows and x.class_names == y.class_names
        assert x.skipped == y.skipped and x.duplicates == y.duplicates
        assert x.fingerprint == y.fingerprint
        fy = dict(zip(y.content_hash, y.features(), strict=True))
        for h, f in zip(x.content_hash, x.features(), strict=True):
            np.testing.assert_allclose(f, fy[h], rtol=0, atol=1e-3)


def test_two_processes_give_the_single_process_cache(catalog, tmp_path):
    single = tmp_path / "single.h5"
    s = extract(ExtractConfig(images=str(catalog), out=str(single), backbone="tiny", precision="fp32", progress=False))
    assert s.rows == 48
    out = tmp_path / "dist.h5"
    r = _torchrun(catalog, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1/2: extracted" in r.stdout and f"{out}: 48 rows, 3 classes; extracted 48" in r.stdout
    _same(out, single)
    with Cache(out) as c:  # both ranks wrote segments of their own
        assert len({name.rsplit("-", 2)[1] for name in c.segments}) == 2  # seg-TIME-HOST-PID-N


@pytest.mark.slow
def test_killed_distributed_run_resumes_from_finished_segments(catalog, tmp_path):
    single = tmp_path / "single.h5"
    extract(ExtractConfig(images=str(catalog), out=str(single), backbone="tiny", precision="fp32", progress=False))
    out = tmp_path / "dist.h5"
    r = _torchrun(catalog, out, env={"HEADSTART_CRASH_AT": "segment-written:1"})
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-2000:]
    segments = list(segment_dir(out).glob("seg-*.h5"))
    assert len(segments) == 2 and not out.exists()  # one finished segment from each rank
    r = _torchrun(catalog, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "extracted 32" in r.stdout  # 48 rows - 2 x 8 kept from the segments (the broken file gives none)
    _same(out, single)
    # Re-run: every row reused; the broken file is not decoded again (its skip is remembered
    # under the same limits; a higher --max-pixels would try it again).
    r = _torchrun(catalog, out)
    assert r.returncode == 0 and "extracted 0," in r.stdout and "reused 48" in r.stdout, r.stdout
    assert "skipped 2 (1 known from earlier runs" in r.stdout, r.stdout  # and one kept unlabelled
    _same(out, single)
