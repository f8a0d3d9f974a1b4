"""Heads: scikit-learn estimators trained on cached features, convertible to torch.

:class:`LogisticHead` standardises features and fits multinomial logistic regression. The
regularisation strength is chosen by :func:`sweep_c` on a validation split, as in the CLIP
paper's linear-probe protocol (a log-spaced coarse grid, then a finer one around the best) -
with one change: C is chosen by validation *log-loss*, not accuracy. With a few dozen photos per
class, validation accuracy is flat and noisy across C and its ties pick the most regularised,
worst model (measured on the bundled catalog: accuracy selection chose C=1e-6, 0.777 held-out;
log-loss chose C=0.03, 0.843, the same on three split seeds).

Every head can give its parameters as plain tensors (:meth:`LogisticHead.torch_state`), so the
exported model and the prediction path never unpickle anything.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_recall_fscore_support
from sklearn.utils.validation import check_is_fitted

COARSE_LOG10_C = np.arange(-6.0, 3.0, 1.0)  # 1e-6 ... 1e2 on standardised features
FINE_OFFSETS = (-0.5, -0.25, 0.25, 0.5)


class LogisticHead(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Standardise, then multinomial logistic regression (L-BFGS)."""

    def __init__(self, C: float = 1.0, class_weight: str | None = None, max_iter: int = 1000) -> None:
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter

    def fit(self, X: np.ndarray, y: np.ndarray) -> LogisticHead:
        X = np.asarray(X, dtype=np.float32)
        self.mean_ = X.mean(0)
        self.scale_ = X.std(0) + 1e-6
        self.lr_ = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            self.lr_.fit((X - self.mean_) / self.scale_, y)
        self.classes_ = self.lr_.classes_
        self.n_features_in_ = X.shape[1]
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return np.asarray(self.lr_.decision_function((np.asarray(X, np.float32) - self.mean_) / self.scale_))

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        return np.asarray(self.lr_.predict_proba((np.asarray(X, np.float32) - self.mean_) / self.scale_))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.classes_[self.predict_proba(X).argmax(1)])

    def linear_params(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` acting on raw features, the standardisation folded in, such that
        ``softmax(x @ W.T + b)`` equals :meth:`predict_proba` (binary problems expanded to
        two symmetric logits)."""
        check_is_fitted(self)
        w = self.lr_.coef_ / self.scale_
        b = self.lr_.intercept_ - w @ self.mean_
        if w.shape[0] == 1:  # binary: sklearn keeps one logit; softmax([-z/2, z/2]) = sigmoid(z)
            w = np.concatenate([-w / 2, w / 2])
            b = np.concatenate([-b / 2, b / 2])
        return w.astype(np.float32), b.astype(np.float32)

    def torch_state(self) -> dict[str, Any]:
        w, b = self.linear_params()
        return {"kind": "linear", "weight": w, "bias": b}


def sweep_c(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    class_weight: str | None = None,
    max_iter: int = 1000,
) -> tuple[float, list[dict[str, float]]]:
    """Choose C by validation log-loss (ties -> the stronger regularisation)."""
    curve: dict[float, tuple[float, float]] = {}  # log10 C -> (log-loss, accuracy)
    labels = np.unique(np.concatenate([y_train, y_val]))

    def score(log_c: float) -> None:
        log_c = round(float(log_c), 4)
        if log_c not in curve:
            head = LogisticHead(C=10.0**log_c, class_weight=class_weight, max_iter=max_iter).fit(X_train, y_train)
            proba = head.predict_proba(X_val).astype(np.float64)
            pred = head.classes_[proba.argmax(1)]
            full = np.zeros((len(y_val), len(labels)))
            full[:, np.searchsorted(labels, head.classes_)] = proba / proba.sum(1, keepdims=True)
            curve[log_c] = (float(log_loss(y_val, full, labels=labels)), float(accuracy_score(y_val, pred)))

    def best() -> float:
        return min(curve, key=lambda k: (round(curve[k][0], 6), k))

    for lc in COARSE_LOG10_C:
        score(lc)
    centre = best()
    for off in FINE_OFFSETS:
        score(centre + off)
    table = [{"C": 10.0**k, "val_log_loss": v[0], "val_accuracy": v[1]} for k, v in sorted(curve.items())]
    return 10.0 ** best(), table


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n": len(y_true),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
    }
