"""Which head, on the same cached features? And a Fashion-MNIST linear probe vs raw pixels.

Part 1 - the bundled catalog (train 30 photos/class -> fit; test 50/class, disjoint, from the
official test file), EfficientNet-Lite0 features from the cache, test accuracy of:

* ours: `fit-head` (logistic regression, C swept on validation log-loss, temperature-scaled);
* scikit-learn's default: ``LogisticRegression()`` (C=1, raw features, max_iter raised so it
  converges);
* the seed article's loop: Adam (lr 1e-3, batch 32) on a new FC layer for 5 epochs - run on
  the cached features, which is the same computation because the backbone is frozen;
* `fit-head --head mlp` and `--head centroid`;
* logistic regression on raw pixels (same split) - the floor.

Part 2 - Fashion-MNIST, a CPU-sized subset (default 100 train + 50 test photos per class, from
the official train and test files): the same heads, and the linear probe against logistic
regression on raw pixels of the same subset (both C-swept). Published raw-pixel LR on all 60k
photos: about 0.83-0.84.

    python bench/head_accuracy.py [--train-per-class 100] [--test-per-class 50]

Needs the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import joblib
import numpy as np
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_sample_catalog import CLASSES, SRC, pick, read_idx

from pipeline.cache.store import Cache
from pipeline.config import ExtractConfig, FitHeadConfig
from pipeline.data import SAMPLE_CATALOG
from pipeline.demo import pixel_baseline
from pipeline.extract import extract
from pipeline.fit_head import fit_head
from pipeline.probe.estimators import LogisticHead
from pipeline.probe.selection import sweep_c


def load(cache: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    with Cache(cache) as c:
        return c.features(), c.labels, c.class_names


def seed_adam_fc(Xtr: np.ndarray, ytr: np.ndarray, k: int, epochs: int = 5, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    fc = nn.Linear(Xtr.shape[1], k)
    opt = torch.optim.Adam(fc.parameters(), lr=1e-3)
    X, y = torch.from_numpy(Xtr), torch.from_numpy(ytr)
    for _ in range(epochs):
        perm = torch.randperm(len(y))
        for s in range(0, len(y), 32):
            b = perm[s : s + 32]
            loss = nn.functional.cross_entropy(fc(X[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return fc


def compare_heads(tr: Path, te: Path, out: Path) -> dict[str, float]:
    """Every head on the same cached features, scored on the same test photos."""
    Xtr, ytr, names = load(tr)
    Xte, yte, names_te = load(te)
    assert names == names_te
    acc: dict[str, float] = {}
    for kind in ("logreg", "mlp", "centroid"):
        t0 = time.perf_counter()
        s = fit_head(FitHeadConfig(cache=str(tr), out=str(out / f"head_{kind}"), head=kind))
        head = joblib.load(out / f"head_{kind}" / "head.joblib")
        acc[f"fit-head --head {kind}" + (" (ours, default)" if kind == "logreg" else "")] = float(
            (head.predict(Xte) == yte).mean()
        )
        print(f"  {kind}: {s.line()} [{time.perf_counter() - t0:.1f}s]")
    sk = LogisticRegression(max_iter=5000).fit(Xtr, ytr)
    acc["scikit-learn LogisticRegression() default C=1"] = float((sk.predict(Xte) == yte).mean())
    fc = seed_adam_fc(Xtr, ytr.astype(np.int64), len(names))
    with torch.no_grad():
        acc["seed: Adam on FC, 5 epochs"] = float((fc(torch.from_numpy(Xte)).argmax(1).numpy() == yte).mean())
    return acc


def part1(out: Path) -> dict[str, float]:
    kw = dict(progress=False)
    tr, te = out / "catalog_train.h5", out / "catalog_test.h5"
    extract(ExtractConfig(images=str(SAMPLE_CATALOG / "train"), out=str(tr), **kw))
    extract(ExtractConfig(images=str(SAMPLE_CATALOG / "test"), out=str(te), **kw))
    acc = compare_heads(tr, te, out)
    acc["raw-pixel logistic regression (C swept)"] = pixel_baseline(SAMPLE_CATALOG / "train", SAMPLE_CATALOG / "test")
    return acc


def write_subset(folder: Path, stem: str, per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(SRC / f"{stem}-images-idx3-ubyte.gz")
    labels = read_idx(SRC / f"{stem}-labels-idx1-ubyte.gz")
    idx = pick(labels, per_class, seed)
    for i in idx:
        d = folder / CLASSES[int(labels[i])]
        d.mkdir(parents=True, exist_ok=True)
        p = d / f"{stem}-{i:05d}.png"
        if not p.exists():
            Image.fromarray(images[i], "L").save(p)
    return images[idx].reshape(len(idx), -1).astype(np.float32) / 255, labels[idx].astype(np.int64)


def part2(out: Path, train_per_class: int, test_per_class: int) -> dict[str, float]:
    root = out / "fmnist"
    Ptr, ytr_pix = write_subset(root / "train", "train", train_per_class, seed=1)
    Pte, yte_pix = write_subset(root / "test", "t10k", test_per_class, seed=1)
    t0 = time.perf_counter()
    e1 = extract(ExtractConfig(images=str(root / "train"), out=str(root / "train.h5"), progress=False))
    e2 = extract(ExtractConfig(images=str(root / "test"), out=str(root / "test.h5"), progress=False))
    print(f"  {e1.line()}\n  {e2.line()}  [{time.perf_counter() - t0:.0f}s]")
    heads = compare_heads(root / "train.h5", root / "test.h5", root)
    # Raw pixels, same photos, same protocol (C swept on a 20% validation slice, refit on all).
    rng = np.random.default_rng(0)
    val = rng.random(len(ytr_pix)) < 0.2
    c, _ = sweep_c(Ptr[~val], ytr_pix[~val], Ptr[val], ytr_pix[val])
    pix = LogisticHead(C=c).fit(Ptr, ytr_pix)
    pixels = float((pix.predict(Pte) == yte_pix).mean())
    return {
        **{f"{k}, Lite0 features [{len(ytr_pix)} train / {len(yte_pix)} test]": v for k, v in heads.items()},
        "raw-pixel logistic regression (C swept), same photos": pixels,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-per-class", type=int, default=100)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench/head_accuracy"))
    ap.add_argument("--skip-fmnist", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("Part 1: heads on the same cached features (bundled catalog, 300 train / 500 test photos)")
    a1 = part1(args.out)
    for k, v in a1.items():
        print(f"  {v:.3f}  {k}")
    a2: dict[str, float] = {}
    if not args.skip_fmnist:
        print("Part 2: Fashion-MNIST subset")
        a2 = part2(args.out, args.train_per_class, args.test_per_class)
        for k, v in a2.items():
            print(f"  {v:.3f}  {k}")
    (args.out / "result.json").write_text(json.dumps({"catalog": a1, "fashion_mnist": a2}, indent=2) + "\n")


if __name__ == "__main__":
    main()
