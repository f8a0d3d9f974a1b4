"""Stage: head directory -> one self-describing model directory. ``export(cfg) -> path``.

``MODEL/`` holds two files:

* ``model.pt`` - tensors only (backbone + head state dicts), loaded with
  ``torch.load(weights_only=True)``: no arbitrary object is ever unpickled at predict time;
* ``manifest.json`` - format and schema version, backbone identity and weights sha256,
  preprocessing, precision, class names, head shape, provenance (head metrics, cache, versions)
  and the sha256 of ``model.pt``, checked before loading.

The architecture is rebuilt from the backbone registry by name, so the artifact needs headstart
(and the backbone's model code) installed, but not the original weights file.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import __version__
from .backbones import FeatureNet, Preprocessing, get_spec, load_backbone, sha256_file, with_preprocessing
from .config import ExportConfig, save_resolved
from .errors import ArtifactError, BackboneError

MODEL_FORMAT = "headstart-model"
MODEL_SCHEMA_VERSION = 1


class Classifier(nn.Module):
    """uint8 pixels -> class logits: normalisation, backbone, linear head in one module."""

    def __init__(self, net: FeatureNet, n_classes: int) -> None:
        super().__init__()
        self.net = net
        self.head = nn.Linear(net.feature_dim, n_classes)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(pixels).float())


@dataclass
class LoadedModel:
    model: Classifier
    manifest: dict[str, Any]
    preprocessing: Preprocessing

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def precision(self) -> str:
        return str(self.manifest["precision"])


def read_head(head_dir: Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    meta_path = head_dir / "head.json"
    if not meta_path.is_file():
        raise ArtifactError(f"{head_dir} is not a head directory (no head.json); create one with `headstart fit-head`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    want = meta.get("files", {}).get("head.npz")
    npz = head_dir / "head.npz"
    if not npz.is_file() or want is None or sha256_file(npz) != want:
        raise ArtifactError(f"{npz} is missing or does not match the sha256 recorded in head.json; re-run fit-head")
    with np.load(npz, allow_pickle=False) as z:
        return meta, z["weight"], z["bias"]


def export(cfg: ExportConfig) -> Path:
    head_dir = Path(cfg.head)
    meta, weight, bias = read_head(head_dir)
    fp = meta["fingerprint"]
    prep = Preprocessing.from_dict(json.loads(fp["preprocessing"]))
    spec = with_preprocessing(get_spec(fp["backbone"]), prep)
    loaded = load_backbone(spec, cfg.weights_file)
    if loaded.weights_sha256 != fp["weights_sha256"]:
        raise BackboneError(
            f"the {spec.name} weights on this machine (sha256 {loaded.weights_sha256[:12]}) differ from the ones "
            f"the features were extracted with ({fp['weights_sha256'][:12]}); pass the same file with --weights-file"
        )
    model = Classifier(loaded.net, len(meta["class_names"]))
    with torch.no_grad():
        model.head.weight.copy_(torch.from_numpy(weight))
        model.head.bias.copy_(torch.from_numpy(bias))

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), out / "model.pt")
    manifest = {
        "format": MODEL_FORMAT,
        "schema_version": MODEL_SCHEMA_VERSION,
        "backbone": {
            "name": spec.name,
            "weights": fp["weights"],
            "weights_sha256": fp["weights_sha256"],
            "feature_dim": spec.feature_dim,
        },
        "preprocessing": prep.to_dict(),
        "precision": fp["precision"],
        "class_names": meta["class_names"],
        "head": {"kind": meta["kind"], "n_classes": len(meta["class_names"]), "C": meta.get("C")},
        "provenance": {
            "head_dir": str(head_dir.resolve()),
            "head_metrics": {k: meta["metrics"][k] for k in ("accuracy", "macro_f1", "n", "split")},
            "cache": meta.get("cache"),
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "headstart_version": __version__,
            "torch_version": torch.__version__,
        },
        "files": {"model.pt": sha256_file(out / "model.pt")},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    save_resolved(cfg, out / "config.json")
    return out


def load_model(path: str | Path) -> LoadedModel:
    """Load an exported model safely: manifest checks, checksum, tensors-only unpickling."""
    root = Path(path)
    manifest_path = root / "manifest.json"
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{root} is not an exported headstart model (no manifest.json); create one with `headstart export`"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path} is not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MODEL_FORMAT:
        raise ArtifactError(f"{manifest_path} is not a headstart model manifest")
    if int(manifest.get("schema_version", 0)) > MODEL_SCHEMA_VERSION:
        raise ArtifactError(
            f"{root} was exported by a newer headstart (model schema v{manifest['schema_version']}, "
            f"this one reads v{MODEL_SCHEMA_VERSION}); upgrade headstart"
        )
    weights = root / "model.pt"
    want = manifest.get("files", {}).get("model.pt")
    if not weights.is_file() or want is None or sha256_file(weights) != want:
        raise ArtifactError(
            f"{weights} is missing or its sha256 does not match the manifest (tampered or truncated); re-export"
        )
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    spec = with_preprocessing(get_spec(manifest["backbone"]["name"]), prep)
    loaded = load_backbone(spec, load_weights=False)
    model = Classifier(loaded.net, int(manifest["head"]["n_classes"]))
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    except Exception as e:
        raise ArtifactError(f"{weights} cannot be loaded: {str(e).splitlines()[0]}") from None
    model.eval()
    return LoadedModel(model=model, manifest=manifest, preprocessing=prep)
