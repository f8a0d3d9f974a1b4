"""Multi-label tags through the real pipeline: one-vs-rest head vs a label-powerset head.

No real multi-label product set exists offline, so this builds one honestly from real photos:
Fashion-MNIST (Zalando catalogue photos, 28x28 greyscale; garments, shoes and bags, not
cosmetics), with tags **measured from each photo's pixels** (values 0-255, background 0) and one
derived from its category. Rules, per photo:

* garment pixels: value > 16; the interior: garment pixels whose 4-neighbours are garment
  pixels, eroded twice (so the silhouette's edge is not counted as texture);
* ``light``: mean value of the garment pixels > 175;
* ``patterned``: mean gradient magnitude (``numpy.gradient``, value units per pixel) over the
  interior > 25 - stripes, prints, straps, seams and folds all count;
* ``wide``: the garment's bounding box is wider than tall;
* ``large``: garment pixels cover more than 55 % of the frame;
* ``footwear``: the category is sandal, sneaker or ankle boot.

Prevalences on the default train photos (printed): light 40 %, patterned 23 %, wide 36 %,
large 33 %, footwear 30 %. The tags are as the rules say, with no noise; rules on pixels are not
what a merchandiser would tag, but each is a property of the photo a head must read off the
features.

Chain: the photos (unchanged PNGs) and a manifest ``path,category,tags`` (``tags`` ``;``-joined,
empty for none) are written for a class-balanced train set from the official train file and a
test set from the official test file; ``extract`` (default backbone, EfficientNet-Lite0),
``fit-head`` (every attribute: ``category`` and the multi-label ``tags``), ``export``, and
``predict`` on the test photos (``--embeddings`` for their features). The exported model's
``tags`` column (labels at its per-label thresholds) is scored against the rules.

Baseline: label powerset - a single multi-class logistic head over the tag *combinations* seen
in training (the pipeline's logistic head and C sweep on validation log-loss, scikit-learn
L-BFGS underneath, on the same cached train features), predicting a combination for each test
photo's features (from ``predict --embeddings``). It cannot predict a combination it never saw.

Also: the thresholds of ``fit-head --target-precision 0.9`` (same head, other cut-offs) on the
same test probabilities.

    python bench/multilabel.py [--train-per-class 250] [--test-per-class 100]

Needs the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_sample_catalog import CLASSES, SRC, pick, read_idx

from pipeline.cache.store import Cache
from pipeline.config import ExportConfig, ExtractConfig, FitHeadConfig, PredictConfig
from pipeline.export import export
from pipeline.extract import extract
from pipeline.fit_head import fit_head
from pipeline.predict import predict
from pipeline.probe.estimators import LogisticHead
from pipeline.probe.selection import sweep_c

GARMENT_LEVEL = 16  # a pixel above this is garment (the background is 0)
LIGHT_LEVEL = 175.0
PATTERN_LEVEL = 25.0
LARGE_FRACTION = 0.55
FOOTWEAR = {"sandal", "sneaker", "ankle_boot"}
TAGS = ["light", "patterned", "wide", "large", "footwear"]


def _erode(m: np.ndarray) -> np.ndarray:
    """4-neighbour erosion of boolean masks ``[N, H, W]`` (outside the frame counts as background)."""
    out = m.copy()
    out[:, 1:, :] &= m[:, :-1, :]
    out[:, :-1, :] &= m[:, 1:, :]
    out[:, :, 1:] &= m[:, :, :-1]
    out[:, :, :-1] &= m[:, :, 1:]
    out[:, 0, :] = out[:, -1, :] = False
    out[:, :, 0] = out[:, :, -1] = False
    return out


def measure(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The tags of the module docstring, a 0/1 matrix ``[N, len(TAGS)]``."""
    x = images.astype(np.float32)
    garment = x > GARMENT_LEVEL
    n_garment = np.maximum(garment.sum((1, 2)), 1)
    mean_value = (x * garment).sum((1, 2)) / n_garment
    gy, gx = np.gradient(x, axis=(1, 2))
    interior = _erode(_erode(garment))
    texture = (np.hypot(gx, gy) * interior).sum((1, 2)) / np.maximum(interior.sum((1, 2)), 1)
    rows, cols = garment.any(2), garment.any(1)
    height = rows.shape[1] - rows[:, ::-1].argmax(1) - rows.argmax(1)
    width = cols.shape[1] - cols[:, ::-1].argmax(1) - cols.argmax(1)
    footwear = np.array([CLASSES[int(c)] in FOOTWEAR for c in labels])
    return np.stack(
        [
            mean_value > LIGHT_LEVEL,
            texture > PATTERN_LEVEL,
            width > height,
            garment.mean((1, 2)) > LARGE_FRACTION,
            footwear,
        ],
        1,
    ).astype(np.uint8)


