"""The category tree on real photos: where the leaf head is unsure, is the roll-up right?

Fashion-MNIST (Zalando catalogue photos, the Debian package dataset-fashion-mnist), its ten
classes under a garment tree::

    tops:        t-shirt_top, shirt, pullover, coat
    one-pieces:  dress
    bottoms:     trouser
    footwear:    sandal, sneaker, ankle_boot
    accessories: bag

``--train-per-class`` photos of each class from the official train file and
``--test-per-class`` held-out photos from the official test file (the loader of
``bench/head_accuracy.py``). The real pipeline: ``extract`` both folders with EfficientNet-Lite0,
``fit-head --classes classes.toml`` (a file with only ``[parents]``), ``evaluate HEAD TEST.h5
--min-confidence T`` for each T of ``--min-confidence``, then ``export`` and
``Predictor.predict(..., min_confidence=T)`` on the unsure photos at the first T.

Reported per T, on the held-out photos: leaf accuracy and parent (level 1) accuracy over all of
them; then on the *unsure* ones (top leaf probability below T): their number, the leaf head's
accuracy on them, the roll-up's coverage (share that get a node at all: the top-level node clears
T) and its accuracy (the node is on the photo's true path), and the leaf head's accuracy on
exactly the photos the roll-up answered. The figures are evaluate's ``metrics.json`` (checked
here to equal a recomputation from the head's probabilities); predict's nodes are checked against
them photo by photo. Exits 1 when, at the first T, the roll-up is not right on the unsure photos
it answers at least ``--margin`` more often than the leaf head is on the same photos.

    python bench/tree_rollup.py [--train-per-class 200] [--test-per-class 200] [--min-confidence 0.5,0.7,0.9]

Needs the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.probe.hierarchy import TreeIndex

GARMENTS = {
    "tops": ("t-shirt_top", "shirt", "pullover", "coat"),
    "one-pieces": ("dress",),
    "bottoms": ("trouser",),
    "footwear": ("sandal", "sneaker", "ankle_boot"),
    "accessories": ("bag",),
}
CLASSES_TOML = "[parents]\n" + "".join(f'"{leaf}" = "{p}"\n' for p, leaves in GARMENTS.items() for leaf in leaves)


def on_unsure(index: TreeIndex, proba: np.ndarray, y: np.ndarray, t: float) -> dict[str, Any]:
    """The roll-up against the leaf head on the photos whose top leaf is below ``t``: the same
    figures as ``tree_metrics``'s ``unsure`` block, plus the leaf head's accuracy on exactly the
    photos the roll-up answered, and the level-1 argmax's on all unsure ones."""
    q = index.node_probabilities(proba)
    unsure = proba.max(1) < t
    nodes = np.array([index.rollup(q[i], t)[0] for i in range(len(y))], np.int64)
    covered = nodes >= 0
    on_path = np.array([n >= 0 and n in index.paths[c] for n, c in zip(nodes, y, strict=True)], bool)
    leaf_right = proba.argmax(1) == y
    top = index.level_groups(0)
    groups = np.unique(top)
    parent_right = groups[np.argmax(q[:, groups], axis=1)] == top[y]
    both = unsure & covered

    def mean(a: np.ndarray, where: np.ndarray) -> float | None:
        return float(a[where].mean()) if where.any() else None

    return {
        "n": int(unsure.sum()),
        "leaf_accuracy": mean(leaf_right, unsure),
        "rollup_coverage": mean(covered, unsure),
        "rollup_accuracy": mean(on_path, both),
        "leaf_accuracy_where_rollup_answers": mean(leaf_right, both),
        "parent_accuracy": mean(parent_right, unsure),
        "nodes": nodes,
    }


def head_probabilities(head: Path, cache: Path) -> tuple[np.ndarray, np.ndarray, list[str], TreeIndex]:
    """What evaluate computes: the head's probabilities on the cached test features."""
    from pipeline.cache.store import Cache
    from pipeline.evaluate import load_scorer
    from pipeline.probe.calibration import softmax

    scorer = load_scorer(head)
    assert scorer.tree is not None, "fit-head dropped the tree"
    with Cache(cache) as c:
        names = c.class_names
        feats, labels, paths = c.features(), c.labels, c.paths
        root = Path(str(c.attrs["image_root"]))
    index = {n: i for i, n in enumerate(scorer.class_names)}
    y = np.array([index[names[k]] for k in labels], np.int64)
    proba = softmax(scorer.logits(feats).astype(np.float64))
    return proba, y, [str(root / p) for p in paths], TreeIndex.build(scorer.tree, scorer.class_names)


def fmt(x: float | None) -> str:
    return "   -  " if x is None else f"{x:6.3f}"


