"""Export: native and ONNX artifacts, manifest with checksums, parity check, head checks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.artifacts.head_dir import load_head_estimator, read_head
from pipeline.artifacts.model_dir import MODEL_SCHEMA_VERSION, load_model, sample_pixels
from pipeline.config import ExportConfig
from pipeline.data.images import load_pixels
from pipeline.errors import ArtifactError
from pipeline.export import export
from pipeline.models.heads import build_head
from pipeline.predict import Predictor


@pytest.fixture(scope="module")
def models(tiny_head, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    native = export(ExportConfig(head=str(tiny_head), out=str(root / "native")))
    onnx = export(ExportConfig(head=str(tiny_head), out=str(root / "onnx"), format="onnx"))
    return native, onnx


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("which, filename", [(0, "model.pt"), (1, "model.onnx")])
def test_manifest_describes_the_artifact(models, tiny_head, which, filename):
    m = _manifest(models[which])
    head = json.loads((tiny_head / "head.json").read_text(encoding="utf-8"))
    assert m["format"] == "headstart-model" and m["schema_version"] == MODEL_SCHEMA_VERSION
    assert m["runtime"] == ("native", "onnx")[which]
    assert set(m["files"]) == {filename}
    assert m["class_names"] == head["class_names"] == ["bag", "sneaker", "trouser"]
    assert m["backbone"]["name"] == "tiny" and m["backbone"]["weights_sha256"] == head["fingerprint"]["weights_sha256"]
    assert m["preprocessing"]["crop"] == 32 and m["head"]["kind"] == "linear"
    assert m["input"]["dtype"] == "uint8" and m["input"]["shape"] == ["N", 3, 32, 32]
    p = m["parity"]
    assert p["n_images"] >= 2 and p["images"] == "head's training images"
    # fp32 reference vs the loaded fp32 model (the precision override does not reach them); measured
    # |dp| <= 2e-7, smallest top-2 gap on these photos 0.12: top-1 agreement is exact, not sampled.
    assert 0 <= p["max_abs_diff"] <= p["tolerance"] == 1e-3 and p["top1_agreement"] == 1.0
    assert m["provenance"]["headstart_version"] and m["provenance"]["head_dir"] == str(tiny_head.resolve())
    # No staging or backup folders left beside the model.
    assert [q.name for q in models[which].parent.iterdir() if q.name.startswith(".")] == []


def test_onnx_metadata_travels_inside_the_file(models):
    import onnx

    proto = onnx.load(str(models[1] / "model.onnx"))
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["class_names"]) == ["bag", "sneaker", "trouser"]
    assert json.loads(meta["preprocessing"])["resize"] == 40
    assert [i.name for i in proto.graph.input] == ["pixels"]
    assert [o.name for o in proto.graph.output] == ["probabilities", "features"]


def test_native_and_onnx_predictions_agree(models, tiny_head):
    """Same photos through both runtimes via Predictor (native in fp32): same probabilities."""
    images = sorted((tiny_head.parent / "images").rglob("*.png"))
    p_native, e1 = Predictor.load(models[0], device="cpu", precision="fp32").predict_proba(images, workers=0)
    p_onnx, e2 = Predictor.load(models[1], device="cpu").predict_proba(images, workers=0)
    assert not any(e1) and not any(e2)
    np.testing.assert_allclose(p_onnx, p_native, atol=1e-5)
    # Measured (fp32 / bf16 head features): max |dp| 1.2e-7 / 1.8e-7, smallest top-2 gap 0.118 / 0.117
    # on the 18 photos: a flip would need 10^5 x the difference, so every top-1 must agree.
    assert (p_onnx.argmax(1) == p_native.argmax(1)).all()


def test_exported_head_equals_the_fitted_estimator(models, tiny_head):
    """The model's head computes what the scikit-learn head computes on the same features."""
    est = load_head_estimator(tiny_head)
    model = load_model(models[0]).model
    images = sorted((tiny_head.parent / "images").rglob("*.png"))[:6]
    prep = load_model(models[0]).preprocessing
    pixels = torch.from_numpy(np.stack([load_pixels(p, prep) for p in images]))
    with torch.inference_mode():
        feats = model.features(pixels).numpy()
        probs = model(pixels).softmax(1).numpy()
    np.testing.assert_allclose(probs, est.predict_proba(feats), atol=1e-5)


