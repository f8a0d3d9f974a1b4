"""Choosing the logistic head's regularisation strength C on a validation split.

As in the CLIP paper's linear-probe protocol (a log-spaced coarse grid, then a finer one around
the best) - with one change: C is chosen by validation *log-loss*, not accuracy. With a few
dozen photos per class, validation accuracy is flat and noisy across C and its ties pick the
most regularised, worst model (measured on the bundled catalog: accuracy selection chose
C=1e-6, 0.777 held-out; log-loss chose C=0.03, 0.843, the same on three split seeds).

On the CPU (``solver="sklearn"``) the grid is fitted as one regularisation path: each C starts
from the nearest one solved, in the training rows' own span when they are fewer than the
features (:mod:`.path`), else with scikit-learn's ``warm_start``. Every C solves
:class:`.estimators.LogisticHead`'s problem; C that could win are solved further
(:data:`LEVELS`). On 300 cached photos the sweep is 7x faster than 13 independent fits and
chooses the same C (docs/benchmarks.md, refit). The torch solver (GPU, or rows streamed from disk) fits each C with its
own :class:`.estimators.LogisticHead`, as before.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_array

from .calibration import softmax
from .estimators import LogisticHead, _class_weights, _encode_targets, _is_lazy
from .path import SKLEARN_GTOL, LogisticPath, RowSpace
from .rows import blas_threads_for, standardisation

COARSE_LOG10_C = np.arange(-6.0, 3.0, 1.0)  # 1e-6 ... 1e2 on standardised features
FINE_OFFSETS = (-0.25, 0.25, -0.5, 0.5)  # nearest first, so each warm start is a quarter-decade away

# How precisely each C's validation log-loss is known, level by level: (the fit's gtol, the
# margin within which two C are too close to rank at the level below). Level 0 is scikit-learn's
# default tolerance: its log-loss is up to 9e-4 off near the best C, so C within 3e-3 of each
# other are re-fitted to 1e-6 (up to 1.2e-5 off), and C within 5e-5 of each other after that
# to 1e-8 (measured on 20 splits of the bundled catalog and digits against tol=1e-10 fits).
LEVELS = ((SKLEARN_GTOL, float("inf")), (1e-6, 3e-3), (1e-8, 5e-5))

# (C, level) -> (classes of the training rows, validation probabilities [n_val, len(classes)])
ValProba = Callable[[float, int], tuple[np.ndarray, np.ndarray]]


def sweep_c(
    X_train: Any,
    y_train: np.ndarray,
    X_val: Any,
    y_val: np.ndarray,
    *,
    class_weight: str | None = None,
    max_iter: int = 1000,
    solver: str = "sklearn",
    device: str = "cpu",
) -> tuple[float, list[dict[str, float]]]:
    """Choose C by validation log-loss (ties -> the stronger regularisation).

    On the path every C is first fitted to scikit-learn's default tolerance, and only C too
    close to the best to rank at that precision are fitted further (:data:`LEVELS`), so the
    choice is the one well-converged fits would make while C far from the best cost what
    scikit-learn's own fits would. The torch solver's independent fits are taken as final."""
    y_train, y_val = np.asarray(y_train), np.asarray(y_val)
    curve: dict[float, tuple[float, float]] = {}  # log10 C -> (log-loss, accuracy)
    level: dict[float, int] = {}  # log10 C -> its fit's level in LEVELS
    labels = np.unique(np.concatenate([y_train, y_val]))
    on_path = solver == "sklearn" and not (_is_lazy(X_train) or _is_lazy(X_val))
    with contextlib.ExitStack() as stack:
        if on_path:  # small matrices: one BLAS thread (rows.py); a LogisticHead fit limits its own
            stack.enter_context(blas_threads_for(int(np.size(X_train))))
            val_proba = _path_proba(X_train, y_train, X_val, class_weight, max_iter)
        else:
            val_proba = _head_proba(X_train, y_train, X_val, class_weight, max_iter, solver, device)

        def score(log_c: float, lvl: int = 0) -> None:
            classes, proba = val_proba(10.0**log_c, lvl)
            proba = proba.astype(np.float64)
            full = np.zeros((len(y_val), len(labels)))
            full[:, np.searchsorted(labels, classes)] = proba / proba.sum(1, keepdims=True)
            accuracy = float(np.mean(classes[proba.argmax(1)] == y_val))
            curve[log_c] = (_log_loss(full, np.searchsorted(labels, y_val)), accuracy)
            level[log_c] = lvl if on_path else len(LEVELS) - 1

        def settle() -> None:
            """Re-fit C that the best cannot be told apart from, until it can, level by level."""
            for lvl, (_, margin) in enumerate(LEVELS[1:], 1):
                while True:
                    b = curve[_best(curve)][0]
                    close = [k for k in curve if curve[k][0] <= b + margin]
                    behind = [k for k in close if level[k] < lvl]
                    if len(close) < 2 or not behind:
                        break
                    for k in behind:
                        score(k, lvl)

        for lc in COARSE_LOG10_C:
            score(round(float(lc), 4))
        settle()
        centre = _best(curve)
        for off in FINE_OFFSETS:
            if round(centre + off, 4) not in curve:
                score(round(centre + off, 4))
        settle()
    table = [{"C": 10.0**k, "val_log_loss": v[0], "val_accuracy": v[1]} for k, v in sorted(curve.items())]
    return 10.0 ** _best(curve), table


def _best(curve: dict[float, tuple[float, float]]) -> float:
    """The log10 C of least validation log-loss (to 6 decimals; ties -> the smaller C)."""
    return min(curve, key=lambda k: (round(curve[k][0], 6), k))


def _log_loss(proba: np.ndarray, y_idx: np.ndarray) -> float:
    """``sklearn.metrics.log_loss`` (probabilities clipped to [eps, 1 - eps]) without its input
    validation, which cost more than a path fit (6 ms a call, measured)."""
    eps = np.finfo(np.float64).eps
    return float(-np.log(np.clip(proba[np.arange(len(y_idx)), y_idx], eps, 1 - eps)).mean())


def _path_proba(X_train: Any, y_train: np.ndarray, X_val: Any, class_weight: str | None, max_iter: int) -> ValProba:
    """Validation probabilities along one warm-started path. The standardisation and class
    weights are :class:`LogisticHead`'s, so each C solves the problem ``LogisticHead(C=...).fit``
    solves: in the training rows' span when they are fewer than the features (:mod:`.path`),
    else with scikit-learn itself, each C started from the nearest one solved (same memory as
    one LogisticHead fit: the float64 copies the row space needs are n x n, not n x d)."""
    X_train = check_array(X_train, dtype=np.float32)
    X_val = check_array(X_val, dtype=np.float32)
    classes, y_idx = _encode_targets(y_train)
    mean, scale = standardisation(X_train)
    if X_train.shape[0] >= X_train.shape[1]:
        return _warm_sklearn_proba(
            (X_train - mean) / scale, y_idx, classes, (X_val - mean) / scale, class_weight, max_iter
        )
    space = RowSpace((X_train.astype(np.float64) - mean) / scale)
    F_val = space.project((X_val.astype(np.float64) - mean) / scale)
    sw = _class_weights(y_idx, len(classes), class_weight)[y_idx]
    path = LogisticPath(space.features, y_idx, len(classes), sw, max_iter=max_iter)

    def proba(C: float, lvl: int) -> tuple[np.ndarray, np.ndarray]:
        fit = path.fit(C, LEVELS[lvl][0])
        return classes, softmax(path.logits(F_val, *fit))

    return proba


def _warm_sklearn_proba(
    Z: np.ndarray, y_idx: np.ndarray, classes: np.ndarray, Z_val: np.ndarray, class_weight: str | None, max_iter: int
) -> ValProba:
    """scikit-learn's ``LogisticRegression(warm_start=True)``, started from the nearest C solved."""
    lr = LogisticRegression(class_weight=class_weight, max_iter=max_iter, warm_start=True)
    solved: dict[float, tuple[np.ndarray, np.ndarray]] = {}

    def proba(C: float, lvl: int) -> tuple[np.ndarray, np.ndarray]:
        log_c = float(np.log10(C))
        if solved:
            lr.coef_, lr.intercept_ = (a.copy() for a in solved[min(solved, key=lambda k: (abs(k - log_c), k))])
        lr.set_params(C=C, tol=LEVELS[lvl][0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr.fit(Z, y_idx)
        solved[log_c] = (lr.coef_.copy(), lr.intercept_.copy())
        return classes, lr.predict_proba(Z_val)

    return proba


def _head_proba(
    X_train: Any, y_train: np.ndarray, X_val: Any, class_weight: str | None, max_iter: int, solver: str, device: str
) -> ValProba:
    """One independent :class:`LogisticHead` fit per C (the torch solver: GPU or streamed rows)."""

    def proba(C: float, lvl: int) -> tuple[np.ndarray, np.ndarray]:
        head = LogisticHead(C=C, class_weight=class_weight, max_iter=max_iter, solver=solver, device=device)
        head.fit(X_train, y_train)
        return head.classes_, head.predict_proba(X_val)

    return proba
