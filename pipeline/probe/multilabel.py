"""Multi-label heads: one-vs-rest logistic regression over the cached features, a decision
threshold per label chosen on validation, and the metrics that go with them.

* **Model.** One binary logistic regression per label on the features standardised once
  (shared mean and scale), each with scikit-learn's L-BFGS: the labels of a catalog (``vegan``,
  ``refillable``) are not exclusive, so a softmax over them would be wrong, and binary problems
  fitted apart are what scikit-learn's ``OneVsRestClassifier`` does. ``P(label) =
  sigmoid(logit)``; the torch module is the plain ``linear`` head, so export and ONNX need
  nothing new.
* **C.** One C for all labels, chosen on validation by the mean binary log-loss over the labels
  (the single-label head's rule, :mod:`.selection`), on the same log grid, each label's path
  warm-started from the previous C. One shared C and not one per label: a label with a handful
  of validation positives would choose its C on noise.
* **Thresholds.** 0.5 is the right cut only for calibrated probabilities of balanced labels. Per
  label, the threshold maximises validation F1 (``--target-precision P``: the lowest threshold
  whose validation precision reaches P, i.e. the most recall at that precision; a label that
  cannot reach it keeps the threshold of its best precision and is named in a warning). A
  label with no validation positive keeps 0.5. As with the temperature of a single-label head,
  the thresholds come from a probe fitted on the training rows; the final head is refitted on
  training + validation and carries them.
* **Metrics.** Per label: precision, recall, F1 at its threshold, average precision (threshold
  free), support; micro (over every decision) and macro (mean over labels with a positive)
  summaries.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from ..errors import InputError
from .estimators import _LinearHead
from .rows import blas_threads_for, standardisation
from .selection import COARSE_LOG10_C
from .splits import grouped_split, near_duplicate_groups

DEFAULT_THRESHOLD = 0.5  # a label without a validation positive: nothing to choose it on
_EPS = 1e-7


def sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * np.asarray(z, np.float64))), np.float32)


class MultiLabelHead(_LinearHead):
    """One-vs-rest logistic regression (see the module docstring). ``fit(X, Y)`` with ``Y`` the
    0/1 matrix ``[N, L]``; ``logits(X)`` ``[N, L]``; ``predict_proba`` is the sigmoid."""

    torch_kind = "linear"  # exported as nn.Linear; the manifest says to read it with a sigmoid

    def __init__(self, C: float = 1.0, class_weight: str | None = None, max_iter: int = 1000) -> None:
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter

    def fit(self, X: Any, Y: Any) -> MultiLabelHead:
        X = np.asarray(X, np.float32)
        Y = np.asarray(Y, np.uint8)
        self.mean_, self.scale_ = standardisation(X)
        Z = (X - self.mean_) / self.scale_
        self.classes_ = np.arange(Y.shape[1])
        self.n_features_in_ = X.shape[1]
        self.coef_, self.intercept_ = _fit_labels(Z, Y, [self.C], self.class_weight, self.max_iter)[0]
        self.temperature_ = 1.0
        return self

    def predict_proba(self, X: Any) -> np.ndarray:
        return sigmoid(self.logits(X) / self.temperature_)

    def predict(self, X: Any) -> np.ndarray:
        return (self.predict_proba(X) >= DEFAULT_THRESHOLD).astype(np.uint8)


def _fit_labels(
    Z: np.ndarray, Y: np.ndarray, Cs: list[float], class_weight: str | None, max_iter: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(coef ``[L, D]``, intercept ``[L]``) for each C of ``Cs`` (in order: each label's fit
    starts from its solution at the previous C). A label that every row has, or none has, is a
    constant logit (its smoothed rate): there is nothing to separate."""
    n, d = Z.shape
    out = [(np.zeros((Y.shape[1], d), np.float32), np.zeros(Y.shape[1], np.float32)) for _ in Cs]
    with warnings.catch_warnings(), blas_threads_for(Z.size):
        warnings.simplefilter("ignore", ConvergenceWarning)
        for j in range(Y.shape[1]):
            y = Y[:, j]
            pos = int(y.sum())
            if pos in (0, n):
                rate = (pos + 0.5) / (n + 1.0)
                for _, b in out:
                    b[j] = np.log(rate / (1 - rate))
                continue
            lr = LogisticRegression(class_weight=class_weight, max_iter=max_iter, warm_start=True)
            for (w, b), C in zip(out, Cs, strict=True):
                lr.set_params(C=C).fit(Z, y)
                w[j], b[j] = lr.coef_[0], lr.intercept_[0]
    return out


