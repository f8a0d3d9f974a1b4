"""Classification metrics shared by fit-head (validation), fine-tuning and evaluate: accuracy,
macro-F1 and per-class precision/recall/F1, and what an unknown threshold answers."""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class numbers. A class with no photos among ``y_true`` has no
    recall or F1 to speak of: it is listed (support 0) but left out of the macro average, and
    named in ``classes_without_photos`` (``macro_f1_classes`` says how many classes it averages)."""
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = [i for i in labels if s[i] > 0]
    macro = f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0) if present else 0.0
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
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
