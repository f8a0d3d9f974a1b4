"""Does labelling what `headstart audit` suggests (label_next.csv) beat labelling at random?

Real photos: the Fashion-MNIST photos of ``bench/audit_label_issues.py`` (its ``clean.h5``;
``--per-class`` of each class from the official train file, EfficientNet-Lite0), split once
into a test set (``--test-per-class`` per class) and a pool. Start: 5 labelled photos per
class, drawn at random from the pool; the rest of the pool is unlabelled. Each round labels
``--round`` more photos:

* **suggested**: the cache gets the current labels (`headstart extract MANIFEST`, labels only,
  no photo through the backbone again), the real `headstart audit --budget ROUND` runs, and
  the photos of its ``label_next.csv`` get their true labels;
* **random**: the same number, drawn at random from the unlabelled pool.

After each round both labelled sets train the same head (logistic regression, C swept on a
validation split as fit-head does) and are scored on the test photos. Mean over ``--seeds``.

``--variants`` compares strategies offline, with the library functions on the cached features
(no audit run, so ungrouped folds and the C of a plain sweep): ``wkmeans`` (what label_next.csv
uses: uncertainty-weighted k-means over the 10 x budget most uncertain photos, Zhdanov 2019),
``badge`` (k-means++ on the last layer's gradient embeddings, Ash et al. 2020), ``margin*dist``
(uncertainty-weighted k-center, what label_next.csv used before), ``entropy*dist``, ``dist``
(plain k-center), ``margin`` (uncertainty only) and ``random``; ``--only`` picks some.

    python bench/audit_label_next.py [--rounds 5] [--round 50] [--seeds 0,1,2] [--variants [--only wkmeans,random]]
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.audit import audit
from pipeline.cache.store import Cache
from pipeline.config import AuditConfig
from pipeline.probe import label_next, neighbours
from pipeline.probe.crossfit import cross_fit, grouped_folds
from pipeline.probe.estimators import LogisticHead
from pipeline.probe.selection import sweep_c
from pipeline.probe.splits import grouped_split

VARIANTS = ("badge", "wkmeans", "margin*dist", "entropy*dist", "dist", "margin", "random")


def accuracy(X: np.ndarray, y: np.ndarray, Xt: np.ndarray, yt: np.ndarray) -> float:
    split = grouped_split(y, np.arange(len(y)), 0.2, 0)
    c, _ = sweep_c(X[split.train], y[split.train], X[split.val], y[split.val])
    return float((LogisticHead(C=c).fit(X, y).predict(Xt) == yt).mean())


def suggested(
    base: Path, work: Path, labels: dict[int, str], pool: np.ndarray, paths: list[str], root: Path, n: int
) -> list[int]:
    """The photos label_next.csv names, as base-cache rows. The manifest lists the pool only, so
    the copy's index leaves the test photos out (extract drops rows a manifest does not list)."""
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "labels.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows([str(root / paths[i]), labels.get(int(i), "")] for i in pool)
    cache = work / "features.h5"
    shutil.rmtree(str(cache) + ".segments", ignore_errors=True)
    shutil.copy(base, cache)
    shutil.copytree(str(base) + ".segments", str(cache) + ".segments")
    subprocess.run([sys.executable, "-m", "pipeline", "extract", str(manifest), "--out", str(cache), "--no-progress",
                    "--workers", "0"], check=True, capture_output=True)  # fmt: skip
    audit(AuditConfig(cache=str(cache), out=str(work / "audit"), budget=n, progress=False, device="cpu", examples=0))
    base_row = {str(root / p): i for i, p in enumerate(paths)}  # the manifest's paths are absolute
    with open(work / "audit" / "label_next.csv", encoding="utf-8") as f:
        return [base_row[r["path"]] for r in csv.DictReader(f)]


