"""The model directory (``headstart export``): written, loaded back, parity-checked, then moved
into place; and read back safely (``load_model``) by predict and evaluate.

``MODEL/`` holds:

* ``model.pt`` (``--format native``) - tensors only, loaded with ``torch.load(weights_only=True)``;
  or ``model.onnx`` (``--format onnx``) - a graph that needs neither headstart nor PyTorch;
* ``manifest.json`` - format and schema version, which runtime, backbone identity and weights
  sha256, preprocessing, precision, class names, category tree (``tree``, when the head has one),
  head spec, the parity check's result, provenance, and the sha256 of every file, checked before
  anything is loaded;
* ``config.json`` - the configuration used.
* ``backbone/`` (native, library and imported backbones only) - the architecture's configuration
  files, which the network is built from at load (:mod:`.architecture`).

Both networks take uint8 RGB pixels ``[N, 3, crop, crop]`` and normalise inside. Resizing and
cropping stay outside, in Pillow (``data.images.load_pixels``; the README's "Exported models and
deploying" for other callers): ONNX's Resize cannot reproduce Pillow's antialiased bicubic filter bit for bit, and
training used Pillow, so resizing in the graph would trade exact parity for convenience.

**Parity.** Before the directory appears, the written file is loaded back through its own
runtime (``load_model`` or onnxruntime) and run on up to 16 real sample images; the largest
probability difference from the in-memory PyTorch model is recorded in the manifest, and
writing fails above the tolerance. Writing goes to a staging directory that is renamed into
place, so a failed or interrupted export never leaves a half-written model behind.

Anything that can produce a :class:`ModelSource` (a head directory, a fine-tune directory) can
be written by :func:`write_model`; :func:`build_classifier` turns (manifest, state dict) back
into the network.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..config import save_resolved
from ..core.atomic import replace_dir, stage_dir
from ..core.hashing import sha256_file
from ..core.torchio import atomic_torch_save
from ..data import SAMPLE_CATALOG
from ..data.images import DecodeError, load_pixels
from ..data.preprocessing import Preprocessing
from ..data.tree import Tree
from ..errors import ArtifactError, BackboneError, InputError
from ..models.backbones import get_spec, load_backbone, with_preprocessing
from ..models.fingerprint import Fingerprint
from ..models.heads import Classifier, build_head, head_tensors
from .architecture import architecture_spec, check_architecture, plain_files, verify_architecture, write_architecture
from .attribute_heads import attribute_entries, attribute_outputs, check_attributes
from .head_dir import checked_class_names, checked_files, read_json, verify_files

MODEL_FORMAT = "headstart-model"
# v3: a library backbone's architecture in backbone/ (artifacts/architecture.py); v2: runtime, head
# spec kind, parity; v1 (the first models). All are still read.
MODEL_SCHEMA_VERSION = 3
RUNTIMES = {"native": "model.pt", "onnx": "model.onnx"}
PARITY_IMAGES = 16


# --------------------------------------------------------------------------- writing


@dataclass
class ModelSource:
    """Everything export needs, whatever produced the network (head directory, fine-tuning)."""

    classifier: Classifier  # fp32, CPU, eval mode
    fingerprint: Fingerprint  # backbone, weights, preprocessing, the precision of the head's features
    class_names: list[str]
    head: dict[str, Any]  # kind (a HEAD_BUILDERS key) + descriptive entries
    provenance: dict[str, Any]
    sample_images: list[Path] = field(default_factory=list)  # for the parity check
    extra: dict[str, Any] = field(default_factory=dict)  # more top-level manifest keys
    # The further attributes' heads (classifier.attributes, same order): the manifest's
    # "attributes" entries - name, class_names, multi_label, thresholds, head - less "output".
    attributes: list[dict[str, Any]] = field(default_factory=list)


def write_model(
    src: ModelSource, out: str | Path, *, fmt: str = "native", tolerance: float = 1e-3, config: Any = None
) -> Path:
    """Write, load back, parity-check, then move into place. Returns ``out``."""
    out = Path(out)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "manifest.json").is_file())):
        raise InputError(f"{out} exists and is not a headstart model directory; choose another --out")
    stage = stage_dir(out)
    try:
        filename = RUNTIMES[fmt]
        extra: dict[str, Any] = {}
        if fmt == "onnx":
            from .onnx import export_onnx

            extra["outputs"] = export_onnx(
                src.classifier, stage / filename, src.fingerprint.preprocessing.crop, _metadata(src),
                attribute_outputs(src.attributes),
            )  # fmt: skip
        else:
            atomic_torch_save(src.classifier.state_dict(), stage / filename)
        files = {filename: sha256_file(stage / filename)}
        if fmt == "native":  # the graph of an ONNX model needs nothing more
            arch, arch_files = write_architecture(src.fingerprint, stage)
            extra.update(arch)
            files.update(arch_files)
        manifest = _manifest(src, fmt, files, extra)
        _write_json(stage / "manifest.json", manifest)
        manifest["parity"] = _parity(src, stage, tolerance)
        _write_json(stage / "manifest.json", manifest)
        if config is not None:
            save_resolved(config, stage / "config.json")
        replace_dir(stage, out)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return out


def _manifest(src: ModelSource, fmt: str, files: dict[str, str], extra: dict[str, Any]) -> dict[str, Any]:
    fp = src.fingerprint
    crop = fp.preprocessing.crop
    return {
        "format": MODEL_FORMAT,
        "schema_version": MODEL_SCHEMA_VERSION,
        "runtime": fmt,
        "backbone": fp.manifest_backbone(),
        "preprocessing": fp.preprocessing.to_dict(),
        "precision": fp.precision,
        "class_names": src.class_names,
        "head": {**src.head, "n_classes": len(src.class_names)},
        **({"attributes": attribute_entries(src.attributes)} if src.attributes else {}),
        "input": {
            "name": "pixels",
            "dtype": "uint8",
            "shape": ["N", 3, crop, crop],
            "note": "RGB, resized and centre-cropped as 'preprocessing' says; normalisation is inside the model",
        },
        **extra,
        **src.extra,
        "provenance": {
            **src.provenance,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "headstart_version": __version__,
            "torch_version": torch.__version__,
        },
        "files": files,
    }


def _metadata(src: ModelSource) -> dict[str, str]:
    """Carried inside the .onnx file too, so the graph alone still says what it is."""
    return {
        "headstart_format": MODEL_FORMAT,
        "class_names": json.dumps(src.class_names, ensure_ascii=False),
        "preprocessing": json.dumps(src.fingerprint.preprocessing.to_dict()),
        "backbone": json.dumps(src.fingerprint.manifest_backbone()),
        "headstart_version": __version__,
        **({"tree": json.dumps(src.extra["tree"], ensure_ascii=False)} if src.extra.get("tree") else {}),
    }


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- parity


def sample_pixels(images: list[Path], prep: Preprocessing) -> tuple[np.ndarray, str]:
    """uint8 ``[n, 3, crop, crop]`` from the head's own photos, else the bundled catalog."""
    for origin, candidates in (("head's training images", images), ("bundled sample catalog", _catalog_images())):
        arrays = []
        for p in candidates:
            with contextlib.suppress(DecodeError, OSError):
                arrays.append(load_pixels(p, prep))
        if len(arrays) >= 2:
            return np.stack(arrays[:PARITY_IMAGES]), origin
    raise ArtifactError("no sample images could be decoded for the parity check; reinstall headstart")


