"""How well `headstart audit` finds flipped labels, next to cleanlab on the same probabilities.

Real photos: Fashion-MNIST (Zalando catalogue photos, the Debian package dataset-fashion-mnist),
``--per-class`` photos of each of the 10 classes from the official train file, extracted once
with EfficientNet-Lite0. Four settings, each from the clean labels:

* ``random 5%`` / ``random 10%``: that share of all photos gets a label drawn at random from the
  other nine classes;
* ``look-alike 5%`` / ``look-alike 10%``: the same number of photos, drawn only from shirt,
  t-shirt_top, pullover and coat, each given another of those four.

Per setting, the noisy labels are written as a manifest and applied to a copy of the cache with
`headstart extract MANIFEST` (labels only: no photo is run through the backbone again), and the
real `headstart audit` runs on it. From its ``oof.npz`` (the out-of-fold probabilities):

* ours: the flagged set of ``label_issues.csv`` (checked to equal the library's answer on
  ``oof.npz``), and the ranking by self-confidence (the order ``label_issues.csv`` lists its
  photos in; it lists only the flagged ones);
* cleanlab 2.x on the **same** probabilities: ``filter.find_label_issues`` (its default,
  ``prune_by_noise_rate``) for the flagged set, ``rank.get_label_quality_scores`` (its default,
  self-confidence) for the ranking; and its ``filter_by="low_self_confidence"`` (the rule ours
  follows) as a check.

Reported: precision and recall of the flipped photos among the top k of each ranking (k = the
number flipped; precision = recall then), and precision, recall and F1 of each flagged set.
Fashion-MNIST has label errors of its own, so some "false positives" are right: the top-ranked
ones are listed for a reader to judge. ``--seeds`` also takes seeds the rule was not chosen on
(it was chosen on 0, 1, 2). Also: the variants (filters, and ranking by margin) that
the docstring of pipeline/probe/label_issues.py compares. Each setting is run with every seed of
``--seeds`` (a different draw of flipped photos; the photos stay the same); means are printed.

    pip install cleanlab       # benchmark only: not a dependency of headstart
    python bench/audit_label_issues.py [--per-class 150] [--seeds 0,1,2] [--settings look-alike-10] [--out DIR]
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_sample_catalog import CLASSES, SRC, pick, read_idx

from pipeline.audit import audit
from pipeline.config import AuditConfig
from pipeline.probe.label_issues import find_label_issues

LOOK_ALIKE = ("shirt", "t-shirt_top", "pullover", "coat")
SETTINGS = (("random", 0.05), ("random", 0.10), ("look-alike", 0.05), ("look-alike", 0.10))


def photos(out: Path, per_class: int, seed: int) -> dict[str, str]:
    """Write the photos (once) and return path -> clean label."""
    images = read_idx(SRC / "train-images-idx3-ubyte.gz")
    labels = read_idx(SRC / "train-labels-idx1-ubyte.gz")
    truth = {}
    for i in pick(labels, per_class, seed + 1000):  # not the bundled catalog's draw
        name = CLASSES[int(labels[i])]
        path = out / name / f"fmnist-train-{i:05d}.png"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(path)
        truth[str(path.resolve())] = name
    return truth


def flip(truth: dict[str, str], kind: str, rate: float, rng: np.random.Generator) -> dict[str, str]:
    paths = sorted(truth)
    n = round(rate * len(paths))
    pool = paths if kind == "random" else [p for p in paths if truth[p] in LOOK_ALIKE]
    choices = CLASSES if kind == "random" else LOOK_ALIKE
    noisy = dict(truth)
    for p in rng.choice(pool, n, replace=False):
        noisy[p] = str(rng.choice([c for c in choices if c != truth[p]]))
    return noisy


def scores(ranked: np.ndarray, flagged: np.ndarray, is_flipped: np.ndarray) -> dict[str, float]:
    k = int(is_flipped.sum())
    hits = is_flipped[ranked[:k]].sum()
    tp = (flagged & is_flipped).sum()
    p = tp / max(1, flagged.sum())
    r = tp / max(1, k)
    return {
        "p_at_k": hits / k,
        "precision": p,
        "recall": r,
        "f1": 2 * p * r / max(1e-12, p + r),
        "flagged": int(flagged.sum()),
    }


def run_setting(base: Path, work: Path, truth: dict[str, str], kind: str, rate: float, seed: int) -> dict:
    from cleanlab.filter import find_label_issues as cl_find
    from cleanlab.rank import get_label_quality_scores

    noisy = flip(truth, kind, rate, np.random.default_rng(seed))
    work.mkdir(parents=True, exist_ok=True)
    manifest = work / "labels.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(sorted(noisy.items()))
    cache = work / "features.h5"
    for suffix in ("", ".segments"):
        src, dst = Path(str(base) + suffix), Path(str(cache) + suffix)
        shutil.rmtree(dst, ignore_errors=True) if dst.is_dir() else dst.unlink(missing_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy)(src, dst)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "extract",
            str(manifest),
            "--out",
            str(cache),
            "--no-progress",
            "--workers",
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "extracted 0," in r.stdout, r.stdout  # labels only: no photo through the backbone again
    t0 = time.perf_counter()
    summary = audit(AuditConfig(cache=str(cache), out=str(work / "audit"), progress=False, device="cpu", examples=0))
    seconds = time.perf_counter() - t0
    z = np.load(work / "audit" / "oof.npz", allow_pickle=False)
    proba, given, names = z["proba"].astype(np.float64), z["given"], [str(n) for n in z["class_names"]]
    from pipeline.cache.store import Cache

    with Cache(cache) as c:
        root, paths = Path(str(c.attrs["image_root"])), c.paths
    row_paths = [str((root / paths[int(i)]).resolve()) for i in z["row"]]
    is_flipped = np.array([noisy[p] != truth[p] for p in row_paths])
    assert all(names[g] == noisy[p] for g, p in zip(given, row_paths, strict=True))

    ours = find_label_issues(proba, given, scored=z["scored"])
    by_score = np.argsort(-ours.score, kind="stable")  # the ranking the CSV's rows follow
    with open(work / "audit" / "label_issues.csv", encoding="utf-8") as f:
        listed = {row["path"] for row in csv.DictReader(f)}
    assert listed == {paths[int(z["row"][i])] for i in np.flatnonzero(ours.flagged)}  # the CSV is the library's answer
    margin = proba[np.arange(len(given)), given] - np.where(np.eye(len(names), dtype=bool)[given], -1, proba).max(1)
    cl_rank = np.argsort(get_label_quality_scores(given, proba), kind="stable")
    out = {
        "setting": f"{kind} {rate:.0%}",
        "n": len(given),
        "flipped": int(is_flipped.sum()),
        "oof_accuracy_vs_noisy": float((proba.argmax(1) == given).mean()),
        "audit_seconds": seconds,
        "ours": scores(by_score, ours.flagged, is_flipped),
        "cleanlab": scores(cl_rank, cl_find(labels=given, pred_probs=proba), is_flipped),
        "cleanlab_low_self_confidence": scores(
            cl_rank, cl_find(labels=given, pred_probs=proba, filter_by="low_self_confidence"), is_flipped
        ),
        "ours_ranked_by_margin": scores(np.argsort(margin, kind="stable"), ours.flagged, is_flipped),
        "label_issues_csv": summary.counts["label_issues"],
    }
    for variant in ("self_confidence", "by_class", "off_diagonal", "prune_by_noise_rate"):
        v = find_label_issues(proba, given, scored=z["scored"], filter_by=variant)
        out[f"ours_{variant}"] = scores(v.order, v.flagged, is_flipped)
    top_fp = [i for i in by_score[: out["flipped"]] if not is_flipped[i]][:5]
    out["top_false_positives"] = [
        {
            "photo": Path(row_paths[i]).name,
            "label": names[given[i]],
            "suggested": names[ours.suggested[i]],
            "p_given": round(float(proba[i, given[i]]), 3),
        }
        for i in top_fp
    ]
    return out


METRICS = (
    "ours",
    "cleanlab",
    "cleanlab_low_self_confidence",
    "ours_self_confidence",
    "ours_by_class",
    "ours_off_diagonal",
    "ours_prune_by_noise_rate",
    "ours_ranked_by_margin",
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--out", default="artifacts/bench/audit")
    ap.add_argument("--settings", default="", help="e.g. look-alike-10,random-5 (default: all four)")
    args = ap.parse_args()
    out = Path(args.out)
    truth = photos(out / "photos", args.per_class, 0)
    wanted = [(k, r) for k, r in SETTINGS if not args.settings or f"{k}-{round(r * 100)}" in args.settings.split(",")]
    base = out / "clean.h5"
    if not base.exists():
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "pipeline", "extract", str(out / "photos"), "--out", str(base), "--no-progress"],
            check=True,
        )
        print(f"extracted {len(truth)} photos in {time.perf_counter() - t0:.0f} s", flush=True)
    results = []
    for kind, rate in wanted:
        runs = []
        for seed in [int(s) for s in args.seeds.split(",")]:
            runs.append(run_setting(base, out / f"{kind}-{round(rate * 100)}-s{seed}", truth, kind, rate, seed))
            results.append(runs[-1])
        m = {name: {key: float(np.mean([r[name][key] for r in runs])) for key in runs[0][name]} for name in METRICS}
        o, c, cs = m["ours"], m["cleanlab"], m["cleanlab_low_self_confidence"]
        acc = np.mean([r["oof_accuracy_vs_noisy"] for r in runs])
        secs = np.mean([r["audit_seconds"] for r in runs])
        print(
            f"{runs[0]['setting']:>15} ({runs[0]['flipped']} of {runs[0]['n']} flipped, {len(runs)} seeds): "
            f"P@k ours {o['p_at_k']:.3f} cleanlab {c['p_at_k']:.3f} | F1 ours {o['f1']:.3f} (P {o['precision']:.3f} "
            f"R {o['recall']:.3f}, {o['flagged']:.0f} flagged), cleanlab {c['f1']:.3f} (P {c['precision']:.3f} "
            f"R {c['recall']:.3f}, {c['flagged']:.0f}), cleanlab low_self_confidence {cs['f1']:.3f} | F1 off_diagonal "
            f"{m['ours_off_diagonal']['f1']:.3f}, self_confidence {m['ours_self_confidence']['f1']:.3f}, by_class "
            f"{m['ours_by_class']['f1']:.3f}, prune_by_noise_rate {m['ours_prune_by_noise_rate']['f1']:.3f}; "
            f"P@k by margin {m['ours_ranked_by_margin']['p_at_k']:.3f} | oof accuracy {acc:.3f}, audit {secs:.1f} s",
            flush=True,
        )
    wins = [r["ours"]["f1"] >= r["cleanlab"]["f1"] for r in results]
    print(f"F1 ours >= cleanlab default in {sum(wins)} of {len(wins)} runs; per run (setting, ours, cleanlab):")
    for r in results:
        print(f"  {r['setting']:>15} {r['ours']['f1']:.3f} {r['cleanlab']['f1']:.3f}")
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    for res in results[:: len(args.seeds.split(","))]:
        print(res["setting"], "top-ranked false positives (first seed):", res["top_false_positives"])


if __name__ == "__main__":
    main()
