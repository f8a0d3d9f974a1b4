"""``--decode gpu``: JPEG decoding with nvjpeg and resizing on the GPU.

Why: on a GPU box extraction is bound by CPU decoding, not by the network (ResNet-50 runs at
15,400 images/s in bf16 on one H200; 16 PIL decode workers feed it 850-1,780). nvjpeg decodes a
whole batch in one call (``torchvision.io.decode_jpeg(list, device="cuda")``), so the CPU only
reads bytes and parses headers.

What stays on the CPU, per file: anything that is not a plain RGB or greyscale JPEG (PNG, CMYK,
...), anything above the pixel limit, anything whose resize would build an image above it (an
absurd aspect ratio: ``Preprocessing.work_pixels``; the CPU resize has a bounded road for those,
this one does not), and any JPEG nvjpeg refuses - those go through the same
:func:`~pipeline.data.images.load_pixels` as ``--decode cpu``. EXIF orientation is read from the header
on the CPU and applied on the GPU (nvjpeg ignores it).

Pixels differ slightly from the CPU path (nvjpeg's IDCT and upsampling, torch's antialiased
bicubic instead of PIL's, no DCT-domain draft): features agree to cosine ~0.99, like draft vs
no-draft, so ``decode`` is recorded in the cache's config but not in its fingerprint.

The functions take any ``device`` so the CPU tests exercise the same code; only the nvjpeg call
itself needs CUDA.
"""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import InputError
from .images import DEFAULT_MAX_PIXELS, DecodeError, load_pixels, read_image_bytes
from .preprocessing import Preprocessing

_EXIF_ORIENTATION = 0x0112


def require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise InputError(
            f"--decode gpu needs a CUDA GPU, but this run uses --device {device} "
            f"({'no CUDA GPU on this machine' if not torch.cuda.is_available() else 'CPU chosen'}); "
            "use --decode cpu (the default)"
        )


@dataclass
class RawJpeg:
    """A JPEG the CPU only read: bytes for nvjpeg plus what the header says."""

    data: np.ndarray  # uint8 [n_bytes]
    orientation: int  # EXIF orientation 1..8


