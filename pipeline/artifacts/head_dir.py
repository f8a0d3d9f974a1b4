"""Artifacts on disk, checked before use: the head directory and the model's torch pieces.

Everything that reads a head goes through :func:`read_head` (plain tensors, ``allow_pickle=False``)
or :func:`load_head_estimator` (the joblib pickle). Both verify the sha256 recorded in
``head.json`` first, so a swapped or truncated file is refused before a byte of it is parsed.
That protects against accidents, not attackers: whoever can rewrite ``head.joblib`` can rewrite
``head.json`` too, and joblib is pickle - loading it runs code. Never load a head or a cache
from a source you do not trust (README, "Security").

A head becomes a torch module from a small **head spec**: a ``kind`` plus named tensors, the
dict a head's ``torch_state()`` returns. ``head.npz`` stores those tensors (and, optionally, the
kind as a string entry: ``np.savez(path, **head.torch_state())`` is enough). Kinds:

* ``linear``: ``weight [C, D]``, ``bias [C]`` - logistic regression, nearest centroid;
* ``mlp``: ``layers.0.weight [H, D]``, ``layers.0.bias [H]``, ..., ``layers.L.weight [C, H]``,
  ``layers.L.bias [C]``, ReLU between layers.

Tensor names are the module's own state-dict names, so the same builder works on ``head.npz``
and on the ``head.*`` entries of an exported or fine-tuned state dict.

A new kind is one builder in :data:`HEAD_BUILDERS`; export, ONNX and predict need no change,
because :class:`Classifier` and the saved state dict are built from the spec alone.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError
from ..models.backbones import FeatureNet, sha256_file

HEAD_SCHEMA_VERSION = 1  # what this headstart reads; fit_head writes the same number


# --------------------------------------------------------------------------- checksums


def verify_files(root: Path, recorded: Mapping[str, str], needed: tuple[str, ...], *, what: str, fix: str) -> None:
    """Refuse ``needed`` files that are missing or whose sha256 differs from ``recorded``; also
    check every other recorded file that is present (a partly swapped directory is suspect)."""
    for name in needed:
        if name not in recorded:
            raise ArtifactError(f"{root / name} has no sha256 in {what}; {fix}")
        if not (root / name).is_file():
            raise ArtifactError(f"{root / name} is missing; {fix}")
    for name, want in recorded.items():
        path = root / name
        if (name in needed or path.is_file()) and sha256_file(path) != want:
            raise ArtifactError(
                f"{path} does not match the sha256 recorded in {what} (tampered with or truncated); {fix}"
            )


def read_json(path: Path, *, what: str, fix: str) -> dict[str, Any]:
    """A JSON object, or an ``ArtifactError`` that says which file is wrong (never a traceback)."""
    if not path.is_file():
        raise ArtifactError(f"{path.parent} is not {what} (no {path.name}); {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not {what} manifest (not a JSON object); {fix}")
    return data


# --------------------------------------------------------------------------- head directory


@dataclass
class HeadSpec:
    """A head as plain tensors: enough to build its torch module (see the module docstring)."""

    kind: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return int(build_head(self.kind, self.torch_tensors()).n_classes)  # type: ignore[arg-type]

    def torch_tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in self.tensors.items()}


_HEAD_FIX = "re-run `headstart fit-head` to write a fresh head directory"


def read_head_meta(head_dir: Path) -> dict[str, Any]:
    meta = read_json(head_dir / "head.json", what="a head directory", fix="create one with `headstart fit-head`")
    version = meta.get("schema_version", 0)
    if not isinstance(version, int) or version > HEAD_SCHEMA_VERSION:
        raise ArtifactError(
            f"{head_dir} was written by a newer headstart (head schema v{version}, this one reads "
            f"v{HEAD_SCHEMA_VERSION}); upgrade headstart"
        )
    for key in ("class_names", "fingerprint", "files"):
        if key not in meta:
            raise ArtifactError(f"{head_dir / 'head.json'} lacks '{key}'; {_HEAD_FIX}")
    return meta


def read_head(head_dir: str | Path) -> tuple[dict[str, Any], HeadSpec]:
    """``head.json`` and the head's tensors from ``head.npz``, both checked; nothing unpickled."""
    head_dir = Path(head_dir)
    meta = read_head_meta(head_dir)
    verify_files(head_dir, meta["files"], ("head.npz",), what="head.json", fix=_HEAD_FIX)
    try:
        with np.load(head_dir / "head.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{head_dir / 'head.npz'} cannot be read ({e}); {_HEAD_FIX}") from None
    kind_arr = arrays.pop("kind", None)
    kind = str(kind_arr) if kind_arr is not None else str(meta.get("torch_kind", "linear"))
    spec = HeadSpec(kind, arrays)
    n = spec.n_classes
    if n != len(meta["class_names"]):
        raise ArtifactError(
            f"{head_dir}: head.npz has {n} outputs but head.json lists {len(meta['class_names'])} classes; {_HEAD_FIX}"
        )
    return meta, spec