def test_parity_failure_writes_nothing_and_keeps_the_old_model(models, tiny_head, tmp_path, run_cli):
    out = tmp_path / "model"
    shutil.copytree(models[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # ONNX differs from PyTorch by ~1e-7 on these images: a zero tolerance must fail.
    r = run_cli("export", tiny_head, "--out", out, "--format", "onnx", "--parity-tolerance", "0")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: parity check failed: the exported onnx model's probabilities differ from PyTorch's" in r.output
    assert "nothing was written" in r.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [q.name for q in tmp_path.iterdir()] == ["model"]


def test_cli_export_reports_parity(tiny_head, tmp_path, run_cli):
    r = run_cli("export", tiny_head, "--out", tmp_path / "m")
    assert r.exit_code == 0, r.output
    assert "native model written (model.pt + manifest.json); parity max |dp| 0 on " in r.output


def test_export_refuses_to_overwrite_a_foreign_folder(tiny_head, tmp_path, run_cli):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "keep.jpg").write_bytes(b"x")
    r = run_cli("export", tiny_head, "--out", tmp_path / "photos")
    assert r.exit_code == 1 and "is not a headstart model directory; choose another --out" in r.output
    assert (tmp_path / "photos" / "keep.jpg").is_file()


def test_parity_falls_back_to_the_bundled_catalog():
    from pipeline.models.backbones import get_spec

    pixels, origin = sample_pixels([Path("/nonexistent/a.png")], get_spec("tiny").preprocessing)
    assert origin == "bundled sample catalog" and pixels.shape == (16, 3, 32, 32) and pixels.dtype == np.uint8


# --------------------------------------------------------------------------- head checks


@pytest.fixture
def head_copy(tiny_head, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_head, tmp_path / "head"))


@pytest.mark.parametrize("name", ["head.npz", "head.joblib"])
def test_tampered_head_file_is_refused_before_loading(head_copy, tmp_path, run_cli, name):
    data = bytearray((head_copy / name).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (head_copy / name).write_bytes(bytes(data))
    r = run_cli("export", head_copy, "--out", tmp_path / "m")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert f"Error: {head_copy / name} does not match the sha256 recorded in head.json" in r.output
    assert "re-run `headstart fit-head`" in r.output
    with pytest.raises(ArtifactError, match=r"does not match the sha256"):
        load_head_estimator(head_copy)


def test_truncated_joblib_is_refused_by_the_estimator_loader(head_copy):
    path = head_copy / "head.joblib"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"head\.joblib does not match the sha256 recorded in head\.json"):
        load_head_estimator(head_copy)
    with pytest.raises(ArtifactError, match=r"head\.joblib does not match"):  # export refuses it too
        read_head(head_copy)


def test_head_from_a_newer_headstart_is_refused(head_copy, tmp_path, run_cli):
    meta = json.loads((head_copy / "head.json").read_text(encoding="utf-8"))
    meta["schema_version"] = 99
    (head_copy / "head.json").write_text(json.dumps(meta), encoding="utf-8")
    r = run_cli("export", head_copy, "--out", tmp_path / "m")
    assert r.exit_code == 1
    assert "was written by a newer headstart (head schema v99, this one reads v1); upgrade headstart" in r.output


def test_not_a_head_directory(tmp_path, run_cli):
    r = run_cli("export", tmp_path, "--out", tmp_path / "m")
    assert r.exit_code == 1 and f"Error: {tmp_path} is not a head directory (no head.json)" in r.output


