"""A native model of a library or imported backbone is self-contained: ``MODEL/backbone/`` holds the
architecture's configuration (never weights), so the model predicts on a machine with no
backbone registry and no Hugging Face cache - here a subprocess whose ``HEADSTART_CACHE_DIR`` and
``HF_HOME`` are fresh empty folders and whose imported folder has been deleted - with the
probabilities of the exporting machine. A changed configuration file is an ``Error:``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_hub_backbones import _fake_hf_cache, save_hf, save_open_clip, save_timm

from pipeline.artifacts.model_dir import load_model
from pipeline.errors import ArtifactError

pytest.importorskip("timm")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def own_registry(tmp_path, monkeypatch):
    """The exporting machine: its own backbone registry and Hugging Face cache."""
    from huggingface_hub import constants

    from pipeline.models import hub

    monkeypatch.setenv("HEADSTART_CACHE_DIR", str(tmp_path / "headstart-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    hub.forget()
    yield
    hub.forget()


def chain(run_cli, catalog: Path, tmp: Path, backbone: str) -> Path:
    """extract -> fit-head -> export native; returns the model directory."""
    cache, head, model = tmp / "f.h5", tmp / "head", tmp / "model"
    r = run_cli("extract", catalog, "--out", cache, "--backbone", backbone, "--no-progress", "--workers", "0")
    assert r.exit_code == 0, r.output
    r = run_cli("fit-head", cache, "--out", head, "--c", "1", "--near-duplicate-threshold", "1")
    assert r.exit_code == 0, r.output
    r = run_cli("export", head, "--out", model, "--format", "native")
    assert r.exit_code == 0, r.output
    return model


PREDICT = ("--top-k", "3", "--engine", "torch", "--precision", "fp32", "--workers", "0", "--no-progress")


def probabilities(jsonl: Path) -> dict[str, dict[str, float]]:
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    assert rows and all(r["error"] is None for r in rows)
    return {Path(r["path"]).name: {t["label"]: t["probability"] for t in r["top_k"]} for r in rows}


def predict_elsewhere(model: Path, catalog: Path, out: Path, tmp: Path) -> subprocess.CompletedProcess[str]:
    """`headstart predict` as on another machine: no registry, no Hugging Face cache."""
    empty = tmp / "elsewhere"
    (empty / "headstart").mkdir(parents=True)
    (empty / "hf").mkdir()
    env = {**os.environ, "HEADSTART_CACHE_DIR": str(empty / "headstart"), "HF_HOME": str(empty / "hf")}
    env.pop("HF_HUB_CACHE", None)
    cmd = [sys.executable, "-m", "pipeline", "predict", str(model), str(catalog), "--out", str(out), *PREDICT]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def assert_same(a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]) -> None:
    assert a.keys() == b.keys() and len(a) == 18
    for name in a:
        assert a[name].keys() == b[name].keys() and len(a[name]) == 3
        for label in a[name]:
            assert abs(a[name][label] - b[name][label]) <= 1e-5, (name, label, a[name][label], b[name][label])


# timm in the default suite; the other two families take the same road (`make test-slow`).
@pytest.mark.parametrize(
    "family", ["timm", pytest.param("hf", marks=pytest.mark.slow), pytest.param("open_clip", marks=pytest.mark.slow)]
)
def test_imported_backbone_model_predicts_without_the_registry(family, small_catalog, tmp_path, run_cli):
    if family == "timm":
        folder, _ = save_timm("test_vit", tmp_path / "src")
        files, size = ["config.json"], ["--image-size", "64"]
    elif family == "hf":
        folder, _ = save_hf("dinov2", tmp_path / "src")
        files, size = ["config.json", "preprocessor_config.json"], []
    else:
        folder = save_open_clip(tmp_path / "src")
        files, size = ["open_clip_config.json"], []
    r = run_cli("backbones", "import", folder, "--as", "mine", *size)
    assert r.exit_code == 0, r.output
    model = chain(run_cli, small_catalog, tmp_path, "mine")

    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["schema_version"] == 3
    assert manifest["architecture"] == {"family": family, "folder": "backbone"}
    assert sorted(p.name for p in (model / "backbone").iterdir()) == files  # configuration only, no weights
    for f in files:
        assert (model / "backbone" / f).read_bytes() == (folder / f).read_bytes()
        assert len(manifest["files"][f"backbone/{f}"]) == 64
    assert manifest["parity"]["max_abs_diff"] < 1e-4  # the parity check loaded it from backbone/

    here = tmp_path / "here.jsonl"
    r = run_cli("predict", model, small_catalog, "--out", here, *PREDICT)
    assert r.exit_code == 0, r.output
    shutil.rmtree(folder)  # the imported folder is not on the other machine either
    there = tmp_path / "there.jsonl"
    p = predict_elsewhere(model, small_catalog, there, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Traceback" not in p.stderr
    assert_same(probabilities(here), probabilities(there))

    if family == "timm":
        # The model builds from its own files even where the name now means another network:
        # here "mine" is re-imported as a CNN; the exported ViT still predicts as before.
        cnn, _ = save_timm("test_efficientnet", tmp_path / "cnn")
        assert run_cli("backbones", "import", cnn, "--as", "mine").exit_code == 0
        again = tmp_path / "again.jsonl"
        assert run_cli("predict", model, small_catalog, "--out", again, *PREDICT).exit_code == 0
        assert_same(probabilities(here), probabilities(again))


@pytest.mark.slow
def test_timm_library_name_writes_its_builtin_config(small_catalog, tmp_path, run_cli):
    """``timm/MODEL`` whose cached snapshot holds the weights only: the architecture came from
    timm's built-in config, which export writes out as config.json in save_for_hf's layout."""
    from huggingface_hub import constants

    src, _ = save_timm("test_vit", tmp_path / "src", num_classes=1000)
    (src / "config.json").unlink()
    _fake_hf_cache(Path(constants.HF_HUB_CACHE), "timm/test_vit.r160_in1k", src)
    model = chain(run_cli, small_catalog, tmp_path, "timm/test_vit.r160_in1k@64:cls")
    cfg = json.loads((model / "backbone" / "config.json").read_text())
    assert cfg["architecture"] == "test_vit" and cfg["model_args"] == {"num_classes": 1000}
    assert cfg["pretrained_cfg"]["input_size"] == [3, 160, 160]
    here = tmp_path / "here.jsonl"
    assert run_cli("predict", model, small_catalog, "--out", here, *PREDICT).exit_code == 0
    there = tmp_path / "there.jsonl"
    p = predict_elsewhere(model, small_catalog, there, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_same(probabilities(here), probabilities(there))


@pytest.fixture
def timm_model(small_catalog, tmp_path, run_cli) -> Path:
    folder, _ = save_timm("test_vit", tmp_path / "src")
    assert run_cli("backbones", "import", folder, "--as", "vit", "--image-size", "32").exit_code == 0
    return chain(run_cli, small_catalog, tmp_path, "vit")


def _edit_manifest(model: Path, edit) -> None:  # type: ignore[no-untyped-def]
    m = json.loads((model / "manifest.json").read_text())
    edit(m)
    (model / "manifest.json").write_text(json.dumps(m))


def test_changed_or_smuggled_backbone_files_are_errors(timm_model, small_catalog, tmp_path):
    model = timm_model
    config = model / "backbone" / "config.json"
    original = config.read_bytes()

    # a changed configuration file: Error naming it, from the CLI in a fresh process
    cfg = json.loads(original)
    cfg["model_args"] = {**cfg.get("model_args", {}), "depth": 1}
    config.write_text(json.dumps(cfg))
    p = predict_elsewhere(model, small_catalog, tmp_path / "x.jsonl", tmp_path)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "Error:" in p.stderr and "backbone/config.json does not match the sha256" in p.stderr
    assert "Traceback" not in p.stderr
    config.write_bytes(original)
    assert load_model(model).model is not None  # restored: loads again

    # a file the manifest does not list (the library would read it): refused
    (model / "backbone" / "model.safetensors").write_bytes(b"not vouched for")
    with pytest.raises(ArtifactError, match=r"model\.safetensors is not listed in manifest\.json"):
        load_model(model)
    (model / "backbone" / "model.safetensors").unlink()

    # a symlink out of the model, even to a file with the right contents
    outside = tmp_path / "outside.json"
    outside.write_bytes(original)
    config.unlink()
    config.symlink_to(outside)
    with pytest.raises(ArtifactError, match="is a link or not a plain file"):
        load_model(model)
    config.unlink()
    config.write_bytes(original)
    shutil.move(model / "backbone", tmp_path / "real-backbone")
    (model / "backbone").symlink_to(tmp_path / "real-backbone", target_is_directory=True)
    with pytest.raises(ArtifactError, match="not a folder of the model's own"):
        load_model(model)
    (model / "backbone").unlink()
    shutil.move(tmp_path / "real-backbone", model / "backbone")

    # names that leave the folder, a missing family file, an unknown family
    digest = json.loads((model / "manifest.json").read_text())["files"]["backbone/config.json"]
    for name in ("backbone/../manifest.json", "backbone/sub/config.json", "backbone//etc/passwd"):
        _edit_manifest(model, lambda m, name=name: m["files"].__setitem__(name, digest))
        with pytest.raises(ArtifactError, match="only plain file names"):
            load_model(model)
        _edit_manifest(model, lambda m, name=name: m["files"].pop(name))
    _edit_manifest(model, lambda m: m["files"].pop("backbone/config.json"))
    with pytest.raises(ArtifactError, match=r"'files' lacks backbone/config\.json"):
        load_model(model)
    _edit_manifest(model, lambda m: m["files"].__setitem__("backbone/config.json", digest))
    _edit_manifest(model, lambda m: m.__setitem__("architecture", {"family": "keras", "folder": "backbone"}))
    with pytest.raises(ArtifactError, match="'architecture' is"):
        load_model(model)
    _edit_manifest(model, lambda m: m.pop("architecture"))
    with pytest.raises(ArtifactError, match="lists files in backbone/ but has no 'architecture'"):
        load_model(model)


def test_builtin_backbones_and_onnx_models_get_no_backbone_folder(tiny_head, timm_model, tmp_path, run_cli):
    from pipeline.config import ExportConfig
    from pipeline.export import export

    model = export(ExportConfig(head=str(tiny_head), out=str(tmp_path / "tiny"), format="native"))
    manifest = json.loads((model / "manifest.json").read_text())
    assert "architecture" not in manifest and not (model / "backbone").exists()
    assert sorted(manifest["files"]) == ["model.pt"]
    assert load_model(model).model is not None
    pytest.importorskip("onnxruntime")
    r = run_cli("export", tmp_path / "head", "--out", tmp_path / "onnx", "--format", "onnx")  # timm_model's head
    assert r.exit_code == 0, r.output
    manifest = json.loads((tmp_path / "onnx" / "manifest.json").read_text())
    assert "architecture" not in manifest and not (tmp_path / "onnx" / "backbone").exists()


def test_open_clip_library_name_writes_the_builtin_model_config():
    """``open_clip/ARCH:TAG``: the built-in model_cfg, with the tag's QuickGELU, and the
    preprocessing the features were made with (no model is built here)."""
    open_clip = pytest.importorskip("open_clip")
    from pipeline.data.preprocessing import Preprocessing
    from pipeline.models import hub

    prep = Preprocessing(resize=224, crop=224, mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6), interpolation="bicubic")
    family, files = hub.architecture_files("open_clip/ViT-B-32:openai@224:default", prep)
    doc = json.loads(files["open_clip_config.json"])
    assert family == "open_clip" and list(files) == ["open_clip_config.json"]
    assert doc["model_cfg"] == {**open_clip.get_model_config("ViT-B-32"), "quick_gelu": True}
    assert doc["preprocess_cfg"] == {
        "size": 224,
        "mean": [0.1, 0.2, 0.3],
        "std": [0.4, 0.5, 0.6],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }
    assert hub.architecture_files("efficientnet_lite0", prep) is None
