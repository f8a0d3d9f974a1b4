"""Loading an exported model never runs code and never shows a traceback: tampered, truncated,
newer-schema, malformed and foreign inputs each give one clear ``Error:`` line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.artifacts.model_dir import load_model
from pipeline.config import ExportConfig
from pipeline.errors import ArtifactError
from pipeline.export import export


@pytest.fixture(scope="module")
def exported(tiny_head, tmp_path_factory):
    root = tmp_path_factory.mktemp("safe")
    return {
        fmt: export(ExportConfig(head=str(tiny_head), out=str(root / fmt), format=fmt)) for fmt in ("native", "onnx")
    }


@pytest.fixture
def photo(tiny_head) -> Path:
    return sorted((tiny_head.parent / "images" / "bag").glob("*.png"))[0]


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "model"))


def _predict_error(run_cli, model: Path, photo: Path, tmp_path: Path) -> str:
    r = run_cli("predict", model, photo, "--out", tmp_path / "p.csv", "--no-progress", "--workers", "0")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output and r.output.startswith("Error: ")
    assert len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "p.csv").exists()
    return r.output


def _set_manifest(model: Path, **changes) -> None:
    m = json.loads((model / "manifest.json").read_text(encoding="utf-8"))
    m.update(changes)
    (model / "manifest.json").write_text(json.dumps(m), encoding="utf-8")


def test_the_good_model_loads(exported, run_cli, photo, tmp_path):
    r = run_cli("predict", exported["native"], photo, "--out", tmp_path / "p.csv", "--no-progress", "--workers", "0")
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("fmt", ["native", "onnx"])
def test_tampered_network_file(exported, run_cli, photo, tmp_path, fmt):
    model = _copy(exported[fmt], tmp_path)
    name = "model.pt" if fmt == "native" else "model.onnx"
    data = bytearray((model / name).read_bytes())
    data[len(data) // 3] ^= 0x01  # one bit
    (model / name).write_bytes(bytes(data))
    out = _predict_error(run_cli, model, photo, tmp_path)
    assert f"{model / name} does not match the sha256 recorded in manifest.json (tampered with or truncated)" in out


@pytest.mark.parametrize("fmt", ["native", "onnx"])
def test_truncated_network_file(exported, run_cli, photo, tmp_path, fmt):
    model = _copy(exported[fmt], tmp_path)
    name = "model.pt" if fmt == "native" else "model.onnx"
    (model / name).write_bytes((model / name).read_bytes()[:1000])
    assert "(tampered with or truncated); re-export" in _predict_error(run_cli, model, photo, tmp_path)


def test_missing_network_file(exported, run_cli, photo, tmp_path):
    model = _copy(exported["native"], tmp_path)
    (model / "model.pt").unlink()
    assert f"{model / 'model.pt'} is missing" in _predict_error(run_cli, model, photo, tmp_path)


def test_manifest_from_a_newer_schema(exported, run_cli, photo, tmp_path):
    model = _copy(exported["native"], tmp_path)
    _set_manifest(model, schema_version=7)
    out = _predict_error(run_cli, model, photo, tmp_path)
    assert "was exported by a newer headstart (model schema v7, this one reads v3 and older); upgrade headstart" in out


@pytest.mark.parametrize(
    "content, expected",
    [
        ("{not json", "manifest.json is not valid JSON"),
        ("[1, 2]", "is not an exported headstart model manifest (not a JSON object)"),
        ('{"format": "something-else"}', "manifest.json is not a headstart model manifest"),
        ('{"format": "headstart-model", "schema_version": 2}', "manifest.json is incomplete or malformed"),
        ('{"format": "headstart-model", "schema_version": "2"}', "manifest.json has no valid schema_version"),
    ],
)
def test_malformed_manifests(exported, run_cli, photo, tmp_path, content, expected):
    model = _copy(exported["native"], tmp_path)
    (model / "manifest.json").write_text(content, encoding="utf-8")
    assert expected in _predict_error(run_cli, model, photo, tmp_path)


def test_a_folder_of_photos_is_not_a_model(run_cli, photo, tmp_path):
    out = _predict_error(run_cli, photo.parent, photo, tmp_path)
    assert f"{photo.parent} is not an exported headstart model (no manifest.json)" in out


def test_a_file_is_not_a_model(exported, run_cli, photo, tmp_path):
    out = _predict_error(run_cli, exported["native"] / "model.pt", photo, tmp_path)
    assert "is a file; pass the model directory that holds manifest.json" in out


def test_unknown_head_kind(exported, run_cli, photo, tmp_path):
    model = _copy(exported["native"], tmp_path)
    m = json.loads((model / "manifest.json").read_text(encoding="utf-8"))
    _set_manifest(model, head={**m["head"], "kind": "transformer"})
    out = _predict_error(run_cli, model, photo, tmp_path)
    from pipeline.models.heads import HEAD_BUILDERS

    builds = ", ".join(HEAD_BUILDERS)
    assert "linear" in builds and "mlp" in builds
    assert f"unknown head kind 'transformer' (this headstart builds: {builds}); upgrade headstart" in out


class _Exploit:
    """Unpickling this calls os.system - what a malicious model.pt would contain."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _resign(model: Path) -> None:
    """An attacker who can replace model.pt can rewrite the manifest's checksum too."""
    sha = hashlib.sha256((model / "model.pt").read_bytes()).hexdigest()
    _set_manifest(model, files={"model.pt": sha})


def test_malicious_pickle_is_refused_and_nothing_runs(exported, run_cli, photo, tmp_path):
    model = _copy(exported["native"], tmp_path)
    marker = tmp_path / "pwned"
    state = torch.load(model / "model.pt", weights_only=True)
    state["head.bias"] = _Exploit(marker)  # hidden among real tensors
    torch.save(state, model / "model.pt")
    _resign(model)

    out = _predict_error(run_cli, model, photo, tmp_path)
    assert "holds something other than plain tensors and was refused without running it" in out
    assert not marker.exists()
    with pytest.raises(ArtifactError, match="refused without running it"):
        load_model(model)
    assert not marker.exists()

    # The file really is an exploit: an unrestricted unpickler would have run it.
    torch.load(model / "model.pt", weights_only=False)
    assert marker.exists()


def test_plain_pickle_that_is_not_a_state_dict(exported, run_cli, photo, tmp_path):
    model = _copy(exported["native"], tmp_path)
    torch.save([torch.zeros(3)], model / "model.pt")
    _resign(model)
    assert "is not a state dict of tensors" in _predict_error(run_cli, model, photo, tmp_path)


def test_state_dict_of_another_network(exported, run_cli, photo, tmp_path):
    model = _copy(exported["native"], tmp_path)
    torch.save({"head.weight": torch.zeros(3, 32), "head.bias": torch.zeros(3)}, model / "model.pt")
    _resign(model)
    assert "the weights do not fit tiny with a linear head" in _predict_error(run_cli, model, photo, tmp_path)


def test_onnx_file_that_is_not_a_graph(exported, run_cli, photo, tmp_path):
    model = _copy(exported["onnx"], tmp_path)
    (model / "model.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf graph")
    sha = hashlib.sha256((model / "model.onnx").read_bytes()).hexdigest()
    _set_manifest(model, files={"model.onnx": sha})
    assert "cannot be loaded by onnxruntime" in _predict_error(run_cli, model, photo, tmp_path)
