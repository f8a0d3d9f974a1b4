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

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..data.preprocessing import Preprocessing
from ..errors import BackboneError

if TYPE_CHECKING:
    import torch

    from .backbones import LoadedBackbone

KEYS = ("backbone", "weights", "weights_sha256", "preprocessing", "precision", "feature_dim")

# Bounds on the sizes a recorded preprocessing may ask for. The registered recipes lie in
# 32..292 px (the tiny test backbone crops 32, EfficientNet-Lite2 resizes to 292) and the largest
# ImageNet recipes in common use resize to 600 (EfficientNet-B7); 4096 leaves room for
# high-resolution backbones while refusing the hand-edited ``resize: 200000`` that builds
# gigapixel images (the OOM killer at 16 GB): a 4096 px crop is 48 MiB of uint8 pixels per
# photo. Below 8 px no convolutional stem has anything to work on.
MIN_SIDE, MAX_SIDE = 8, 4096
INTERPOLATIONS = ("bilinear", "bicubic")
MAX_FEATURE_DIM = 1 << 16


def checked_preprocessing(value: Any) -> Preprocessing:
    """A recorded preprocessing (dict, or JSON text in cache attributes and head.json) as a
    :class:`Preprocessing`, after checking every field: the sizes within
    ``MIN_SIDE..MAX_SIDE`` with ``crop <= resize``, three finite means and positive stds, a known
    interpolation, booleans for the switches. ValueError names the field that is wrong."""
    d = json.loads(value) if isinstance(value, str) else value
    if not isinstance(d, Mapping):
        raise ValueError(f"preprocessing is {type(d).__name__}, not an object")
    d = dict(d)
    for key in ("resize", "crop"):
        v = d.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or not MIN_SIDE <= v <= MAX_SIDE:
            raise ValueError(f"preprocessing {key} is {v!r}, not a size in {MIN_SIDE}..{MAX_SIDE} px")
    if d["crop"] > d["resize"]:
        raise ValueError(f"preprocessing crop {d['crop']} is larger than its resize {d['resize']}")
    for key in ("mean", "std"):
        if not _three_numbers(d.get(key), positive=key == "std"):
            raise ValueError(f"preprocessing {key} is {d.get(key)!r}, not three finite numbers")
    interpolation = d.get("interpolation", INTERPOLATIONS[0])
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"preprocessing interpolation is {interpolation!r}, not one of {', '.join(INTERPOLATIONS)}")
    for key in ("draft", "letterbox", "squash"):
        if key in d and not isinstance(d[key], bool):
            raise ValueError(f"preprocessing {key} is {d[key]!r}, not true or false")
    return Preprocessing.from_dict(d)  # TypeError for a key it does not know


def _three_numbers(v: Any, *, positive: bool) -> bool:
    if not isinstance(v, (list, tuple)) or len(v) != 3:
        return False
    numbers = all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
    return numbers and (not positive or min(v) > 0)


def _feature_dim(v: Any) -> int:
    n = int(v)
    if isinstance(v, bool) or not 1 <= n <= MAX_FEATURE_DIM or (isinstance(v, float) and v != n):
        raise ValueError(f"feature_dim is {v!r}, not a width in 1..{MAX_FEATURE_DIM}")
    return n


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
            if not isinstance(record, Mapping):
                raise TypeError(f"a fingerprint is an object of {', '.join(KEYS)}, not {type(record).__name__}")
            missing = [k for k in KEYS if k not in record]
            if missing:
                raise KeyError(f"no {', '.join(missing)}")
            return cls(
                backbone=_name(record["backbone"]),
                weights=str(record["weights"]),
                weights_sha256=str(record["weights_sha256"]),
                preprocessing=checked_preprocessing(record["preprocessing"]),
                precision=_name(record["precision"]),
                feature_dim=_feature_dim(record["feature_dim"]),
            )
        except (KeyError, TypeError, ValueError, RecursionError) as e:
            raise BackboneError(
                f"{source} is incomplete or malformed ({_reason(e)}); re-create it with this headstart"
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
    def from_manifest(cls, manifest: Mapping[str, Any], *, source: str = "the manifest") -> Fingerprint:
        """From a model ``manifest.json`` or ``finetune.json`` (same keys); checked like
        :meth:`from_record` (``feature_dim`` may be absent in the first models: 0)."""
        try:
            b = manifest["backbone"]
            if not isinstance(b, Mapping):
                raise TypeError(f"backbone is {type(b).__name__}, not an object")
            dim = b.get("feature_dim", 0)
            return cls(
                backbone=_name(b["name"]),
                weights=str(b.get("weights", "")),
                weights_sha256=str(b.get("weights_sha256", "")),
                preprocessing=checked_preprocessing(manifest["preprocessing"]),
                precision=_name(manifest["precision"]),
                feature_dim=0 if dim == 0 else _feature_dim(dim),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise BackboneError(f"{source} is incomplete or malformed ({_reason(e)})") from None

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
        # every field, the switches left out of to_dict() when off included
        pa, pb = dataclasses.asdict(self.preprocessing), dataclasses.asdict(other.preprocessing)
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


def _name(v: Any) -> str:
    """A backbone or precision name: a non-empty string (``str({})`` would pass as a name)."""
    if not isinstance(v, str) or not v:
        raise ValueError(f"{v!r} is not a name")
    return v


def _reason(e: Exception) -> str:
    if isinstance(e, KeyError):
        return f"{e.args[0] if e.args else e}"
    return f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
