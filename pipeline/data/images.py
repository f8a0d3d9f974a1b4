"""Reading photo files safely and decoding them into network-ready pixels (``catalog.py`` finds them).

Decoding is the one place that sees hostile input (truncated files, CMYK, 16-bit, EXIF
rotation, animations, decompression bombs, FIFOs, absurd aspect ratios), so every image in
headstart - extract, fine-tune, predict, evaluate - goes through :func:`load_pixels` or
:func:`open_rgb`, and every file through :func:`open_image_file`. One function means training
and serving can never disagree about preprocessing.
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..core.hashing import NOT_REGULAR, open_regular
from .preprocessing import Preprocessing

# PIL raises DecompressionBombError above 2x its MAX_IMAGE_PIXELS; we refuse at our own limit
# before decoding a byte of pixel data, and say which limit to raise.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated photo is recorded as skipped, not padded grey


class DecodeError(Exception):
    """A file that cannot be used as an image; the message is the recorded reason."""


class FileReadError(DecodeError):
    """The file could not be read as a regular file (swapped for a FIFO, removed, unreadable):
    not a property of its bytes, so a caller must not remember it against their content hash."""


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# What may be decoded: a path (opened through open_image_file), bytes already read, or an image.
ImageSource = str | os.PathLike[str] | bytes | Image.Image


def max_file_bytes(max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """The largest file read as an image: an uncompressed 16-bit RGBA TIFF of ``max_pixels``
    (8 bytes a pixel) plus 64 MiB of metadata. No photo within the pixel limit is larger, and
    reading one whole (extract hashes and decodes a single buffer) costs its size in memory."""
    return 8 * max_pixels + (64 << 20)


def _read_reason(e: OSError) -> str:
    if e.errno == errno.EINVAL and e.strerror == NOT_REGULAR:
        return f"{NOT_REGULAR} (a FIFO, device or folder in a photo's place)"
    if isinstance(e, PermissionError):
        return "permission denied"
    return f"cannot read file: {e.strerror or e}"


def open_image_file(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> BinaryIO:
    """The one way a photo file is opened for decoding: a regular file only, checked on the
    descriptor (``core.hashing.open_regular``: a FIFO swapped in after the folder scan is
    refused, never waited on), and no larger than :func:`max_file_bytes`."""
    try:
        f, st = open_regular(path)
    except OSError as e:
        raise FileReadError(_read_reason(e)) from None
    limit = max_file_bytes(max_pixels)
    if st.st_size > limit:
        f.close()
        raise DecodeError(
            f"file is {st.st_size:,} bytes, more than an image of at most {max_pixels:,} pixels needs "
            f"({limit:,}); raise --max-pixels if the file is trusted"
        )
    return f


def read_image_bytes(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes:
    """A photo's bytes, read once through :func:`open_image_file`. Hash these and decode these
    (``load_pixels(data, ...)``): then the pixels always belong to the hash, even if the file
    is rewritten while it is read."""
    limit = max_file_bytes(max_pixels)
    with open_image_file(path, max_pixels=max_pixels) as f:
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise FileReadError(_read_reason(e)) from None
    if len(data) > limit:
        raise FileReadError(f"file grew past {limit:,} bytes while it was read")
    return data


def open_rgb(
    source: ImageSource,
    *,
    draft_to: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open any supported image as an 8-bit RGB PIL image, upright, on white if transparent.

    ``draft_to`` lets the JPEG decoder downscale in the DCT domain (1/2, 1/4, 1/8) to the
    smallest size whose sides are still >= ``draft_to``: most of the decode cost of a large
    photo disappears, and the final resize is from a smaller image.
    """
    if isinstance(source, Image.Image):
        return _decode(source, draft_to, max_pixels)
    if isinstance(source, bytes | bytearray):
        return _decode(io.BytesIO(source), draft_to, max_pixels)
    with open_image_file(source, max_pixels=max_pixels) as f:
        return _decode(f, draft_to, max_pixels)


def _decode(source: BinaryIO | Image.Image, draft_to: int | None, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Our own limit (below) decides; PIL's warning at half its limit would otherwise
            # refuse photos we accept, and its hard error must not undercut a raised --max-pixels.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = source if isinstance(source, Image.Image) else _open_with_limit(source, max_pixels)
            w, h = img.size
            if w * h > max_pixels:
                raise DecodeError(
                    f"image is {w}x{h} = {w * h:,} pixels, above the limit of {max_pixels:,} "
                    "(raise it with --max-pixels if the file is trusted)"
                )
            if getattr(img, "n_frames", 1) > 1:
                img.seek(0)  # animated GIF/WebP: the first frame
            if draft_to and img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
                img.draft(img.mode, (draft_to, draft_to))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img)
    except DecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise DecodeError(
            f"decompression bomb refused: {e} (the limit is --max-pixels {max_pixels:,}; raise it only if the "
            "file is trusted)"
        ) from None
    except UnidentifiedImageError:
        raise DecodeError("not an image (or an unsupported format)") from None
    except OSError as e:
        msg = str(e) or type(e).__name__
        if "truncated" in msg or "broken data stream" in msg or "image file is truncated" in msg:
            raise DecodeError(f"truncated or corrupt image: {msg}") from None
        raise DecodeError(f"cannot read image: {msg}") from None
    except (ValueError, SyntaxError, EOFError) as e:  # PIL raises these for corrupt headers
        raise DecodeError(f"corrupt image: {e}") from None


