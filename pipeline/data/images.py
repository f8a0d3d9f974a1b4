"""Finding images, hashing them, and decoding them safely into network-ready pixels.

Decoding is the one place that sees hostile input (truncated files, CMYK, 16-bit, EXIF
rotation, animations, decompression bombs), so every image in headstart - extract, fine-tune,
predict, evaluate - goes through :func:`load_pixels`. One function means training and serving
can never disagree about preprocessing.
"""

from __future__ import annotations

import csv
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from ..errors import InputError
from .preprocessing import Preprocessing

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
# PIL raises DecompressionBombError above 2x its MAX_IMAGE_PIXELS; we refuse at our own limit
# before decoding a byte of pixel data, and say which limit to raise.
DEFAULT_MAX_PIXELS = 2 * 89_478_485

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated photo is recorded as skipped, not padded grey


class DecodeError(Exception):
    """A file that cannot be used as an image; the message is the recorded reason."""


@dataclass(frozen=True)
class Item:
    path: Path  # absolute
    rel: str  # relative to the image root, POSIX separators (what the cache stores)
    label: str | None  # None = unlabelled


@dataclass(frozen=True)
class Skip:
    rel: str
    reason: str


@dataclass
class Catalog:
    root: Path
    items: list[Item]
    skipped: list[Skip]
    layout: str  # "folders" | "manifest" | "unlabelled" | "files"

    @property
    def class_names(self) -> list[str]:
        return sorted({i.label for i in self.items if i.label is not None})


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(folder: Path) -> list[Path]:
    out: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        out.extend(Path(dirpath) / f for f in sorted(filenames) if _is_image_name(f))
    return out


def _check_file(path: Path, rel: str) -> Skip | None:
    if path.is_symlink() and not path.exists():
        return Skip(rel, "broken symlink")
    if not path.is_file():
        # A FIFO or device named .jpg would block or never end when hashed.
        return Skip(rel, "not a regular file")
    if not os.access(path, os.R_OK):
        # Note: root passes access() for any mode bits; then the read itself decides.
        return Skip(rel, "permission denied")
    return None


def discover(source: str | os.PathLike[str], *, labelled: bool | None = None) -> Catalog:
    """Find the images under ``source``.

    * a folder of class folders (``root/口红/a.jpg``) -> labelled by folder name;
    * a folder of images with no sub-folders -> unlabelled;
    * a ``.csv`` manifest with columns ``path,label`` (label may be empty; paths relative to
      the manifest's folder).

    ``labelled=False`` treats a folder tree as unlabelled (for ``predict``).
    """
    src = Path(source)
    if not src.exists():
        raise InputError(f"{src} does not exist; pass a folder of images or a CSV manifest")
    if src.is_file() and src.suffix.lower() == ".csv":
        return _from_manifest(src)
    if not src.is_dir():
        raise InputError(f"{src} is not a folder or a .csv manifest")
    root = src.resolve()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[Item] = []
    skipped: list[Skip] = []
    by_folder = bool(subdirs) if labelled is None else labelled
    for path in _walk(root):
        rel = path.relative_to(root).as_posix()
        # A stray file beside the class folders is unlabelled.
        label = rel.split("/", 1)[0] if by_folder and "/" in rel else None
        bad = _check_file(path, rel)
        if bad:
            skipped.append(bad)
        else:
            items.append(Item(path, rel, label))
    if not items and not skipped:
        raise InputError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "expected class folders such as images/lipstick/*.jpg"
        )
    return Catalog(root, items, skipped, "folders" if by_folder else "unlabelled")


def _from_manifest(manifest: Path) -> Catalog:
    root = manifest.resolve().parent
    items: list[Item] = []
    skipped: list[Skip] = []
    with open(manifest, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "path" not in reader.fieldnames:
            raise InputError(
                f"{manifest} needs a header row with a 'path' column (and optionally 'label'); "
                f"found {reader.fieldnames}"
            )
        for row in reader:
            raw = (row.get("path") or "").strip()
            if not raw:
                continue
            path = Path(raw) if os.path.isabs(raw) else root / raw
            rel = Path(raw).as_posix()
            label = (row.get("label") or "").strip() or None
            if not path.exists() and not path.is_symlink():
                skipped.append(Skip(rel, "file not found"))
                continue
            bad = _check_file(path, rel)
            if bad:
                skipped.append(bad)
            else:
                items.append(Item(path, rel, label))
    if not items and not skipped:
        raise InputError(f"{manifest} lists no images")
    return Catalog(root, items, skipped, "manifest")


_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def open_rgb(
    source: str | os.PathLike[str] | Image.Image,
    *,
    draft_to: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Open any supported image as an 8-bit RGB PIL image, upright, on white if transparent.

    ``draft_to`` lets the JPEG decoder downscale in the DCT domain (1/2, 1/4, 1/8) to the
    smallest size whose sides are still >= ``draft_to``: most of the decode cost of a large
    photo disappears, and the final resize is from a smaller image.
    """
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


def _open_with_limit(source: str | os.PathLike[str], max_pixels: int) -> Image.Image:
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


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit int) greyscale: scale to 8 bits instead of clipping to white.
        arr = np.asarray(img, dtype=np.int64)
        top = 65535 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        arr8 = np.clip(arr * 255 // max(top, 1), 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, "L").convert("RGB")
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


def preprocess(img: Image.Image, prep: Preprocessing) -> np.ndarray:
    """RGB PIL image -> uint8 array ``(3, crop, crop)``: resize short side, centre crop
    (or letterbox onto white). Normalisation happens in the network (:class:`Normalize`)."""
    resample = _RESAMPLE[prep.interpolation]
    if prep.letterbox:
        w, h = img.size
        side = max(w, h)
        canvas = Image.new("RGB", (side, side), (255, 255, 255))
        canvas.paste(img, ((side - w) // 2, (side - h) // 2))
        img = canvas.resize((prep.crop, prep.crop), resample)
    else:
        w, h = img.size
        short, long = (w, h) if w <= h else (h, w)
        new_short, new_long = prep.resize, int(prep.resize * long / short)
        size = (new_short, new_long) if w <= h else (new_long, new_short)
        if size != img.size:
            img = img.resize(size, resample)
        w, h = img.size
        c = prep.crop
        left, top = round((w - c) / 2.0), round((h - c) / 2.0)
        img = img.crop((left, top, left + c, top + c))
    arr = np.asarray(img, dtype=np.uint8)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def load_pixels(
    source: str | os.PathLike[str] | Image.Image,
    prep: Preprocessing,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> np.ndarray:
    """Decode + preprocess one image: the only road from a file to network input."""
    draft_to = prep.resize if (prep.draft and not prep.letterbox) else None
    if prep.draft and prep.letterbox:
        draft_to = prep.crop
    img = open_rgb(source, draft_to=draft_to, max_pixels=max_pixels)
    return preprocess(img, prep)
