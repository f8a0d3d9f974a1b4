"""Real photos at a realistic catalog size, for the benchmarks.

No product-photo set exists offline, so the benchmark photos are crops of real photographs
that are on every development machine: scikit-learn's two sample photos (CC-BY 2.0),
scikit-image's sample photos, and the 2268x1512 flower photo of Debian's ``libjxl-testdata``
(BSD-3-Clause, vendored in ``tests/data/images/``). Each benchmark photo is a different random
crop (60-100% of the width and height), possibly mirrored, resized so its long side is ``size`` px and saved as a JPEG
(quality 90, 4:2:0) - the shape and encoding of a typical web catalog photo. They are real
photographs, not noise, but they are not cosmetics.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

# The flower photo of Debian's libjxl-testdata, vendored with its licence in tests/data/.
FLOWER = str(Path(__file__).resolve().parent.parent / "tests" / "data" / "images" / "flower_q85_420.jpg")


def sources() -> list[tuple[str, Image.Image]]:
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    out = [(Path(f).stem, Image.open(f).convert("RGB")) for f in load_sample_images().filenames]
    for name in ("astronaut", "coffee", "rocket", "chelsea", "hubble_deep_field", "retina", "immunohistochemistry"):
        out.append((name, Image.fromarray(getattr(sk, name)()).convert("RGB")))
    if os.path.exists(FLOWER):
        out.append(("flower", Image.open(FLOWER).convert("RGB")))
    return out


def make_photos(folder: Path, n: int, size: int = 640, seed: int = 0, start: int = 0) -> list[Path]:
    """``n`` distinct JPEGs ``photo-{start+i:05d}.jpg`` in ``folder`` (kept if already there)."""
    folder.mkdir(parents=True, exist_ok=True)
    # Never upscale a source to more than 1.5x: crops of small photos blown up to 1280 px would
    # not behave like real 1280 px photos (e.g. under draft decoding).
    srcs = [s for s in sources() if max(s[1].size) * 1.5 >= size] or sources()
    rng = np.random.default_rng(seed + start)
    paths = []
    for i in range(start, start + n):
        path = folder / f"photo-{i:05d}.jpg"
        _, img = srcs[i % len(srcs)]
        w, h = img.size
        cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        if not path.exists():
            crop = img.crop((x, y, x + cw, y + ch))
            if rng.random() < 0.5:
                crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            scale = size / max(crop.size)
            crop = crop.resize((round(crop.width * scale), round(crop.height * scale)), Image.Resampling.LANCZOS)
            crop.save(path, quality=90)
        paths.append(path)
    return paths