def _open_with_limit(source: BinaryIO, max_pixels: int) -> Image.Image:
    """``Image.open`` with PIL's own bomb check no stricter than ours. PIL raises at twice its
    global ``MAX_IMAGE_PIXELS``; only when the caller raised the limit above that do we lift the
    global for this call (decoding runs one image at a time per process)."""
    if max_pixels <= 2 * (Image.MAX_IMAGE_PIXELS or 0):
        return Image.open(source)
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels // 2 + 1
    try:
        return Image.open(source)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _int_to_l(img: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int) greyscale -> 8-bit "L", scaled instead of clipped to white:
    ``v * 255 // top`` (top 65535; 255 for an "I" image whose values fit 8 bits). A band of rows
    at a time, so the only full-size new memory is the 1-byte result: the int64 array of the whole
    image cost 16 bytes a pixel (4.5 GB RSS for a 280 KB 12000 x 12000 PNG)."""
    w, h = img.size
    sixteen = img.mode.startswith("I;16")
    top = 65535
    if not sixteen:
        hi = img.getextrema()[1]  # one band: (min, max)
        top = 65535 if isinstance(hi, int | float) and hi > 255 else 255
    out = np.empty((h, w), dtype=np.uint8)
    step = max(1, (1 << 20) // max(w, 1))
    for y in range(0, h, step):
        band = img.crop((0, y, w, min(h, y + step)))
        if sixteen:  # v * 255 // 65535 == v // 257 exactly (65535 = 255 * 257), in uint16
            out[y : y + band.height] = np.asarray(band) // 257
        else:
            out[y : y + band.height] = np.clip(np.asarray(band, dtype=np.int64) * 255 // top, 0, 255)
    return Image.fromarray(out, "L")


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        return _int_to_l(img).convert("RGB")
    if mode == "F":
        arr8 = np.clip(np.asarray(img), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
    if (
        mode in ("RGBA", "LA", "PA", "RGBa", "La")
        or (mode == "P" and "transparency" in img.info)
        or ("transparency" in img.info)
    ):
        # Product cut-outs: composite on white, as a catalog page would show them.
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def preprocess(img: Image.Image, prep: Preprocessing, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """RGB PIL image -> uint8 array ``(3, crop, crop)``: resize short side, centre crop
    (or letterbox onto white, or squash to the square). Normalisation happens in the network (:class:`Normalize`).

    The plain resize builds an image of ``prep.work_pixels(w, h)`` pixels, which only the aspect
    ratio makes large (a 475-byte 1 x 100,000 PNG: 256 x 25,600,000). Beyond ``max_pixels`` (the
    limit the decoded photo itself obeys) a bounded road gives the same geometry: only the crop's
    region is resized (PIL's ``box``), or the letterbox shrinks the photo before pasting it on a
    crop-sized canvas. Its pixels may differ by 1 from the plain road's, so photos within the
    limit - every real one - keep the plain road and stay bit-identical."""
    resample = _RESAMPLE[prep.interpolation]
    w, h = img.size
    c = prep.crop
    bounded = prep.work_pixels(w, h) > max_pixels
    if prep.squash and not prep.letterbox:  # builds only resize x resize pixels: never bounded
        r = prep.resize
        img = img if img.size == (r, r) else img.resize((r, r), resample)
        if r != c:
            left = round((r - c) / 2.0)
            img = img.crop((left, left, left + c, left + c))
    elif prep.letterbox:
        side = max(w, h)
        if bounded:
            small = img.resize((max(1, round(w * c / side)), max(1, round(h * c / side))), resample)
            img = Image.new("RGB", (c, c), (255, 255, 255))
            img.paste(small, ((c - small.width) // 2, (c - small.height) // 2))
        else:
            canvas = Image.new("RGB", (side, side), (255, 255, 255))
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas.resize((c, c), resample)
    else:
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = prep.resize, int(prep.resize * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        left, top = round((size[0] - c) / 2.0), round((size[1] - c) / 2.0)
        if bounded:
            sx, sy = w / size[0], h / size[1]
            img = img.resize((c, c), resample, box=(left * sx, top * sy, (left + c) * sx, (top + c) * sy))
        else:
            if size != img.size:
                img = img.resize(size, resample)
            img = img.crop((left, top, left + c, top + c))
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_pixels(
    source: ImageSource,
    prep: Preprocessing,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode + preprocess one image: the only road from a file (or its bytes) to network input."""
    draft_to = prep.resize if (prep.draft and not prep.letterbox) else None
    if prep.draft and prep.letterbox:
        draft_to = prep.crop
    img = open_rgb(source, draft_to=draft_to, max_pixels=max_pixels)
    return preprocess(img, prep, max_pixels=max_pixels)
