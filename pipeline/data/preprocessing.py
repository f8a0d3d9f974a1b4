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
    # Resize to ``resize x resize`` whatever the aspect ratio, then centre-crop ``crop`` (with
    # ``resize == crop``: no crop at all). What a Hugging Face image processor with a fixed
    # height x width does (ViT, SigLIP, DeiT) and timm's ``crop_mode='squash'``: those weights
    # saw squashed photos, so their features expect squashed photos.
    squash: bool = False

    def work_pixels(self, w: int, h: int) -> int:
        """Pixels of the largest image the plain resize of a ``w x h`` photo builds: the photo
        with its short side at ``resize`` (long side in proportion), or the letterbox's square
        canvas. Only the aspect ratio makes it large (1 x 100,000 -> 256 x 25,600,000), so the
        CPU and GPU resizes compare it with the pixel limit and take a bounded road beyond it."""
        if self.letterbox:
            return max(w, h) ** 2
        if self.squash:
            return self.resize * self.resize
        short, long = min(w, h), max(w, h)
        return self.resize * int(self.resize * long / max(short, 1))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        if not self.squash:
            # Records written before the switch existed stay byte-identical (same cache JSON,
            # same head.json), and a release that does not know it still reads them.
            del d["squash"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        d = dict(d)
        d["mean"] = tuple(d["mean"])
        d["std"] = tuple(d["std"])
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)