def write_split(root: Path, stem: str, per_class: int, seed: int) -> tuple[Path, dict[str, np.ndarray]]:
    """PNGs under ``root/<stem>/`` and the manifest ``root/<stem>.csv``; rel path -> tag row."""
    images = read_idx(SRC / f"{stem}-images-idx3-ubyte.gz")
    labels = read_idx(SRC / f"{stem}-labels-idx1-ubyte.gz")
    idx = np.array(pick(labels, per_class, seed))
    Y = measure(images[idx], labels[idx])
    (root / stem).mkdir(parents=True, exist_ok=True)
    manifest, truth = root / f"{stem}.csv", {}
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "category", "tags"])
        for i, y in zip(idx, Y, strict=True):
            rel = f"{stem}/{stem}-{i:05d}.png"
            if not (root / rel).exists():
                Image.fromarray(images[i], "L").save(root / rel)
            w.writerow([rel, CLASSES[int(labels[i])], ";".join(t for t, on in zip(TAGS, y, strict=True) if on)])
            truth[rel] = y
    return manifest, truth


def scores(Y: np.ndarray, P: np.ndarray) -> dict[str, object]:
    """Per-tag precision/recall/F1, micro-F1 and exact match of 0/1 predictions ``P``."""
    Y, P = Y.astype(bool), P.astype(bool)
    per = {}
    for j, t in enumerate(TAGS):
        tp, fp, fn = int((P[:, j] & Y[:, j]).sum()), int((P[:, j] & ~Y[:, j]).sum()), int((~P[:, j] & Y[:, j]).sum())
        p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
        per[t] = {
            "precision": p,
            "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "support": int(Y[:, j].sum()),
        }
    tp, fp, fn = int((P & Y).sum()), int((P & ~Y).sum()), int((~P & Y).sum())
    p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return {
        "per_label": per,
        "micro_precision": p,
        "micro_recall": r,
        "micro_f1": 2 * p * r / (p + r) if p + r else 0.0,
        "macro_f1": float(np.mean([v["f1"] for v in per.values()])),
        "exact_match": float((P == Y).all(1).mean()),
    }


def micro_f1_diff_interval(Y: np.ndarray, A: np.ndarray, B: np.ndarray, n: int = 2000, seed: int = 0) -> list[float]:
    """95 % paired bootstrap interval (test photos resampled) of micro-F1(A) - micro-F1(B)."""
    Y, A, B = Y.astype(bool), A.astype(bool), B.astype(bool)
    rng = np.random.default_rng(seed)

    def f1(P: np.ndarray, idx: np.ndarray) -> np.ndarray:
        tp = (P & Y)[idx].sum((1, 2))
        return 2 * tp / np.maximum(P[idx].sum((1, 2)) + Y[idx].sum((1, 2)), 1)

    idx = rng.integers(0, len(Y), (n, len(Y)))
    d = f1(A, idx) - f1(B, idx)
    return [float(v) for v in np.percentile(d, [2.5, 97.5])]


