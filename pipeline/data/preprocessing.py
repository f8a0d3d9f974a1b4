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

    def work_pixels(self, w: int, h: int) -> int:
        """Pixels of the largest image the plain resize of a ``w x h`` photo builds: the photo
        with its short side at ``resize`` (long side in proportion), or the letterbox's square
        canvas. Only the aspect ratio makes it large (1 x 100,000 -> 256 x 25,600,000), so the
        CPU and GPU resizes compare it with the pixel limit and take a bounded road beyond it."""
        if self.letterbox:
            return max(w, h) ** 2
        short, long = min(w, h), max(w, h)
        return self.resize * int(self.resize * long / max(short, 1))

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
