"""The identity of a set of features: which backbone, which weights, which preprocessing, which
precision, how wide. Two sets of features may be mixed, compared or fed to one head only when
their fingerprints say they come from the same function.

One value type travels through every artifact: the cache stores it as HDF5 attributes, the head
directory and the fine-tune directory as a JSON object of strings (the *record*, below), the
model manifest as its ``backbone`` / ``preprocessing`` / ``precision`` entries. The on-disk shapes
are those of release 0.1.0 and stay readable.

This module imports no torch: the cache layer reads fingerprints too. ``load_backbone`` and
``inference_choice`` import the torch side when called.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data.preprocessing import Preprocessing
from ..errors import BackboneError

if TYPE_CHECKING:
    import torch

    from .backbones import LoadedBackbone

KEYS = ("backbone", "weights", "weights_sha256", "preprocessing", "precision", "feature_dim")


@dataclass(frozen=True)
class Fingerprint:
    backbone: str  # registry name, e.g. "efficientnet_lite0"
    weights: str  # identity of the weights, e.g. "IMAGENET1K_V2"
    weights_sha256: str  # of the weights file ("none" for the tiny test backbone)
    preprocessing: Preprocessing
    precision: str  # the precision the features were computed in: "fp32" | "bf16"
    feature_dim: int

    # ------------------------------------------------------------------ on-disk shapes

    @classmethod
    def from_record(cls, record: Mapping[str, Any], *, source: str = "the fingerprint") -> Fingerprint:
        """From cache attributes or ``head.json``: strings, preprocessing as JSON text."""
        try:
            prep = record["preprocessing"]
            return cls(
                backbone=str(record["backbone"]),
                weights=str(record["weights"]),
                weights_sha256=str(record["weights_sha256"]),
                preprocessing=Preprocessing.from_dict(json.loads(prep) if isinstance(prep, str) else prep),
                precision=str(record["precision"]),
                feature_dim=int(record["feature_dim"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BackboneError(
                f"{source} is incomplete or malformed ({type(e).__name__}: {e}); re-create it with this headstart"
            ) from None

    def to_record(self) -> dict[str, str]:
        return {
            "backbone": self.backbone,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing.to_json(),
            "precision": self.precision,
            "feature_dim": str(self.feature_dim),
        }

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Fingerprint:
        """From a model ``manifest.json`` or ``finetune.json`` (same keys)."""
        b = manifest["backbone"]
        return cls(
            backbone=str(b["name"]),
            weights=str(b.get("weights", "")),
            weights_sha256=str(b.get("weights_sha256", "")),
            preprocessing=Preprocessing.from_dict(manifest["preprocessing"]),
            precision=str(manifest["precision"]),
            feature_dim=int(b.get("feature_dim", 0)),
        )

    def manifest_backbone(self) -> dict[str, Any]:
        """The manifest's ``backbone`` entry."""
        return {
            "name": self.backbone,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "feature_dim": self.feature_dim,
        }

    # ------------------------------------------------------------------ comparisons

    def diff(self, other: Fingerprint, *, mine: str = "cache has", theirs: str = "this run uses") -> list[str]:
        """Human-readable differences (empty when the two are the same)."""
        a, b = self.to_record(), other.to_record()
        out = [f"{k}: {mine} {a[k]}, {theirs} {b[k]}" for k in KEYS if a[k] != b[k] and k != "preprocessing"]
        pa, pb = self.preprocessing.to_dict(), other.preprocessing.to_dict()
        changed = [k for k in pa if pa[k] != pb.get(k)]
        if changed:  # only the switches that differ: the whole JSON twice made a 900-character line
            show = lambda d: json.dumps({k: d.get(k) for k in changed})  # noqa: E731
            out.append(f"preprocessing: {mine} {show(pa)}, {theirs} {show(pb)}")
        return out

    def same_function(self, other: Fingerprint) -> bool:
        """Same backbone, weights and preprocessing: the features are comparable, whatever the
        precision they were computed in (bf16 and fp32 features of one network agree closely)."""
        return (self.backbone, self.weights_sha256, self.preprocessing) == (
            other.backbone,
            other.weights_sha256,
            other.preprocessing,
        )

    def describe(self) -> str:
        return f"{self.backbone} ({self.weights}, {self.precision})"

    # ------------------------------------------------------------------ rebuilding the network

    def inference_choice(self, device: torch.device, engine: str = "auto") -> tuple[str, str]:
        """(engine, precision) to compute more of these features with: fp32 if they were fp32
        (bf16 would move them off the recorded ones), else what is fast on this machine."""
        from .engine import resolve

        return resolve(engine, "fp32" if self.precision == "fp32" else "auto", device)

    def load_backbone(
        self, weights_file: str | None = None, *, made: str = "the features", fix: str | None = None
    ) -> LoadedBackbone:
        """The backbone these features came from, with the recorded preprocessing, its weights
        checked against the recorded sha256 and its ImageNet layer dropped (no artifact uses it;
        unused parameters would also stall DDP). ``made`` names what was made with it and ``fix``
        what to do on a mismatch, for the one error message."""
        from .backbones import get_spec, load_backbone, with_preprocessing

        spec = with_preprocessing(get_spec(self.backbone), self.preprocessing)
        loaded = load_backbone(spec, weights_file)
        if loaded.weights_sha256 != self.weights_sha256:
            raise BackboneError(
                f"the {self.backbone} weights on this machine (sha256 {loaded.weights_sha256[:12]}) differ from the "
                f"ones {made} was made with ({self.weights_sha256[:12]}); "
                + (fix or "pass the same weights file with --weights-file")
            )
        loaded.net.imagenet_head = None
        return loaded
