"""Training-time augmentation that respects product photos.

Presets (``--augment``):

* ``product`` (the default for centre-cropped preprocessing): a small rotation (+-10 degrees,
  corners filled white like a catalog background), a random resized crop with a conservative
  scale (60-100 % of the area, aspect 3/4-4/3), a horizontal flip. **No colour change**: hue and
  saturation are the label for lipstick shades and nail polish, so no ColorJitter, no
  greyscale, no auto-contrast.
* ``letterbox`` (the default when the preprocessing letterboxes): pad to a square on white as
  at prediction time, then shrink a little (85-100 %), shift within the freed margin, rotate
  +-10 degrees, flip. The whole product stays in view: that is why one letterboxes.
* ``none``: exactly the prediction-time preprocessing.

Every random choice comes from a generator seeded by (seed, epoch, sample index), never from
global or per-worker RNG state: a run resumed mid-epoch, or spread over several processes,
sees the very same pixels as one uninterrupted run.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from torchvision.transforms import InterpolationMode

from ..errors import InputError
from .images import preprocess
from .preprocessing import Preprocessing

PRESETS = ("auto", "product", "letterbox", "none")
ROTATION_DEGREES = 10.0
CROP_SCALE = (0.6, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)
LETTERBOX_SCALE = (0.85, 1.0)
# Tensor-side resampling is bilinear whatever the weights' resize uses: bicubic overshoots at
# the edge of the white fill and clamps into colours that are not in the photo (measured: up to
# 34 levels off the red-white line for a lipstick-red photo), which is exactly what we avoid.
BILINEAR = InterpolationMode.BILINEAR
_PIL = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resolve_preset(preset: str, prep: Preprocessing) -> str:
    """``auto`` follows the preprocessing; a preset that contradicts it is refused, because the
    model would then be trained on framings it never sees at prediction time."""
    if preset not in PRESETS:
        raise InputError(f"unknown augmentation preset {preset!r}; choose one of {', '.join(PRESETS)}")
    if preset == "auto":
        return "letterbox" if prep.letterbox else "product"
    if preset == "letterbox" and not prep.letterbox:
        raise InputError(
            "--augment letterbox needs letterboxed features: the head was fitted on centre-cropped photos; "
            "re-run `headstart extract --letterbox` and fit-head, or use --augment product"
        )
    if preset == "product" and prep.letterbox:
        raise InputError(
            "--augment product crops photos, but the head was fitted on letterboxed ones; use --augment letterbox"
        )
    return preset


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator that depends only on (seed, epoch, index) - see the module docstring."""
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _crop_box(g: torch.Generator, h: int, w: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from ``g``."""
    area = h * w
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * _uniform(g, *CROP_SCALE)
        ratio = math.exp(_uniform(g, *log_ratio))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            return top, left, ch, cw
    side = min(h, w)  # fallback: the centre square, as at prediction time
    return (h - side) // 2, (w - side) // 2, side, side


def _work_limit(prep: Preprocessing) -> int:
    """The largest image augmentation builds: 64 crops' worth (3.2 M pixels at 224 px, an aspect
    ratio up to about 49:1 untouched). The rotation works in float on the whole resized photo,
    so the decode limit (179 M pixels) would still let one strip take gigabytes."""
    return 64 * prep.crop * prep.crop


def _resize_short(img: Image.Image, prep: Preprocessing) -> Image.Image:
    w, h = img.size
    if prep.squash:  # squashed, as prediction sees it; the random crop then samples within it
        r = prep.resize
        return img if img.size == (r, r) else img.resize((r, r), _PIL[prep.interpolation])
    limit = _work_limit(prep)
    if prep.work_pixels(w, h) > limit:
        # Only an extreme aspect ratio gets here (a 1 x 100,000 strip would resize to 256 x
        # 25,600,000): keep the centre of the long side, as long as the limit allows. The
        # random crop then samples within it, as it would have around the centre anyway.
        short, long = min(w, h), max(w, h)
        keep = max(short, limit * short // (prep.resize * prep.resize))
        off = (long - keep) // 2
        img = img.crop((off, 0, off + keep, h) if w > h else (0, off, w, off + keep))
        w, h = img.size
    s = prep.resize / min(w, h)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return img if size == img.size else img.resize(size, _PIL[prep.interpolation])


def _letterbox_square(img: Image.Image, prep: Preprocessing) -> Image.Image:
    w, h = img.size
    big = max(w, h)
    c = prep.crop
    if prep.work_pixels(w, h) > _work_limit(prep):  # no big x big canvas: shrink first, then paste
        small = img.resize((max(1, round(w * c / big)), max(1, round(h * c / big))), _PIL[prep.interpolation])
        canvas = Image.new("RGB", (c, c), (255, 255, 255))
        canvas.paste(small, ((c - small.width) // 2, (c - small.height) // 2))
        return canvas
    canvas = Image.new("RGB", (big, big), (255, 255, 255))
    canvas.paste(img, ((big - w) // 2, (big - h) // 2))
    return canvas.resize((c, c), _PIL[prep.interpolation])


def _on_white(transform: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a geometric transform whose uncovered area becomes white, blending edges only
    towards white. torchvision's ``fill=`` blends the edge with a zero-padded interpolation
    first, which leaves a dark, off-hue fringe (measured: a lipstick red edge turned 164/75/97);
    transforming the inverted photo with zero padding and inverting back is exact."""
    return 255 - transform(255 - x)


def augment(img: Image.Image, prep: Preprocessing, preset: str, g: torch.Generator) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor ``(3, crop, crop)`` under ``preset`` (already resolved)."""
    if preset == "none":
        return torch.from_numpy(preprocess(img, prep))
    crop = prep.crop
    flip = bool(torch.rand((), generator=g) < 0.5)
    angle = _uniform(g, -ROTATION_DEGREES, ROTATION_DEGREES)
    if preset == "letterbox":
        x = F.pil_to_tensor(_letterbox_square(img, prep))
        scale = _uniform(g, *LETTERBOX_SCALE)
        margin = (1.0 - scale) * crop / 2  # shift only inside the white margin the shrink freed
        shift = [round(_uniform(g, -margin, margin)), round(_uniform(g, -margin, margin))]
        x = _on_white(
            lambda t: F.affine(t, angle=angle, translate=shift, scale=scale, shear=[0.0, 0.0], interpolation=BILINEAR),
            x,
        )
    elif preset == "product":
        # Rotate the resized photo before cropping, so most filled corners fall outside the crop.
        x = F.pil_to_tensor(_resize_short(img, prep))
        x = _on_white(lambda t: F.rotate(t, angle, interpolation=BILINEAR), x)
        top, left, h, w = _crop_box(g, x.shape[-2], x.shape[-1])
        x = F.resized_crop(x, top, left, h, w, [crop, crop], interpolation=BILINEAR, antialias=True)
    else:
        raise InputError(f"unknown augmentation preset {preset!r}")
    if flip:
        x = F.horizontal_flip(x)
    return x.contiguous()
