"""What a backbone's weights expect of the pixels: resize, crop, normalisation, decode switches.

Torch-free on purpose: the cache, the head directory and the model manifest all record it, and
the cache layer must not import torch."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Preprocessing:
    """What the weights expect. Travels into the cache fingerprint and the exported model."""

    resize: int  # short side is resized to this ...
    crop: int  # ... then centre-cropped to crop x crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"  # "bilinear" | "bicubic"
    # JPEG DCT-domain downscaling (PIL ``draft``) to the smallest scale still >= ``resize``:
    # decoding a 640 px JPEG at 1/2 scale is ~3x cheaper; docs/benchmarks.md has its effect.
    draft: bool = True
    # Pad to a square on white instead of centre-cropping (tall bottles keep their caps).
    letterbox: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
