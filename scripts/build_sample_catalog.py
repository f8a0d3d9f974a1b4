"""Build the bundled sample catalog from Fashion-MNIST (Zalando catalogue photos, MIT licence).

Source: Debian package ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``),
files under /usr/share/datasets/fashion-mnist/. We take a class-balanced, seeded subset of the
official *train* file for our train split and of the official *test* file for our test split,
so no photo can appear on both sides. Images are written as the original 28x28 greyscale PNGs,
unchanged (no upscaling, no synthetic content).

    python scripts/build_sample_catalog.py [--train-per-class 30] [--test-per-class 50]
"""

from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

SRC = Path("/usr/share/datasets/fashion-mnist")
OUT = Path(__file__).resolve().parents[1] / "pipeline" / "data" / "sample_catalog"
# Fashion-MNIST's label order; names made folder-friendly.
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def pick(labels: np.ndarray, per_class: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for c in range(len(CLASSES)):
        idx = np.flatnonzero(labels == c)
        chosen.extend(sorted(rng.choice(idx, per_class, replace=False).tolist()))
    return chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-per-class", type=int, default=30)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    for split in ("train", "test"):  # keep README.md (attribution) beside them
        shutil.rmtree(args.out / split, ignore_errors=True)
    for split, stem, per_class in (("train", "train", args.train_per_class), ("test", "t10k", args.test_per_class)):
        images = read_idx(SRC / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(SRC / f"{stem}-labels-idx1-ubyte.gz")
        for i in pick(labels, per_class, args.seed):
            folder = args.out / split / CLASSES[int(labels[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], "L").save(folder / f"fmnist-{stem}-{i:05d}.png", optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
