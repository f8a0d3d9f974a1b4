"""Classification metrics shared by fit-head (validation), fine-tuning and evaluate: accuracy,
macro-F1 and per-class precision/recall/F1, and what an unknown threshold answers."""

from __future__ import annotations

from typing import Any

import numpy as np


def _per_class(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> tuple[np.ndarray, ...]:
    """Precision, recall, F1 and support per class, as scikit-learn's
    ``precision_recall_fscore_support(labels=range(k), zero_division=0)`` computes them (the same
    float operations, so the same numbers), without its input validation: that took 10-100 ms per
    call, more than the rest of a fit-head's bookkeeping on a few hundred photos."""
    t = np.asarray(y_true).astype(np.int64, copy=False)
    p = np.asarray(y_pred).astype(np.int64, copy=False)
    t_in, p_in = (t >= 0) & (t < k), (p >= 0) & (p < k)
    tp = np.bincount(t[t_in & p_in & (t == p)], minlength=k).astype(np.float64)
    true_sum = np.bincount(t[t_in], minlength=k).astype(np.float64)
    pred_sum = np.bincount(p[p_in], minlength=k).astype(np.float64)

    def ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
        return np.divide(num, den, out=np.zeros(k), where=den != 0)

    return ratio(tp, pred_sum), ratio(tp, true_sum), ratio(2.0 * tp, true_sum + pred_sum), true_sum.astype(np.int64)


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class numbers. A class with no photos among ``y_true`` has no
    recall or F1 to speak of: it is listed (support 0) but left out of the macro average, and
    named in ``classes_without_photos`` (``macro_f1_classes`` says how many classes it averages)."""
    labels = list(range(len(class_names)))
    p, r, f, s = _per_class(y_true, y_pred, len(class_names))
    present = [i for i in labels if s[i] > 0]
    macro = float(np.mean(f[present])) if present else 0.0
    return {
        "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else 0.0,
        "macro_f1": float(macro),
        "macro_f1_classes": len(present),
        "classes_without_photos": [class_names[i] for i in labels if s[i] == 0],
        "n": len(y_true),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
    }


def at_threshold(proba: np.ndarray, y: np.ndarray, threshold: float) -> dict[str, Any]:
    """Photos whose top probability is below ``threshold`` are answered 'unknown': the share
    still answered (``coverage``) and the accuracy on those (``accuracy_answered``, None when
    nothing is answered)."""
    keep = proba.max(1) >= threshold
    return {
        "threshold": threshold,
        "coverage": float(keep.mean()),
        "n_unknown": int((~keep).sum()),
        "accuracy_answered": float((proba.argmax(1)[keep] == y[keep]).mean()) if keep.any() else None,
        # counting 'unknown' as wrong: what an all-or-nothing reader of the labels gets
        "accuracy_all": float((proba.argmax(1) == y)[keep].sum() / len(y)),
    }