def _catalog_images() -> list[Path]:
    # One or two photos per class, across classes: different inputs, different top-1 labels.
    test = SAMPLE_CATALOG / "test"
    folders = sorted(d for d in test.iterdir() if d.is_dir()) if test.is_dir() else []
    return [p for d in folders for p in sorted(d.glob("*.png"))[:2]]


def _parity(src: ModelSource, stage: Path, tolerance: float) -> dict[str, Any]:
    pixels, origin = sample_pixels(src.sample_images, src.fingerprint.preprocessing)
    want, want_attrs = _all_probabilities(src.classifier, pixels)
    loaded = load_model(stage)  # the real loading path: manifest, checksum, weights_only
    if loaded.runtime == "onnx":
        from .onnx import onnx_session

        outputs = ["probabilities", *attribute_outputs(src.attributes)]
        got, *got_attrs = onnx_session(loaded.weights_path).run(outputs, {"pixels": pixels})
        runtime = _ort_version()
    else:
        assert loaded.model is not None
        got, got_attrs = _all_probabilities(loaded.model, pixels)
        runtime = f"torch {torch.__version__}"
    # every output of the model: the main head's and each attribute's probabilities
    diff = max(float(np.abs(g - w).max()) for g, w in zip([got, *got_attrs], [want, *want_attrs], strict=True))
    result = {
        "max_abs_diff": diff,
        "tolerance": tolerance,
        "top1_agreement": float((got.argmax(1) == want.argmax(1)).mean()),
        "n_images": len(pixels),
        "images": origin,
        "reference": f"in-memory PyTorch model, fp32, CPU (torch {torch.__version__})",
        "runtime": runtime,
    }
    if not diff <= tolerance:  # also catches NaN
        raise ArtifactError(
            f"parity check failed: the exported {loaded.runtime} model's probabilities differ from PyTorch's by "
            f"up to {diff:.3g} on {len(pixels)} sample images (tolerance {tolerance:g}); nothing was written. "
            "Report this with the backbone name; --parity-tolerance raises the limit if you accept the difference"
        )
    return result


