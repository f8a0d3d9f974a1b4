"""Re-score the label-issue rules on runs `bench/audit_label_issues.py` already made.

Each run folder holds ``labels.csv`` (the noisy labels; every photo lies under its true class's
folder, so the flipped ones are known) and ``audit/oof.npz`` (the out-of-fold probabilities the
real audit computed). The cross-fit does not depend on the label-issue rule, so a new rule can be
compared with cleanlab on the **same** probabilities without re-running the audits (the 10,000-
photo runs take an hour of extraction and audits on 2 cores). Prints F1 of the flagged set for
ours (the default), its two cuts alone, and cleanlab's default, per run and the runs won.

    python bench/audit_label_rescore.py artifacts/bench/audit10k/*-s?
"""

from __future__ import annotations

import argparse
import csv
import sys
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_label_issues import scores

from pipeline.probe.label_issues import find_label_issues


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path)
    args = ap.parse_args()
    from cleanlab.filter import find_label_issues as cl_find

    won = 0
    for run in args.runs:
        oof = run / "audit" / "oof.npz" if (run / "audit").is_dir() else run / "oof.npz"
        z = np.load(oof, allow_pickle=False)
        names = [str(n) for n in z["class_names"]]
        with open(run / "labels.csv", encoding="utf-8") as f:
            rows = sorted(csv.DictReader(f), key=lambda r: r["path"])  # the cache's row order
        assert len(rows) == len(z["row"]) and (z["row"] == np.arange(len(rows))).all()
        proba, given = z["proba"].astype(np.float64), z["given"].astype(np.int64)
        assert all(names[g] == r["label"] for g, r in zip(given, rows, strict=True))
        is_flipped = np.array([Path(r["path"]).parent.name != r["label"] for r in rows])
        f1 = {}
        for rule in ("both", "self_confidence", "by_class"):
            issues = find_label_issues(proba, given, scored=z["scored"], filter_by=rule)
            f1[rule] = scores(np.argsort(-issues.score, kind="stable"), issues.flagged, is_flipped)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f1["cleanlab"] = scores(np.arange(len(given)), cl_find(labels=given, pred_probs=proba), is_flipped)
        won += f1["both"]["f1"] >= f1["cleanlab"]["f1"]
        print(
            f"{run.name:>20} ({int(is_flipped.sum())} of {len(given)} flipped): F1 ours {f1['both']['f1']:.3f} "
            f"(P {f1['both']['precision']:.3f} R {f1['both']['recall']:.3f}, {f1['both']['flagged']}) | "
            f"self_confidence {f1['self_confidence']['f1']:.3f} by_class {f1['by_class']['f1']:.3f} | "
            f"cleanlab {f1['cleanlab']['f1']:.3f} (P {f1['cleanlab']['precision']:.3f} "
            f"R {f1['cleanlab']['recall']:.3f}, {f1['cleanlab']['flagged']})",
            flush=True,
        )
    print(f"F1 ours >= cleanlab default in {won} of {len(args.runs)} runs")


if __name__ == "__main__":
    main()