def read_predictions(path: Path, test_rels: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The exported model's tags (0/1 at its thresholds), tag probabilities and category, in
    ``test_rels`` order, from predict's CSV (``tags``, ``tags_probabilities``)."""
    by_name: dict[str, dict[str, str]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            assert not row["error"], row
            by_name[Path(row["path"]).name] = row
    Y = np.zeros((len(test_rels), len(TAGS)), np.uint8)
    Q = np.zeros((len(test_rels), len(TAGS)), np.float32)
    cats = []
    for i, rel in enumerate(test_rels):
        row = by_name[Path(rel).name]
        on = set(filter(None, row["tags"].split(";")))
        Y[i] = [t in on for t in TAGS]
        probs = dict(kv.split("=") for kv in row["tags_probabilities"].split(";"))
        Q[i] = [float(probs[t]) for t in TAGS]
        cats.append(row["label"])  # the main head: the category column
    return Y, Q, cats


def powerset_baseline(Xtr: np.ndarray, Ytr: np.ndarray, Xte: np.ndarray, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Label powerset: one multi-class logistic head over tag combinations (C swept on a seeded
    20 % validation slice by log-loss, then refit on every train row); 0/1 tags for ``Xte``."""
    combo = np.array(["".join(map(str, y)) for y in Ytr])
    rng = np.random.default_rng(seed)
    val = rng.random(len(combo)) < 0.2
    c, _ = sweep_c(Xtr[~val], combo[~val], Xtr[val], combo[val])
    head = LogisticHead(C=c).fit(Xtr, combo)
    pred = head.predict(Xte)
    return np.array([[int(ch) for ch in s] for s in pred], np.uint8), {"C": c, "combinations": len(set(combo))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-per-class", type=int, default=250)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench/multilabel"))
    args = ap.parse_args()
    root = args.out
    root.mkdir(parents=True, exist_ok=True)
    t00 = time.perf_counter()
    train_csv, train_truth = write_split(root, "train", args.train_per_class, seed=0)
    test_csv, test_truth = write_split(root, "t10k", args.test_per_class, seed=0)
    Ytr_all = np.array(list(train_truth.values()))
    Yte = np.array(list(test_truth.values()))
    prevalence = {t: float(Ytr_all[:, j].mean()) for j, t in enumerate(TAGS)}
    print(f"{len(train_truth)} train / {len(test_truth)} test photos; tag prevalence (train):")
    print("  " + ", ".join(f"{t} {p:.0%}" for t, p in prevalence.items()))
    t0 = time.perf_counter()
    e = extract(ExtractConfig(images=str(train_csv), out=str(root / "train.h5"), progress=False))
    print(f"extract: {e.line()} [{time.perf_counter() - t0:.0f}s]")
    t0 = time.perf_counter()
    fitted = fit_head(FitHeadConfig(cache=str(root / "train.h5"), out=str(root / "head")))
    print(f"fit-head: {fitted.line()} [{time.perf_counter() - t0:.0f}s]")
    t0 = time.perf_counter()
    fit_p90 = fit_head(FitHeadConfig(cache=str(root / "train.h5"), out=str(root / "head_p90"), target_precision=0.9))
    print(f"fit-head --target-precision 0.9: [{time.perf_counter() - t0:.0f}s]")
    t0 = time.perf_counter()
    export(ExportConfig(head=str(root / "head"), out=str(root / "model")))
    print(f"export [{time.perf_counter() - t0:.0f}s]")
    t0 = time.perf_counter()
    emb = root / "t10k_features.npy"
    predict(PredictConfig(model=str(root / "model"), inputs=(str(test_csv),), out=str(root / "predictions.csv"),
                          embeddings=str(emb), top_k=1, progress=False))  # fmt: skip
    print(f"predict [{time.perf_counter() - t0:.0f}s]")

    test_rels = list(test_truth)
    ours, Q, cats = read_predictions(root / "predictions.csv", test_rels)
    # predict's features come in input order: the rows of the test manifest
    Xte = np.load(emb)
    with Cache(root / "train.h5") as c:
        Xtr, paths = c.features(), c.paths
    Ytr = np.array([train_truth[p] for p in paths])
    t0 = time.perf_counter()
    base, info = powerset_baseline(Xtr, Ytr, Xte)
    print(
        f"powerset baseline: {info['combinations']} combinations, C={info['C']:.3g} [{time.perf_counter() - t0:.0f}s]"
    )
    unseen = {"".join(map(str, y)) for y in Yte} - {"".join(map(str, y)) for y in Ytr}
    n_unseen = sum("".join(map(str, y)) in unseen for y in Yte)

    def thresholds(head: str) -> list[float]:
        meta = json.loads((root / head / "attributes" / "tags" / "head.json").read_text())
        order = [meta["class_names"].index(t) for t in TAGS]
        return [meta["thresholds"][k] for k in order]

    th_f1, th_p90 = np.array(thresholds("head")), np.array(thresholds("head_p90"))
    assert (np.greater_equal(Q, th_f1) == ours.astype(bool)).all(), (
        "predict's tags are not its probabilities at its thresholds"
    )
    s_ours, s_base, s_p90 = scores(Yte, ours), scores(Yte, base), scores(Yte, np.greater_equal(Q, th_p90))
    cat_acc = float(np.mean([c == CLASSES[int(lab)] for c, lab in zip(cats, _test_labels(test_rels), strict=True)]))

    print(f"\ntest photos: {len(Yte)}; {n_unseen} carry a combination absent from train")
    print(f"{'tag':<10} {'support':>7} | {'one-vs-rest (exported) P/R/F1':>30} | {'powerset P/R/F1':>20} | F1 diff")
    for t in TAGS:
        a, b = s_ours["per_label"][t], s_base["per_label"][t]
        print(f"{t:<10} {a['support']:>7} | {a['precision']:>10.3f} {a['recall']:.3f} {a['f1']:.3f} "
              f"| {b['precision']:.3f} {b['recall']:.3f} {b['f1']:.3f} | {a['f1'] - b['f1']:+.3f}")  # fmt: skip
    for k in ("micro_f1", "macro_f1", "exact_match"):
        a, b = s_ours[k], s_base[k]
        print(f"{k:<18} ours {a:.3f}  powerset {b:.3f}  diff {a - b:+.3f}  ratio {a / b:.3f}")
    ci = micro_f1_diff_interval(Yte, ours, base)
    print(f"micro-F1 difference, 95 % paired bootstrap over test photos: [{ci[0]:+.3f}, {ci[1]:+.3f}]")
    print(f"category (main head) test accuracy: {cat_acc:.3f}")
    print("\nthresholds: max validation F1 vs --target-precision 0.9 -> test P/R")
    for j, t in enumerate(TAGS):
        a, c = s_ours["per_label"][t], s_p90["per_label"][t]
        print(f"  {t:<10} {th_f1[j]:.3f} -> P {a['precision']:.3f} R {a['recall']:.3f}   |   "
              f"{th_p90[j]:.3f} -> P {c['precision']:.3f} R {c['recall']:.3f}")  # fmt: skip
    print(f"  micro-F1 {s_ours['micro_f1']:.3f} vs {s_p90['micro_f1']:.3f}; "
          f"micro precision {s_ours['micro_precision']:.3f} vs {s_p90['micro_precision']:.3f}")  # fmt: skip
    result = {
        "n_train": len(Ytr),
        "n_test": len(Yte),
        "prevalence_train": prevalence,
        "test_unseen_combinations": n_unseen,
        "one_vs_rest": s_ours,
        "powerset": {**s_base, **info},
        "micro_f1_diff_95ci": ci,
        "target_precision_0.9": s_p90,
        "thresholds_max_f1": dict(zip(TAGS, th_f1.tolist(), strict=True)),
        "thresholds_p90": dict(zip(TAGS, th_p90.tolist(), strict=True)),
        "category_accuracy": cat_acc,
        "validation_tags": fitted.attributes[0].metrics if fitted.attributes else None,
        "warnings_p90": fit_p90.attributes[0].warnings if fit_p90.attributes else None,
        "seconds": time.perf_counter() - t00,
    }
    (root / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"total {result['seconds']:.0f}s; {root / 'result.json'}")


def _test_labels(rels: list[str]) -> list[int]:
    labels = read_idx(SRC / "t10k-labels-idx1-ubyte.gz")
    return [int(labels[int(Path(r).stem.split("-")[1])]) for r in rels]


if __name__ == "__main__":
    main()
