"""bench/backbone_probe.py, run as a user runs it (a child process), on an imported tiny
random-weight timm ViT instead of the downloaded backbones, with one backbone whose weights are
not on this machine: that one is skipped at once with the command to run, the next measured."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_hub_backbones import save_timm

from pipeline.data import SAMPLE_CATALOG

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~30 s on 2 busy cores: three interpreters, extract twice, fit-head, evaluate
def test_backbone_probe_measures_an_imported_model_and_skips_a_missing_one_fast(tmp_path, monkeypatch):
    from pipeline.models import hub
    from pipeline.models.imported import import_backbone

    monkeypatch.setenv("HEADSTART_CACHE_DIR", str(tmp_path / "registry"))  # the child reads the same registry
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # an empty Hugging Face cache
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    hub.forget()
    folder, _ = save_timm("test_vit", tmp_path / "test_vit")
    import_backbone(folder, "vit-s", size=64)
    hub.forget()
    catalog = tmp_path / "catalog"  # 3 classes of the bundled catalog, 6 train / 4 test photos each
    for split, n in (("train", 6), ("test", 4)):
        for cls in ("bag", "sneaker", "trouser"):
            (catalog / split / cls).mkdir(parents=True)
            for p in sorted((SAMPLE_CATALOG / split / cls).glob("*.png"))[:n]:
                shutil.copy(p, catalog / split / cls)
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, str(REPO / "bench" / "backbone_probe.py"), "--backbones",
         "missing=hf/facebook/dinov2-small@224:cls+mean,tiny-vit=vit-s", "--datasets", "catalog",
         "--catalog", str(catalog), "--out", str(tmp_path / "out"), "--no-download", "--device", "cpu",
         "--workers", "0"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr  # 2: something was skipped
    out = r.stdout
    assert "network: offline" in out
    skip = next(line for line in out.splitlines() if line.startswith("missing: skipped after"))
    assert float(skip.split("skipped after ")[1].split(" s")[0]) < 30  # no network wait
    assert "`hf download facebook/dinov2-small`" in skip and "snapshot_download('facebook/dinov2-small')" in skip
    row = next(line for line in out.splitlines() if line.startswith("| tiny-vit |"))
    assert "`vit-s@64:cls`" in row and "| 64 |" in row
    doc = json.loads((tmp_path / "out" / "result.json").read_text())
    (measured,) = doc["rows"]
    m = measured["results"]["catalog"]
    assert m["n_test"] == 12 and 0 <= m["accuracy"] <= 1 and m["images_per_s"] > 0
    assert [s["label"] for s in doc["skipped"]] == ["missing"]
    assert out.index("missing: skipped") < out.index("tiny-vit on catalog")  # went on to the next one
    assert time.monotonic() - t0 < 300
