"""Decode + resize per photo on the CPU, the ways available here, on the same real photos.

extract decodes with PIL, using JPEG draft mode (DCT-domain downscaling to the smallest scale
still >= the resize target) and then PIL's resize - the pixels the fingerprint's preprocessing
names. Alternatives measured: PIL without draft (the seed's full decode); ``torchvision.io``'s
``decode_jpeg`` on the CPU, then a torch resize (other pixels: it would need a new fingerprint);
PIL's ``reduce`` by an integer factor before the resize (also other pixels). One core, photos
decoded one after another, so the figures are CPU cost per photo.

    python bench/decode_compare.py [--n 200]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import make_photos

from pipeline.data.images import load_pixels
from pipeline.models.backbones import get_spec


def per_photo(fn, paths) -> float:
    fn(paths[0])
    t0 = time.perf_counter()
    for p in paths:
        fn(p)
    return 1e3 * (time.perf_counter() - t0) / len(paths)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--workdir", default="artifacts/bench")
    args = ap.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.workdir) / "photos640" / "all"
    paths = make_photos(folder, args.n, 640)[: args.n]
    prep = get_spec("efficientnet_lite0").preprocessing  # resize 256 (bicubic), crop 224
    nodraft = type(prep)(**{**prep.to_dict(), "draft": False})

    def tv_decode(p: Path) -> torch.Tensor:
        from torchvision.io import decode_jpeg, read_file
        from torchvision.transforms.v2.functional import center_crop, resize

        img = decode_jpeg(read_file(str(p)))
        return center_crop(resize(img, [prep.resize], antialias=True), [prep.crop])

    def pil_reduce(p: Path) -> np.ndarray:
        with Image.open(p) as img:
            img = img.convert("RGB")
            factor = max(1, min(img.size) // prep.resize)
            img = img.reduce(factor) if factor > 1 else img
            s = prep.resize / min(img.size)
            img = img.resize((round(img.width * s), round(img.height * s)), Image.Resampling.BICUBIC)
            return np.asarray(img)

    rows = [
        ("PIL draft + bicubic resize (extract's default; fingerprint pixels)", lambda p: load_pixels(p, prep)),
        ("PIL full decode + bicubic resize (--no-draft, the seed's decode)", lambda p: load_pixels(p, nodraft)),
        ("PIL reduce(k) + bicubic resize (other pixels)", pil_reduce),
        ("torchvision.io.decode_jpeg (CPU) + antialiased resize (other pixels)", tv_decode),
    ]
    base = None
    print(f"{len(paths)} photos, 640 px JPEG, one thread")
    for name, fn in rows:
        ms = per_photo(fn, paths)
        base = base or ms
        print(f"  {name:<72} {ms:6.2f} ms/photo  ({ms / base:.2f}x the default)")


if __name__ == "__main__":
    main()