def binary_log_loss(P: np.ndarray, Y: np.ndarray) -> float:
    """Mean over labels and rows of the binary cross-entropy."""
    P = np.clip(np.asarray(P, np.float64), _EPS, 1 - _EPS)
    return float(-np.mean(Y * np.log(P) + (1 - Y) * np.log(1 - P)))


def sweep_c_multilabel(
    X_tr: np.ndarray,
    Y_tr: np.ndarray,
    X_va: np.ndarray,
    Y_va: np.ndarray,
    *,
    class_weight: str | None = None,
    max_iter: int = 1000,
) -> tuple[float, list[dict[str, float]]]:
    """The C of the grid with the lowest mean validation binary log-loss (ties: the smaller C)."""
    Cs = [float(10.0**e) for e in COARSE_LOG10_C]
    mean, scale = standardisation(np.asarray(X_tr, np.float32))
    Z_tr = (np.asarray(X_tr, np.float32) - mean) / scale
    Z_va = (np.asarray(X_va, np.float32) - mean) / scale
    curve = []
    for C, (w, b) in zip(Cs, _fit_labels(Z_tr, Y_tr, Cs, class_weight, max_iter), strict=True):
        curve.append({"C": C, "val_log_loss": binary_log_loss(sigmoid(Z_va @ w.T + b), Y_va)})
    best = min(curve, key=lambda r: (r["val_log_loss"], r["C"]))
    return best["C"], curve


def choose_thresholds(
    P: np.ndarray, Y: np.ndarray, target_precision: float | None = None
) -> tuple[np.ndarray, list[int]]:
    """Per label, the threshold from the validation probabilities ``P`` (module docstring);
    also the labels that could not reach ``target_precision``."""
    thresholds = np.full(P.shape[1], DEFAULT_THRESHOLD, np.float32)
    short = []
    for j in range(P.shape[1]):
        y, p = Y[:, j].astype(bool), P[:, j]
        if not y.any():
            continue
        order = np.argsort(-p, kind="stable")
        ps, ys = p[order], y[order]
        tp = np.cumsum(ys)
        k = np.arange(1, len(ps) + 1)
        # cutting below position i predicts the first i+1 rows; only the last of equal scores is a cut
        last = np.r_[ps[1:] != ps[:-1], True]
        precision, recall = tp / k, tp / y.sum()
        f1 = 2 * precision * recall / np.maximum(precision + recall, _EPS)
        cuts = np.flatnonzero(last)
        if target_precision is None:
            i = cuts[np.argmax(f1[cuts])]
        else:
            ok = cuts[precision[cuts] >= target_precision]
            if len(ok):
                i = ok[-1]  # the most rows predicted (recall) at that precision
            else:
                i = cuts[np.argmax(precision[cuts])]
                short.append(j)
        # halfway to the next lower score, so a slightly different probability keeps its side
        below = ps[i + 1] if i + 1 < len(ps) else 0.0
        thresholds[j] = float((ps[i] + below) / 2)
    return thresholds, short