def main() -> None:
    # The stages import torch: here, so tests/test_tree.py imports on_unsure in milliseconds.
    from head_accuracy import write_subset  # the Fashion-MNIST loader the other benches use

    from pipeline.config import EvaluateConfig, ExportConfig, ExtractConfig, FitHeadConfig
    from pipeline.evaluate import evaluate
    from pipeline.export import export
    from pipeline.extract import extract
    from pipeline.fit_head import fit_head
    from pipeline.predict import Predictor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=200)
    ap.add_argument("--min-confidence", default="0.5,0.7,0.9", help="comma-separated thresholds; the first is checked")
    ap.add_argument("--margin", type=float, default=0.3, help="how much more often the roll-up must be right")
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench/tree_rollup"))
    args = ap.parse_args()
    thresholds = [float(t) for t in args.min_confidence.split(",")]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    write_subset(out / "train", "train", args.train_per_class, seed=2)
    write_subset(out / "test", "t10k", args.test_per_class, seed=2)
    for split in ("train", "test"):
        s = extract(ExtractConfig(images=str(out / split), out=str(out / f"{split}.h5"), progress=False))
        print(f"extract: {s.line()}")
    (out / "classes.toml").write_text(CLASSES_TOML, encoding="utf-8")
    s = fit_head(FitHeadConfig(cache=str(out / "train.h5"), out=str(out / "head"), classes=str(out / "classes.toml")))
    print(f"fit-head: {s.line()}")

    proba, y, paths, index = head_probabilities(out / "head", out / "test.h5")
    rows = []
    for t in thresholds:
        e = evaluate(
            EvaluateConfig(model=str(out / "head"), data=str(out / "test.h5"), out=str(out / f"report_{t:g}"),
                           min_confidence=t, progress=False, worst=0)
        )  # fmt: skip
        m = e.metrics["tree"]
        mine = on_unsure(index, proba, y, t)
        # the bench's figures are evaluate's: the same photos, the same probabilities
        assert m["unsure"]["n"] == mine["n"], (m["unsure"], mine["n"])
        for k in ("leaf_accuracy", "rollup_coverage", "rollup_accuracy"):
            a, b = m["unsure"][k], mine[k]
            assert (a is None and b is None) or abs(a - b) < 1e-9, (k, a, b)
        assert abs(m["leaf_accuracy"] - float((proba.argmax(1) == y).mean())) < 1e-9
        rows.append((t, m, mine))

    t, m, mine = rows[0]
    unsure_idx = np.flatnonzero(proba.max(1) < t)
    export(ExportConfig(head=str(out / "head"), out=str(out / "model")))
    predicted = Predictor.load(out / "model").predict([paths[i] for i in unsure_idx], min_confidence=t, workers=0)
    agree = sum(
        (r["node"] or None) == (index.nodes[mine["nodes"][i]] if mine["nodes"][i] >= 0 else None)
        for r, i in zip(predicted, unsure_idx, strict=True)
    )
    predict_right = [
        r["node"] in {index.nodes[j] for j in index.paths[y[i]]}
        for r, i in zip(predicted, unsure_idx, strict=True)
        if r["node"]
    ]

    n = len(y)
    precision = json.loads((out / "head" / "head.json").read_text(encoding="utf-8"))["fingerprint"]["precision"]
    print(
        f"\nFashion-MNIST, garment tree (5 parents over 10 leaves), EfficientNet-Lite0 features, "
        f"{args.train_per_class * 10} train / {n} held-out test photos, features in {precision}"
    )
    print(f"leaf accuracy {m['leaf_accuracy']:.3f}, parent accuracy {m['levels'][0]['accuracy']:.3f} (all {n} photos)")
    print(
        "\n| min-confidence | unsure photos | leaf head right (leaf) | roll-up coverage | roll-up right (parent) "
        "| leaf head right on the same photos | parent argmax right (all unsure) |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for t_, _, u in rows:
        print(
            f"| {t_:g} | {u['n']} ({u['n'] / n:.1%}) | {fmt(u['leaf_accuracy'])} | {fmt(u['rollup_coverage'])} "
            f"| {fmt(u['rollup_accuracy'])} | {fmt(u['leaf_accuracy_where_rollup_answers'])} "
            f"| {fmt(u['parent_accuracy'])} |"
        )
    print("\n| min-confidence | roll-up coverage (all photos) | roll-up right | answered with a leaf | mean depth |")
    print("| --- | --- | --- | --- | --- |")
    for t_, m_, _ in rows:
        r = m_["rollup"]
        print(
            f"| {t_:g} | {fmt(r['coverage'])} | {fmt(r['accuracy'])} | {fmt(r['at_leaf'])} | {fmt(r['mean_depth'])} |"
        )
    print(
        f"\npredict --min-confidence {t:g} on the {len(unsure_idx)} unsure photos (exported model, decoded again): "
        f"node equal to evaluate's roll-up on {agree}; right at its node on "
        f"{sum(predict_right)} of {len(predict_right)} answered"
    )
    print(f"[{time.perf_counter() - t0:.0f}s]")
    result = {
        "train_per_class": args.train_per_class,
        "test_photos": n,
        "leaf_accuracy": m["leaf_accuracy"],
        "levels": m["levels"],
        "rollup": [{"min_confidence": t_, **m_["rollup"]} for t_, m_, _ in rows],
        "unsure": [{"min_confidence": t_, **{k: v for k, v in u.items() if k != "nodes"}} for t_, _, u in rows],
        "predict": {"photos": len(unsure_idx), "node_equal": agree, "answered": len(predict_right),
                    "right": sum(predict_right)},
    }  # fmt: skip
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    first = rows[0][2]
    gap = (first["rollup_accuracy"] or 0.0) - (first["leaf_accuracy_where_rollup_answers"] or 0.0)
    if gap < args.margin:
        sys.exit(f"the roll-up is right only {gap:+.3f} more often than the leaf head on the same photos")


if __name__ == "__main__":
    main()