def probe_jpeg(
    source: str | os.PathLike[str] | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, prep: Preprocessing | None = None
) -> RawJpeg | None:
    """Bytes + orientation if ``source`` (a path, or bytes already read) is a JPEG nvjpeg can
    take, else None (decode on CPU). The file is read through ``images.read_image_bytes`` (a
    FIFO or an oversized file is a ``DecodeError`` here, as on the CPU). Opening with PIL parses
    the header only: no pixel data is decoded here."""
    data = source if isinstance(source, bytes) else read_image_bytes(source, max_pixels=max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("RGB", "L"):
                return None
            w, h = img.size
            if w * h > max_pixels:
                return None  # the CPU path refuses it with the usual message
            if prep is not None and not fits_gpu_resize(w, h, prep, max_pixels):
                return None  # the CPU path has a bounded resize for it
            orientation = int(img.getexif().get(_EXIF_ORIENTATION, 1) or 1)
    except Exception:
        return None  # let the CPU path produce the recorded reason
    return RawJpeg(np.frombuffer(bytearray(data), dtype=np.uint8), orientation if 1 <= orientation <= 8 else 1)


def fits_gpu_resize(w: int, h: int, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS) -> bool:
    """Whether :func:`resize_crop` may take a ``w x h`` photo: the image its resize builds
    (float32 on the device, 12 bytes a pixel) stays within the pixel limit. The same bound as the
    CPU's plain road (``images.preprocess``), so both take the same photos the same way."""
    return prep.work_pixels(w, h) <= max_pixels


def apply_orientation(x: torch.Tensor, orientation: int) -> torch.Tensor:
    """EXIF orientation on a CHW tensor, matching ``PIL.ImageOps.exif_transpose``."""
    if orientation == 2:
        return x.flip(-1)
    if orientation == 3:
        return x.flip(-1).flip(-2)
    if orientation == 4:
        return x.flip(-2)
    if orientation == 5:
        return x.transpose(-1, -2)
    if orientation == 6:
        return x.transpose(-1, -2).flip(-1)
    if orientation == 7:
        return x.transpose(-1, -2).flip(-1).flip(-2)
    if orientation == 8:
        return x.transpose(-1, -2).flip(-2)
    return x


def resize_crop(x: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """uint8 (N, 3, H, W) or (3, H, W) -> uint8 (..., 3, crop, crop): the geometry of
    :func:`pipeline.data.images.preprocess` (short side to ``resize``, centre crop; or letterbox on
    white; or squash to the square), with torch's antialiased resampling. Same-sized photos resize in one call. Only for
    shapes :func:`fits_gpu_resize` accepts (``decode_batch`` sends the others to the CPU)."""
    single = x.dim() == 3
    x = x[None] if single else x
    mode = "bicubic" if prep.interpolation == "bicubic" else "bilinear"
    n, _, h, w = x.shape
    if prep.letterbox:
        side = max(h, w)
        canvas = torch.full((n, 3, side, side), 255, dtype=torch.uint8, device=x.device)
        top, left = (side - h) // 2, (side - w) // 2
        canvas[:, :, top : top + h, left : left + w] = x
        size = (prep.crop, prep.crop)
        x = canvas
    elif prep.squash:
        size = (prep.resize, prep.resize)
    elif w <= h:
        size = (int(prep.resize * h / w), prep.resize)
    else:
        size = (prep.resize, int(prep.resize * w / h))
    if size != tuple(x.shape[2:]):
        y = F.interpolate(x.float(), size=size, mode=mode, antialias=True, align_corners=False)
        x = y.round_().clamp_(0, 255).to(torch.uint8)
    if not prep.letterbox:
        _, _, h, w = x.shape
        c = prep.crop
        top, left = round((h - c) / 2.0), round((w - c) / 2.0)  # as images.preprocess
        x = x[:, :, top : top + c, left : left + c]
    return x[0] if single else x


def decode_batch(
    raws: list[RawJpeg],
    prep: Preprocessing,
    device: torch.device,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[torch.Tensor | str]:
    """Decode + preprocess JPEGs on ``device``: one uint8 (3, crop, crop) tensor per input, or
    the reason it could not be used. One batched nvjpeg call; if it fails (one bad file fails
    the whole call) each file is retried alone, and what nvjpeg still refuses is decoded by PIL."""
    datas = [torch.from_numpy(r.data) for r in raws]
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its image codecs in favour of TorchCodec (warning on every
        # call); until TorchCodec is a dependency here, this is the nvjpeg binding available.
        warnings.simplefilter("ignore", DeprecationWarning)
        decoded = _nvjpeg(datas, device)
    out: list[torch.Tensor | str] = [""] * len(raws)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    upright: dict[int, torch.Tensor] = {}
    for k, (raw, img) in enumerate(zip(raws, decoded, strict=True)):
        if img is not None and not fits_gpu_resize(img.shape[-1], img.shape[-2], prep, max_pixels):
            img = None  # probe_jpeg checks the header; this checks what nvjpeg really decoded
        if img is None:
            try:
                pixels = load_pixels(raw.data.tobytes(), prep, max_pixels=max_pixels)
                out[k] = torch.from_numpy(pixels).to(device)
            except DecodeError as e:
                out[k] = str(e)
            continue
        upright[k] = apply_orientation(img, raw.orientation)
        by_shape.setdefault(tuple(upright[k].shape), []).append(k)
    for members in by_shape.values():  # catalogs often have one photo size: one resize call
        resized = resize_crop(torch.stack([upright[k] for k in members]), prep)
        for k, r in zip(members, resized, strict=True):
            out[k] = r
    return out


def _nvjpeg(datas: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(datas, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass  # one bad file fails the whole batched call: retry one by one
    out: list[torch.Tensor | None] = []
    for d in datas:
        try:
            out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:
            out.append(None)
    return out