def multilabel_metrics(Y: np.ndarray, P: np.ndarray, thresholds: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Per-label precision/recall/F1 at ``thresholds``, average precision and support; micro
    and macro summaries (macro over the labels with a positive)."""
    Y = np.asarray(Y, bool)
    pred = np.asarray(P) >= thresholds[None, :]
    per: dict[str, Any] = {}
    for j, name in enumerate(class_names):
        tp = int((pred[:, j] & Y[:, j]).sum())
        fp = int((pred[:, j] & ~Y[:, j]).sum())
        fn = int((~pred[:, j] & Y[:, j]).sum())
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        ap = float(average_precision_score(Y[:, j], P[:, j])) if Y[:, j].any() else None
        per[name] = {
            "precision": p,
            "recall": r,
            "f1": 2 * p * r / (p + r) if p + r else 0.0,
            "average_precision": ap,
            "threshold": float(thresholds[j]),
            "support": int(Y[:, j].sum()),
        }
    tp, fp = int((pred & Y).sum()), int((pred & ~Y).sum())
    fn = int((~pred & Y).sum())
    micro_p = tp / (tp + fp) if tp + fp else 0.0
    micro_r = tp / (tp + fn) if tp + fn else 0.0
    with_pos = [v for v in per.values() if v["support"]]
    return {
        "micro_precision": micro_p,
        "micro_recall": micro_r,
        "micro_f1": 2 * micro_p * micro_r / (micro_p + micro_r) if micro_p + micro_r else 0.0,
        "macro_f1": float(np.mean([v["f1"] for v in with_pos])) if with_pos else 0.0,
        "macro_average_precision": float(np.mean([v["average_precision"] for v in with_pos])) if with_pos else 0.0,
        "exact_match": float((pred == Y).all(1).mean()) if len(Y) else 0.0,
        "n": len(Y),
        "per_label": per,
    }


@dataclass
class MultiLabelFit:
    """What :func:`fit_multilabel` gives: the final head and how it was chosen."""

    head: MultiLabelHead
    thresholds: np.ndarray
    metrics: dict[str, Any]  # on the validation rows, at ``thresholds``
    C: float
    curve: list[dict[str, float]]
    train: np.ndarray
    val: np.ndarray
    groups: np.ndarray  # near-duplicate group per row
    warnings: list[str] = field(default_factory=list)


def fit_multilabel(
    X: np.ndarray,
    Y: np.ndarray,
    names: list[str],
    attribute: str,
    *,
    val_fraction: float,
    seed: int,
    near_duplicate_threshold: float | None,
    C: float | None,
    class_weight: str | None,
    max_iter: int,
    target_precision: float | None,
) -> MultiLabelFit:
    """The module docstring's recipe on rows ``X`` with labels ``Y``: a validation split
    grouped by near duplicate and stratified by each photo's rarest label, C swept (unless
    given), thresholds from the probe fitted on training, the final head refit on all rows."""
    counts = Y.sum(0)
    huge = np.iinfo(np.int64).max
    rarest = np.where(Y.any(1), np.argmin(np.where(Y > 0, counts[None, :], huge), axis=1), len(names))
    groups = near_duplicate_groups(lambda idx: X[idx], rarest, near_duplicate_threshold)
    split = grouped_split(rarest, groups, val_fraction, seed)
    tr, va = split.train, split.val
    if len(va) == 0 or len(tr) == 0:
        raise InputError(f"too few photos for a validation split of {attribute!r}")
    notes = []
    few = [names[j] for j in np.flatnonzero(Y[va].sum(0) == 0)]
    if few:
        notes.append(
            f"{len(few)} label(s) of {attribute!r} have no validation photo ({', '.join(few[:5])}"
            f"{', ...' if len(few) > 5 else ''}): their threshold stays at 0.5 and their metrics are empty"
        )
    curve: list[dict[str, float]] = []
    if C is None:
        C, curve = sweep_c_multilabel(X[tr], Y[tr], X[va], Y[va], class_weight=class_weight, max_iter=max_iter)
    probe = MultiLabelHead(C=C, class_weight=class_weight, max_iter=max_iter).fit(X[tr], Y[tr])
    val_p = probe.predict_proba(X[va])
    thresholds, short = choose_thresholds(val_p, Y[va], target_precision)
    if short:
        notes.append(
            f"{len(short)} label(s) of {attribute!r} cannot reach validation precision {target_precision} at "
            f"any threshold ({', '.join(names[j] for j in short[:5])}): they use the threshold of their best precision"
        )
    metrics = {**multilabel_metrics(Y[va], val_p, thresholds, names), "split": "validation"}
    head = MultiLabelHead(C=C, class_weight=class_weight, max_iter=max_iter).fit(X, Y)
    return MultiLabelFit(head, thresholds, metrics, float(C), curve, tr, va, groups, notes)
