"""Probabilities and their calibration: softmax, temperature scaling (Guo et al., 2017),
expected calibration error and mean log-loss. numpy and scipy only."""

from __future__ import annotations

from typing import Any

import numpy as np


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(1, keepdims=True))


def fit_temperature(logits: np.ndarray, y_idx: np.ndarray) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the validation log-loss of
    ``softmax(logits / T)``. One parameter, so it changes confidence, never the predicted class.

    When every validation photo is already right, the log-loss keeps falling as T -> 0 and says
    nothing about over-confidence (a tiny split would make every probability 1.0): T stays 1."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, np.float64)
    y_idx = np.asarray(y_idx)
    if len(y_idx) == 0 or bool((z.argmax(1) == y_idx).all()):
        return 1.0

    def nll(log_t: float) -> float:
        return mean_log_loss(softmax(z / np.exp(log_t)), y_idx)

    # Wide bounds: the nearest-centroid head treats 1280 correlated features as independent and
    # is overconfident (measured on the bundled catalog: T = 35).
    res = minimize_scalar(nll, bounds=(np.log(1e-2), np.log(1e3)), method="bounded")
    return float(np.exp(res.x))


def calibration_error(proba: np.ndarray, y_idx: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: mean |confidence - accuracy| over equal-width confidence bins,
    weighted by the bins' share of photos."""
    conf = proba.max(1)
    correct = proba.argmax(1) == np.asarray(y_idx)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            err += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(err)


def mean_log_loss(proba: np.ndarray, y_idx: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y_idx)), y_idx], 1e-12, None)).mean())


def calibration_report(
    logits: np.ndarray, y: np.ndarray, temperature: float, threshold: float | None
) -> dict[str, Any]:
    """Validation log-loss and ECE before and after ``temperature``; with an unknown
    ``threshold``, the share of photos it answers and their accuracy (fit-head's record)."""
    before, after = softmax(logits), softmax(logits / temperature)
    out: dict[str, Any] = {
        "val_log_loss_before": mean_log_loss(before, y),
        "val_log_loss_after": mean_log_loss(after, y),
        "val_ece_before": calibration_error(before, y),
        "val_ece_after": calibration_error(after, y),
    }
    if threshold is not None:
        from .metrics import at_threshold

        u = at_threshold(after, y, threshold)
        out["unknown_threshold"] = {
            "threshold": threshold,
            "val_coverage": u["coverage"],
            "val_accuracy_covered": u["accuracy_answered"],
        }
    return out