def test_mlp_head_spec_exports_in_both_formats(head_copy, tmp_path):
    """A head kind other than linear: the spec (kind + tensors) is all export needs."""
    g = np.random.default_rng(0)
    tensors = {
        "layers.0.weight": g.normal(size=(8, 32)).astype(np.float32),
        "layers.0.bias": g.normal(size=8).astype(np.float32),
        "layers.1.weight": g.normal(size=(3, 8)).astype(np.float32),
        "layers.1.bias": g.normal(size=3).astype(np.float32),
    }
    np.savez(head_copy / "head.npz", kind="mlp", **tensors)
    meta = json.loads((head_copy / "head.json").read_text(encoding="utf-8"))
    from pipeline.core.hashing import sha256_file

    meta["files"] = {"head.npz": sha256_file(head_copy / "head.npz")}
    (head_copy / "head.json").write_text(json.dumps(meta), encoding="utf-8")
    for fmt in ("native", "onnx"):
        out = export(ExportConfig(head=str(head_copy), out=str(tmp_path / fmt), format=fmt))
        m = _manifest(out)
        assert m["head"]["kind"] == "mlp" and m["parity"]["max_abs_diff"] < 1e-5
    loaded = load_model(tmp_path / "native")
    ref = build_head("mlp", {k: torch.from_numpy(v) for k, v in tensors.items()})
    x = torch.randn(4, 32)
    torch.testing.assert_close(loaded.model.head(x), ref(x))


def test_models_exported_by_the_foundation_still_load(models, tmp_path):
    """Schema v1 (the first release's models): no runtime, head named after the estimator, ImageNet layer inside."""
    old = Path(shutil.copytree(models[0], tmp_path / "v1"))
    state = torch.load(old / "model.pt", weights_only=True)
    state["net.imagenet_head.weight"] = torch.zeros(1000, 32)
    torch.save(state, old / "model.pt")
    m = _manifest(old)
    for key in ("runtime", "parity", "input"):
        del m[key]
    from pipeline.core.hashing import sha256_file

    m.update(
        schema_version=1,
        head={"kind": "logreg", "n_classes": 3, "C": 1.0},
        files={"model.pt": sha256_file(old / "model.pt")},
    )
    (old / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    loaded = load_model(old)
    assert loaded.runtime == "native" and loaded.manifest["head"]["kind"] == "linear"
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    torch.testing.assert_close(loaded.model(x), load_model(models[0]).model(x))


def test_onnx_without_the_extra_says_how_to_install_it(tiny_head, tmp_path, run_cli, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)  # as if `pip install '.[onnx]'` never ran
    r = run_cli("export", tiny_head, "--out", tmp_path / "m", "--format", "onnx")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert (
        "Error: ONNX support needs the optional 'onnx' package; install it from the clone with `pip install '.[onnx]'`"
        in r.output
    )
    assert not (tmp_path / "m").exists() and list(tmp_path.iterdir()) == []


def test_export_removes_staging_folders_of_a_killed_export_and_is_readable_by_others(tiny_head, tmp_path, run_cli):
    """kill -9 during export left ``.MODEL.old-PID`` and ``.MODEL.partial-*`` beside the model;
    and the model directory came out 0700 (mkdtemp), unreadable by a serving account."""
    import os
    import stat
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".m.partial-{dead.pid}-abc123", tmp_path / f".m.old-{dead.pid}-def456"]
    for d in stale:
        d.mkdir()
        (d / "model.pt").write_bytes(b"half")
    old_umask = os.umask(0o022)
    try:
        r = run_cli("export", tiny_head, "--out", tmp_path / "m")
        assert r.exit_code == 0, r.output
        r = run_cli("export", tiny_head, "--out", tmp_path / "m")  # over an existing model
        assert r.exit_code == 0, r.output
    finally:
        os.umask(old_umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert stat.S_IMODE((tmp_path / "m").stat().st_mode) == 0o755
