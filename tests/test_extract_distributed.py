"""``torchrun --nproc_per_node=2 -m pipeline extract``: two real processes on the CPU (gloo)
give the same cache as one process, and a killed distributed run resumes from the journal."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.cache.inspection import verify
from pipeline.cache.store import Cache, Journal
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
    assert not verify(a) and not verify(b)
    with Cache(a) as x, Cache(b) as y:
        assert x.content_hash == y.content_hash and x.paths == y.paths
        assert x.labels.tolist() == y.labels.tolist() and x.class_names == y.class_names
        assert x.skipped == y.skipped and x.duplicates == y.duplicates
        assert x.fingerprint == y.fingerprint
        np.testing.assert_allclose(x.features(), y.features(), rtol=0, atol=1e-3)


def test_two_processes_give_the_single_process_cache(catalog, tmp_path):
    single = tmp_path / "single.h5"
    s = extract(ExtractConfig(images=str(catalog), out=str(single), backbone="tiny", precision="fp32", progress=False))
    assert s.rows == 48
    out = tmp_path / "dist.h5"
    r = _torchrun(catalog, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 1/2: extracted" in r.stdout and f"{out}: 48 rows, 3 classes; extracted 49" in r.stdout
    _same(out, single)


@pytest.mark.slow
def test_killed_distributed_run_resumes_from_the_journal(catalog, tmp_path):
    single = tmp_path / "single.h5"
    extract(ExtractConfig(images=str(catalog), out=str(single), backbone="tiny", precision="fp32", progress=False))
    out = tmp_path / "dist.h5"
    r = _torchrun(catalog, out, env={"HEADSTART_CRASH_AT": "journal-appended:1"})
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-2000:]
    batches = list(Journal(out).dir.glob("batch-*.npz"))
    assert len(batches) == 2 and not out.exists()  # one finished batch from each rank
    r = _torchrun(catalog, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "extracted 33" in r.stdout  # 49 distinct contents - 2 x 8 rows kept from the journal
    _same(out, single)
    # Re-run: every row reused; only the broken file is tried again (a skip is not cached:
    # its reason may go away, e.g. with a higher --max-pixels).
    r = _torchrun(catalog, out)
    assert r.returncode == 0 and "extracted 1 " in r.stdout and "reused 48" in r.stdout, r.stdout
    _same(out, single)
