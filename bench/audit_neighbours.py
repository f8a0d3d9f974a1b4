"""The thresholds of `headstart audit`'s neighbour searches, measured on real photos.

1. **Near duplicates** (``--duplicate-threshold``): the bundled catalog's photos (800 real
   Fashion-MNIST photos, 10 classes, stored upscaled to 224 px PNG) plus copies of 60 of them -
   JPEG quality 75 and 50, resized to 160 and 320 px, 4 % cropped off each side, brighter by
   8 %. Reported per cosine threshold: the share of copies whose cosine to their original is
   above it, and the share of distinct photos whose most similar distinct photo of their class
   is above it (false duplicates).
2. **Outliers** (``--outlier-threshold``): the robust z-score (pipeline/probe/neighbours.py) of
   the catalog's test photos against the class geometry of its train photos, next to that of
   photos that are not clothing (scikit-learn's and scikit-image's sample photos, a blank white
   placeholder, a grey "no image" card).
3. **Exact search vs FAISS** (``BRUTE_FORCE_ROWS``): wall time of the exact blocked search and of
   the FAISS index (build + search + exact check) on N unit rows of 1280-d: the catalog's
   features plus noise (distinct rows, cosine about 0.5 to each other), 1 % of them replaced by
   a near copy of another row; and the share of the exact search's pairs FAISS finds.

    python bench/audit_neighbours.py [--out artifacts/bench/neighbours] [--sizes 10000,20000,40000,200000]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageEnhance

from pipeline.cache.store import Cache
from pipeline.data import SAMPLE_CATALOG
from pipeline.probe import neighbours

VARIANTS = ("jpeg75", "jpeg50", "resize160", "resize320", "crop4", "bright8")
SIZE = 224  # the catalog's 28 px photos are stored upscaled, as a web catalog's would be


def variant(img: Image.Image, kind: str) -> Image.Image:
    if kind.startswith("jpeg"):
        buf = io.BytesIO()
        img.convert("RGB").save(buf, "JPEG", quality=int(kind[4:]))
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind.startswith("resize"):
        side = int(kind[6:])
        return img.resize((side, side), Image.Resampling.BICUBIC)
    if kind == "crop4":  # 4 % off each side
        m = round(img.width * 0.04)
        return img.crop((m, m, img.width - m, img.height - m))
    return ImageEnhance.Brightness(img.convert("RGB")).enhance(1.08)


def foreign(folder: Path) -> None:
    import skimage.data as sk
    from sklearn.datasets import load_sample_images

    folder.mkdir(parents=True, exist_ok=True)
    for f in load_sample_images().filenames:
        Image.open(f).convert("RGB").save(folder / f"sklearn-{Path(f).stem}.png")
    for name in ("astronaut", "coffee", "chelsea", "rocket", "camera", "horse", "moon", "text", "hubble_deep_field"):
        img = getattr(sk, name)()
        Image.fromarray(img if img.dtype == np.uint8 else (img * 255).astype(np.uint8)).convert("RGB").save(
            folder / f"skimage-{name}.png"
        )
    Image.new("RGB", (400, 400), "white").save(folder / "placeholder-white.png")
    card = Image.new("RGB", (400, 400), (200, 200, 200))
    ImageDraw.Draw(card).text((150, 190), "no image", fill=(90, 90, 90))
    card.save(folder / "placeholder-no-image.png")


def build(out: Path) -> Path:
    images = out / "images"
    if not images.exists():
        rng = np.random.default_rng(0)
        for split in ("train", "test"):
            for cls in sorted(p.name for p in (SAMPLE_CATALOG / split).iterdir()):
                (images / split / cls).mkdir(parents=True)
                for p in sorted((SAMPLE_CATALOG / split / cls).glob("*.png")):
                    Image.open(p).resize((SIZE, SIZE), Image.Resampling.BICUBIC).save(images / split / cls / p.name)
        originals = sorted((images / "test").rglob("*.png"))
        for p in rng.choice(originals, 60, replace=False):
            img = Image.open(p)
            for kind in VARIANTS:
                dst = images / "copies" / f"{p.stem}~{kind}.png"
                dst.parent.mkdir(parents=True, exist_ok=True)
                variant(img, kind).save(dst)
        foreign(images / "foreign")
    cache = out / "features.h5"
    if not cache.exists():
        subprocess.run(
            [sys.executable, "-m", "pipeline", "extract", str(images), "--out", str(cache), "--no-progress"], check=True
        )
    return cache


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="artifacts/bench/neighbours")
    ap.add_argument("--sizes", default="10000,20000,40000,200000")
    ap.add_argument("--exact-up-to", type=int, default=40000, help="larger sizes: FAISS only")
    args = ap.parse_args()
    cache = build(Path(args.out))
    with Cache(cache) as c:
        U, paths = neighbours.unit(c.features()), c.paths
    group = [p.split("/", 1)[0] for p in paths]  # train, test, copies, foreign
    name = [Path(p).stem.split("~")[0] for p in paths]
    cls = [p.split("/")[1] if g in ("train", "test") else "" for p, g in zip(paths, group, strict=True)]
    S = U @ U.T
    np.fill_diagonal(S, -1)

    # 1. near duplicates
    copies = [i for i, g in enumerate(group) if g == "copies"]
    original = {name[i]: i for i, g in enumerate(group) if g in ("train", "test")}
    distinct = [i for i, g in enumerate(group) if g in ("train", "test")]
    D = S[np.ix_(distinct, distinct)]
    same = np.array([[cls[a] == cls[b] for b in distinct] for a in distinct])
    max_same = np.where(same, D, -1).max(1)  # each photo's most similar distinct photo of its class
    to_original = np.array([S[i, original[name[i]]] for i in copies])
    by_kind = {k: to_original[[paths[i].endswith(f"~{k}.png") for i in copies]] for k in VARIANTS}
    print(
        f"{len(copies)} copies: cosine to their original, min per variant: "
        + ", ".join(f"{k} {v.min():.3f}" for k, v in by_kind.items())
    )
    print(
        f"distinct photos of one class: highest cosine {max_same.max():.3f}, 99th percentile "
        f"{np.percentile(max_same, 99):.3f}, median {np.median(max_same):.3f}"
    )
    for t in (0.90, 0.93, 0.95, 0.96, 0.97, 0.98):
        found = np.mean(to_original > t)
        false = np.mean(max_same > t)
        kinds = ", ".join(f"{k} {np.mean(v > t):.0%}" for k, v in by_kind.items())
        print(
            f"  threshold {t:.2f}: copies clustered with their original {found:.1%} ({kinds}); "
            f"distinct same-class photos joined {false:.1%}"
        )

    # 2. outliers
    train = [i for i, g in enumerate(group) if g == "train"]
    names = sorted(set(cls[i] for i in train))
    y = np.array([names.index(cls[i]) for i in train])
    geo = neighbours.class_geometry(U, np.array(train), y, len(names))
    z, _ = neighbours.outlier_scores(U, geo)
    test = np.array([g == "test" for g in group])
    fgn = np.array([g == "foreign" for g in group])
    print(
        f"outlier z: test photos max {z[test].max():.2f} (99.9th pct {np.percentile(z[test], 99.9):.2f}, "
        f"99th {np.percentile(z[test], 99):.2f}); foreign min {z[fgn].min():.2f}"
    )
    for i in np.flatnonzero(fgn)[np.argsort(z[fgn])]:
        print(f"    {paths[i]}: {z[i]:.2f}")
    for t in (3.0, 4.0, 5.0, 6.0):
        print(
            f"  threshold {t}: test photos flagged {np.mean(z[test] > t):.2%}, "
            f"foreign flagged {np.mean(z[fgn] > t):.0%}"
        )

    # 3. exact vs faiss
    rng = np.random.default_rng(0)
    for n in [int(s) for s in args.sizes.split(",")]:
        base = U[rng.integers(0, len(U), n)]
        Un = neighbours.unit(base + rng.normal(0, 0.03, base.shape).astype(np.float32))
        twin, of = rng.choice(n, n // 100, replace=False), rng.integers(0, n, n // 100)
        Un[twin] = neighbours.unit(Un[of] + rng.normal(0, 0.002, (len(of), Un.shape[1])).astype(np.float32))
        Un = Un.astype(np.float16)
        exact, line = None, f"N={n}: exact not run"
        if n <= args.exact_up_to:
            t0 = time.perf_counter()
            exact, _ = neighbours.near_duplicate_pairs(Un, 0.97, method="exact")
            line = f"N={n}: exact {time.perf_counter() - t0:.1f} s ({len(exact)} pairs)"
        if neighbours.faiss_available():
            t0 = time.perf_counter()
            approx, _ = neighbours.near_duplicate_pairs(Un, 0.97, method="faiss")
            t_faiss = time.perf_counter() - t0
            got = {(int(a), int(b)) for a, b, _ in approx}
            line += f"; faiss {t_faiss:.1f} s ({len(got)} pairs)"
            if exact is not None:
                key = {(int(a), int(b)) for a, b, _ in exact}
                line += f", recall of the exact pairs {len(key & got) / max(1, len(key)):.3f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