def load_head_estimator(head_dir: str | Path) -> Any:
    """The scikit-learn head from ``head.joblib``, after its sha256 matched ``head.json``.

    joblib is pickle: this runs code from the file. The checksum catches accidents (a truncated
    copy, a head from another run), not an attacker who rewrites both files. Trusted heads only.
    """
    import joblib

    head_dir = Path(head_dir)
    meta = read_head_meta(head_dir)
    verify_files(head_dir, meta["files"], ("head.joblib",), what="head.json", fix=_HEAD_FIX)
    with _modules_under_their_old_names():
        return joblib.load(head_dir / "head.joblib")


# A pickle names the module of each class it holds. Release 0.1.0 kept the estimators in
# ``pipeline.heads``; its head.joblib files must keep loading after the move.
RENAMED_MODULES = {"pipeline.heads": "pipeline.probe.estimators"}


@contextlib.contextmanager
def _modules_under_their_old_names() -> Iterator[None]:
    added = [old for old in RENAMED_MODULES if old not in sys.modules]
    for old in added:
        sys.modules[old] = importlib.import_module(RENAMED_MODULES[old])
    try:
        yield
    finally:
        for old in added:
            sys.modules.pop(old, None)


# --------------------------------------------------------------------------- head modules


class LinearHead(nn.Linear):
    @property
    def n_classes(self) -> int:
        return self.out_features


class MLPHead(nn.Module):
    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def n_classes(self) -> int:
        return int(self.layers[-1].out_features)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x


def _linear(t: dict[str, torch.Tensor]) -> nn.Module:
    w, b = t["weight"], t["bias"]
    head = LinearHead(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": b})
    return head


def _mlp(t: dict[str, torch.Tensor]) -> nn.Module:
    n = len([k for k in t if k.startswith("layers.") and k.endswith(".weight")])
    if n == 0:
        raise KeyError("layers.0.weight")
    layers = [nn.Linear(t[f"layers.{i}.weight"].shape[1], t[f"layers.{i}.weight"].shape[0]) for i in range(n)]
    head = MLPHead(layers)
    head.load_state_dict(t)
    return head


HEAD_BUILDERS: dict[str, Callable[[dict[str, torch.Tensor]], nn.Module]] = {"linear": _linear, "mlp": _mlp}


def build_head(kind: str, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Head spec -> torch module (logits). The tensors may be the head's own (``head.npz``) or
    the ``head.*`` entries of an exported or fine-tuned state dict (prefix stripped)."""
    builder = HEAD_BUILDERS.get(kind)
    if builder is None:
        raise ArtifactError(
            f"unknown head kind {kind!r} (this headstart builds: {', '.join(HEAD_BUILDERS)}); upgrade headstart"
        )
    try:
        return builder(dict(tensors))
    except (KeyError, IndexError, RuntimeError) as e:
        raise ArtifactError(f"the {kind} head's tensors are incomplete or inconsistent ({e}); re-export") from None


# --------------------------------------------------------------------------- the classifier


class Classifier(nn.Module):
    """uint8 pixels -> class logits: normalisation, backbone, head in one module."""

    def __init__(self, net: FeatureNet, head: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.head = head

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(pixels).float())  # type: ignore[no-any-return]


class ExportGraph(nn.Module):
    """What the ONNX file computes: pixels -> (probabilities, features). Softmax is inside so a
    deployment reads probabilities directly; features feed search and recommendation."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.model.net(pixels).float()
        return self.model.head(feats).softmax(1), feats


def head_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``head.*`` entries of a Classifier state dict, prefix stripped."""
    return {k.removeprefix("head."): v for k, v in state.items() if k.startswith("head.")}
