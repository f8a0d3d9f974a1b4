"""Files written by the previous release (0.1.0, commit 1f9717c) still load and still work.

``tests/data/release-0.1.0/`` was written by that release's code from 3 classes x 4 sample
photos with the ``tiny`` backbone (a cache, a head, a native and an ONNX model, a fine-tune run).
Every test here reads those bytes, never files this release wrote."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_sample_photos

from pipeline.artifacts.head_dir import load_head_estimator, read_head
from pipeline.artifacts.model_dir import load_model
from pipeline.cache.store import Cache
from pipeline.config import ExportConfig, FitHeadConfig
from pipeline.export import export
from pipeline.fit_head import fit_head
from pipeline.predict import Predictor

OLD = Path(__file__).parent / "data" / "release-0.1.0"
CLASSES = ["bag", "sneaker", "trouser"]


@pytest.fixture
def old(tmp_path: Path) -> Path:
    """A writable copy (the cache is opened read-write by extract; the tests must not change OLD)."""
    shutil.copytree(OLD, tmp_path / "old")
    return tmp_path / "old"


def test_old_cache_reads_and_fits(old, tmp_path):
    with Cache(old / "features.h5") as c:
        assert c.class_names == CLASSES and len(c.paths) == 12
        assert c.features().shape == (12, 32) and np.isfinite(c.features()).all()
        assert c.fingerprint.backbone == "tiny"
    s = fit_head(FitHeadConfig(cache=str(old / "features.h5"), out=str(tmp_path / "head"), c=0.01))
    assert json.loads((s.path / "head.json").read_text())["class_names"] == CLASSES


def test_old_head_loads_and_exports(old, tmp_path):
    meta, spec = read_head(old / "head")
    assert meta["class_names"] == CLASSES and spec.n_classes == 3
    est = load_head_estimator(old / "head")  # the release-0.1.0 pickle names its classes' modules
    with Cache(old / "features.h5") as c:
        X = c.features()
    assert est.predict_proba(X).shape == (12, 3)
    model = export(ExportConfig(head=str(old / "head"), out=str(tmp_path / "model"), format="native"))
    assert load_model(model).class_names == CLASSES


@pytest.mark.parametrize("name", ["model", "model_onnx"])
def test_old_models_predict(old, tmp_path, name):
    photos = copy_sample_photos(tmp_path / "photos", per_class=1)
    p = Predictor.load(old / name, device="cpu")
    rows = p.predict(sorted(photos.rglob("*.png")))
    assert len(rows) == 3 and all(r["label"] in CLASSES for r in rows)


def test_old_finetune_run_exports(old, tmp_path):
    model = export(ExportConfig(head=str(old / "finetune"), out=str(tmp_path / "model"), format="native"))
    assert load_model(model).class_names == CLASSES