def _all_probabilities(model: Classifier, pixels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    with torch.inference_mode():
        feats = model.net(torch.from_numpy(pixels)).float()
        return model.head(feats).softmax(1).numpy(), [p.numpy() for p in model.attribute_probabilities(feats)]


def _ort_version() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


# --------------------------------------------------------------------------- loading


@dataclass
class LoadedModel:
    manifest: dict[str, Any]
    preprocessing: Preprocessing
    root: Path
    model: Classifier | None  # the PyTorch network (native runtime); None for ONNX

    @property
    def runtime(self) -> str:
        return str(self.manifest.get("runtime", "native"))

    @property
    def weights_path(self) -> Path:
        return self.root / RUNTIMES[self.runtime]

    @property
    def class_names(self) -> list[str]:
        return list(self.manifest["class_names"])

    @property
    def fingerprint(self) -> Fingerprint:
        return Fingerprint.from_manifest(self.manifest)

    @property
    def attributes(self) -> list[dict[str, Any]]:
        """The further attributes' entries of the manifest (checked on reading); [] for most models."""
        return list(self.manifest.get("attributes") or [])

    @property
    def tree(self) -> Tree | None:
        """The category tree over the classes (checked on reading); None for a model without one."""
        return Tree.from_record(self.manifest.get("tree"), self.class_names, what="manifest.json", fix=_REEXPORT)


_REEXPORT = "re-export it with `headstart export`"


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``manifest.json`` validated: format, schema version, required fields, file checksums.
    Every problem is an ``ArtifactError`` naming the file and what to do."""
    root = Path(path)
    if root.is_file():
        raise ArtifactError(
            f"{root} is a file; pass the model directory that holds manifest.json (written by `headstart export`)"
        )
    what = "an exported headstart model"
    manifest = read_json(root / "manifest.json", what=what, fix="create one with `headstart export`")
    if manifest.get("format") != MODEL_FORMAT:
        raise ArtifactError(f"{root / 'manifest.json'} is not a headstart model manifest; {_REEXPORT}")
    version = manifest.get("schema_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{root / 'manifest.json'} has no valid schema_version; {_REEXPORT}")
    if version > MODEL_SCHEMA_VERSION:
        raise ArtifactError(
            f"{root} was exported by a newer headstart (model schema v{version}, this one reads "
            f"v{MODEL_SCHEMA_VERSION} and older); upgrade headstart"
        )
    if version == 1:  # the first models: native only, head named after the estimator
        manifest.setdefault("runtime", "native")
        head = manifest.get("head")
        manifest["head"] = {**(head if isinstance(head, dict) else {}), "kind": "linear"}
    _check_manifest(root, manifest)
    runtime = manifest["runtime"]
    verify_files(root, plain_files(manifest["files"]), (RUNTIMES[runtime],), what="manifest.json", fix=_REEXPORT)
    verify_architecture(root, manifest, what="manifest.json", fix=_REEXPORT)
    return manifest


def _check_manifest(root: Path, manifest: dict[str, Any]) -> None:
    """The one check of a manifest's fields before anything is loaded: types, class names (a
    string is not a list of classes), backbone identity and preprocessing (sizes bounded: see
    ``models.fingerprint``), head, runtime and file names. Each problem names the field."""
    what = str(root / "manifest.json")
    for key in ("runtime", "backbone", "preprocessing", "precision", "class_names", "head", "files"):
        if key not in manifest:
            raise ArtifactError(f"{what} is incomplete or malformed: it lacks '{key}'; {_REEXPORT}")
    if not isinstance(manifest["runtime"], str):
        raise ArtifactError(f"{what} 'runtime' is {manifest['runtime']!r}, not a name; {_REEXPORT}")
    if manifest["runtime"] not in RUNTIMES:
        raise ArtifactError(f"{what}: unknown runtime {manifest['runtime']!r}; upgrade headstart")
    names = checked_class_names(manifest["class_names"], what=what, fix=_REEXPORT)
    try:
        Fingerprint.from_manifest(manifest, source=what)
    except BackboneError as e:
        raise ArtifactError(f"{e}; {_REEXPORT}") from None
    head = manifest["head"]
    if not isinstance(head, dict) or not isinstance(head.get("kind"), str):
        raise ArtifactError(f"{what} 'head' is not an object with a 'kind'; {_REEXPORT}")
    n = head.get("n_classes", len(names))
    if n != len(names):
        raise ArtifactError(f"{what}: the head has {n!r} classes but 'class_names' lists {len(names)}; {_REEXPORT}")
    checked_files(root, plain_files(manifest["files"]), what=what, fix=_REEXPORT)
    check_architecture(root, manifest, what=what, fix=_REEXPORT)  # the backbone/ entries of 'files'
    Tree.from_record(manifest.get("tree"), names, what=what, fix=_REEXPORT)  # models before the tree have none
    check_attributes(manifest.get("attributes"), what)


def build_classifier(manifest: dict[str, Any], state: dict[str, torch.Tensor], root: Path | None = None) -> Classifier:
    """(manifest, state dict) -> the network: the architecture comes from the model's own
    ``backbone/`` folder when ``root`` has one (a library backbone), else from the backbone
    registry, and the head spec; the numbers from ``state``. Also the entry point for
    fine-tuned weights."""
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    own = architecture_spec(root, manifest) if root is not None else None
    spec = with_preprocessing(own or get_spec(manifest["backbone"]["name"]), prep)
    net = load_backbone(spec, load_weights=False).net
    net.imagenet_head = None
    state = {k: v for k, v in state.items() if not k.startswith("net.imagenet_head.")}  # v1 models had it
    attributes = manifest.get("attributes") or []
    heads = [build_head(a["head"]["kind"], head_tensors(state, f"attributes.{i}.")) for i, a in enumerate(attributes)]
    multi = [bool(a.get("multi_label")) for a in attributes]
    model = Classifier(net, build_head(manifest["head"]["kind"], head_tensors(state)), heads, multi)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ArtifactError(
            f"the weights do not fit {spec.name} with a {manifest['head']['kind']} head: "
            f"{str(e).splitlines()[0]}; {_REEXPORT}"
        ) from None
    n = int(model.head.n_classes)  # type: ignore[arg-type]
    if n != len(manifest["class_names"]):
        raise ArtifactError(f"the head has {n} outputs but the manifest lists {len(manifest['class_names'])} classes")
    for a, head in zip(attributes, model.attributes, strict=True):
        if int(head.n_classes) != len(a["class_names"]):  # type: ignore[arg-type]
            raise ArtifactError(
                f"the {a['name']!r} head has {head.n_classes} outputs but the manifest lists "
                f"{len(a['class_names'])} classes; {_REEXPORT}"
            )
    return model.eval()


def load_model(path: str | os.PathLike[str]) -> LoadedModel:
    """Load an exported model safely: manifest checks and checksums first, then tensors only.

    For a native model the state dict is read with ``torch.load(weights_only=True)``, whose
    unpickler accepts tensors and plain containers and refuses everything else - an object
    whose ``__reduce__`` would call ``os.system`` is rejected before it can run. For an ONNX
    model nothing is unpickled at all (protobuf); the session is created by the caller.
    """
    root = Path(path)
    manifest = read_manifest(root)
    prep = Preprocessing.from_dict(manifest["preprocessing"])
    loaded = LoadedModel(manifest=manifest, preprocessing=prep, root=root, model=None)
    if loaded.runtime != "native":
        from .onnx import check_graph

        check_graph(loaded.weights_path, manifest)  # the graph's interface against the manifest
        return loaded
    weights = loaded.weights_path
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ArtifactError(
            f"{weights} holds something other than plain tensors and was refused without running it "
            f"({type(e).__name__}); {_REEXPORT} from a head you trust"
        ) from None
    except Exception as e:  # a zip/pickle that is damaged in a way the checksum did not catch
        raise ArtifactError(f"{weights} cannot be read ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ArtifactError(f"{weights} is not a state dict of tensors; {_REEXPORT}")
    loaded.model = build_classifier(manifest, state, root)
    return loaded