def offline_pick(X: np.ndarray, U: np.ndarray, y: np.ndarray, labelled: list[int], free: np.ndarray, n: int,
                 variant: str) -> list[int]:  # fmt: skip
    """The ``n`` rows of ``free`` a weighting picks, from out-of-fold heads on ``labelled``."""
    lab = np.array(labelled)
    split = grouped_split(y[lab], np.arange(len(lab)), 0.2, 0)
    c, _ = sweep_c(X[lab][split.train], y[lab][split.train], X[lab][split.val], y[lab][split.val])
    folds = grouped_folds(y[lab], np.arange(len(lab)), 5, 0)
    P = cross_fit(X[lab], y[lab], folds, lambda: LogisticHead(C=c), extra=X[free]).extra
    assert P is not None
    if variant == "badge":
        return free[label_next.badge(U[free], P, n, seed=len(labelled))[0]].tolist()
    if variant == "wkmeans":
        picks = label_next.weighted_kmeans(U[free], label_next.margin_uncertainty(P), n, seed=len(labelled))[0]
        return free[picks].tolist()
    if variant == "margin":
        return free[np.argsort(-label_next.margin_uncertainty(P), kind="stable")[:n]].tolist()
    if variant == "entropy*dist":
        weight = -(P * np.log(P + 1e-12)).sum(1) / np.log(P.shape[1])
    else:
        weight = label_next.margin_uncertainty(P) if variant == "margin*dist" else np.ones(len(free))
    picks, _ = neighbours.label_next(U[free], weight, U, lab, n)
    return free[picks].tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="artifacts/bench/audit/clean.h5", help="from bench/audit_label_issues.py")
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--round", type=int, default=50)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="artifacts/bench/label_next")
    ap.add_argument("--variants", action="store_true", help="compare weightings offline (see the docstring)")
    ap.add_argument("--only", default="", help="with --variants: a comma-separated subset")
    args = ap.parse_args()
    base = Path(args.base)
    with Cache(base) as c:
        X, y_all, names, paths = c.features(), c.labels, c.class_names, c.paths
        root = Path(str(c.attrs["image_root"]))
    U = neighbours.unit(X)
    strategies = (tuple(args.only.split(",")) if args.only else VARIANTS) if args.variants else ("suggested", "random")
    curves: dict[str, list[list[float]]] = {s: [] for s in strategies}
    for seed in [int(s) for s in args.seeds.split(",")]:
        rng = np.random.default_rng(seed)
        test = np.concatenate([rng.choice(np.flatnonzero(y_all == k), args.test_per_class, replace=False)
                               for k in range(len(names))])  # fmt: skip
        pool = np.setdiff1d(np.arange(len(y_all)), test)
        start = np.concatenate([rng.choice(np.intersect1d(pool, np.flatnonzero(y_all == k)), 5, replace=False)
                                for k in range(len(names))])  # fmt: skip
        for strategy in curves:
            labelled = list(start)
            accs = [accuracy(X[labelled], y_all[labelled], X[test], y_all[test])]
            for r in range(args.rounds):
                free = np.setdiff1d(pool, labelled)
                if strategy == "random":
                    labelled += rng.choice(free, args.round, replace=False).tolist()
                elif strategy in VARIANTS:
                    labelled += offline_pick(X, U, y_all, labelled, free, args.round, strategy)
                else:
                    given = {int(i): names[int(y_all[i])] for i in labelled}
                    work = Path(args.out) / f"s{seed}-r{r}"
                    labelled += suggested(base, work, given, pool, paths, root, args.round)
                accs.append(accuracy(X[labelled], y_all[labelled], X[test], y_all[test]))
            curves[strategy].append(accs)
            print(f"seed {seed} {strategy}: " + " ".join(f"{a:.3f}" for a in accs), flush=True)
    n = [10 * 5 + r * args.round for r in range(args.rounds + 1)]
    print("labelled photos:  " + " ".join(f"{k:>6}" for k in n))
    for strategy, runs in curves.items():
        print(f"{strategy:>9} (mean): " + " ".join(f"{a:.3f}" for a in np.mean(runs, 0)))


if __name__ == "__main__":
    main()
