"""Mislabelled photos from out-of-fold probabilities: confident learning (Northcutt et al., 2021).

Input: ``proba[i]``, the probabilities a head that never saw photo ``i`` (nor its near-duplicate
twins) gives it (:mod:`.crossfit`), and ``y[i]``, its given class. Output: which photos are
flagged, the class each is more likely to be, and one score per photo to rank them by.

**Per-class thresholds.** ``t_c`` is the mean probability of class ``c`` over the photos given
``c`` (the head's average self-confidence on that class). A photo *confidently* belongs to
class ``j`` when ``p_j >= t_j``; among several such classes, the most probable one. Thresholds per
class, not one global cut-off, because heads are more confident on some classes than on others
(a bag is easy, a shirt is not).

**How many photos are flagged: the confident joint's count.** ``C[i, j]`` counts the photos
given ``i`` that confidently belong to ``j``; its off-diagonal photos whose top class is not the
given one are the estimated number of label errors, ``n``.

**Which photos: the ``n`` of lowest self-confidence** ``p_given`` (``filter_by="self_confidence"``,
the default; cleanlab's ``filter_by="low_self_confidence"``, whose count is the same). The
ranking (``score = 1 - p_given``) and the flagged set are then one list cut at ``n``. Why this
variant and not cleanlab's default, ``prune_by_noise_rate`` (the *calibrated* joint's count per
off-diagonal cell, photos chosen per cell by margin), nor the off-diagonal photos themselves
(``"off_diagonal"``): measured on Fashion-MNIST photos with 5 % and 10 % of the labels flipped,
at random or between look-alike classes (``bench/audit_label_issues.py``, docs/benchmarks.md
"Audit"), it had the highest F1 of the flagged set in every setting on 1,500 photos (e.g. 0.71
against cleanlab's 0.53 with 5 % random flips), and in three of four on 10,000 (with 10 %
look-alike flips, pruning by noise rate came out 0.01 ahead). Calibration scales each row of the
joint up to the class's photo count, which on a head that is unsure of many honest photos (hard
shirts, Fashion-MNIST's own label errors) inflates the count by about half; and the
off-diagonal set leaves out flipped photos whose true class does not reach its threshold (the
head is unsure what they are, but sure they are not what they are filed as), which
self-confidence ranks near the top. The other two filters are kept for that benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FILTERS = ("self_confidence", "off_diagonal", "prune_by_noise_rate")


@dataclass(frozen=True)
class LabelIssues:
    """Per photo: ``flagged``, ``suggested`` (the confident class, else the top class other
    than the given one), ``score`` (1 - p_given, NaN for photos that could not be scored);
    ``order``: every scored photo, flagged ones first, each part by score (most likely
    mislabelled first)."""

    flagged: np.ndarray
    suggested: np.ndarray
    score: np.ndarray
    order: np.ndarray
    thresholds: np.ndarray
    confident_joint: np.ndarray


def per_class_thresholds(proba: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``t_c`` = mean ``p_c`` over the photos given class ``c`` (1.0 for a class without photos,
    so that nothing is ever confidently a class nobody filed a photo under)."""
    k = proba.shape[1]
    sums = np.zeros(k)
    np.add.at(sums, y, proba[np.arange(len(y)), y])
    counts = np.bincount(y, minlength=k)
    return np.where(counts > 0, sums / np.maximum(counts, 1), 1.0)


def confident_classes(proba: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Per photo: the most probable class among those with ``p_j >= t_j``; -1 if none.
    (The small slack absorbs float rounding: a class whose photos all get the same p reaches
    its own mean.)"""
    above = proba >= thresholds[None, :] - 1e-9
    masked = np.where(above, proba, -1.0)
    best = masked.argmax(1)
    return np.where(above.any(1), best, -1)


def confident_joint(y: np.ndarray, confident: np.ndarray, k: int) -> np.ndarray:
    """``C[i, j]``: photos given ``i`` that confidently belong to ``j``; rows with no confident
    class are left out."""
    m = confident >= 0
    return np.bincount(y[m] * k + confident[m], minlength=k * k).reshape(k, k)


def _calibrated(cj: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The confident joint rescaled so that row ``i`` sums to the photos given ``i`` (cleanlab's
    calibration step), as whole photos, keeping each row's total."""
    rows = cj.sum(1, keepdims=True)
    scaled = np.where(rows > 0, cj / np.maximum(rows, 1) * counts[:, None], 0.0)
    out = np.floor(scaled).astype(np.int64)
    for i in range(len(out)):  # largest remainders first, so each row keeps its total
        short = round(float(scaled[i].sum())) - int(out[i].sum())
        if short > 0:
            out[i, np.argsort(-(scaled[i] - out[i]), kind="stable")[:short]] += 1
    return out


def _prune_by_noise_rate(proba: np.ndarray, y: np.ndarray, cj: np.ndarray) -> np.ndarray:
    k = proba.shape[1]
    counts = np.bincount(y, minlength=k)
    joint = _calibrated(cj, counts)
    flagged = np.zeros(len(y), bool)
    for i in range(k):
        idx = np.flatnonzero(y == i)
        if len(idx) <= 1:
            continue  # keep at least one photo per class, as cleanlab does
        for j in range(k):
            n = int(joint[i, j])
            if j == i or n <= 0:
                continue
            margin = proba[idx, j] - proba[idx, i]
            flagged[idx[np.argsort(-margin, kind="stable")[:n]]] = True
    return flagged


def find_label_issues(
    proba: np.ndarray, y: np.ndarray, *, scored: np.ndarray | None = None, filter_by: str = "self_confidence"
) -> LabelIssues:
    """Confident learning on out-of-fold ``proba`` ``[N, K]`` and given classes ``y`` ``[N]``.

    ``scored`` (bool ``[N]``, default all): the photos whose probabilities are honest (a photo
    of a class with a single photo has no out-of-fold head that knew its class); the others are
    neither flagged nor ranked, and do not enter the thresholds."""
    if filter_by not in FILTERS:
        raise ValueError(f"filter_by must be one of {FILTERS}, not {filter_by!r}")
    proba = np.asarray(proba, np.float64)
    y = np.asarray(y, np.int64)
    n, k = proba.shape
    ok = np.ones(n, bool) if scored is None else np.asarray(scored, bool)
    thresholds = per_class_thresholds(proba[ok], y[ok])
    confident = confident_classes(proba, thresholds)
    cj = confident_joint(y[ok], confident[ok], k)
    top = proba.argmax(1)
    off_diagonal = (confident >= 0) & (confident != y) & (top != y) & ok
    score = np.where(ok, 1.0 - proba[np.arange(n), y], np.nan)
    idx = np.flatnonzero(ok)
    by_score = idx[np.lexsort((idx, -score[idx]))]  # most likely mislabelled first; ties by row
    if filter_by == "self_confidence":
        flagged = np.zeros(n, bool)
        flagged[by_score[: int(off_diagonal.sum())]] = True
    elif filter_by == "off_diagonal":
        flagged = off_diagonal
    else:
        flagged = np.zeros(n, bool)
        flagged[idx] = _prune_by_noise_rate(proba[ok], y[ok], cj)
        flagged &= top != y
    suggested = np.where(confident >= 0, confident, top)
    # A flagged photo's suggestion is never its own class: the top class other than the given.
    others = proba.copy()
    others[np.arange(n), y] = -1.0
    suggested = np.where(suggested == y, others.argmax(1), suggested)
    order = by_score[np.argsort(~flagged[by_score], kind="stable")]  # flagged first
    return LabelIssues(flagged, suggested, score, order, thresholds, cj)


def overlapping_pairs(y: np.ndarray, predicted: np.ndarray, k: int) -> list[tuple[int, int, int, int, float]]:
    """Pairs of classes photos move between out of fold: ``(a, b, a_to_b, b_to_a, share)`` with
    ``share = (a_to_b + b_to_a) / (n_a + n_b)``, most confused first. Two classes a head cannot
    tell apart at all swap about half their photos (share 0.5)."""
    cm = np.bincount(y * k + predicted, minlength=k * k).reshape(k, k)
    counts = cm.sum(1)
    out = []
    for a in range(k):
        for b in range(a + 1, k):
            moved = int(cm[a, b] + cm[b, a])
            if moved:
                out.append((a, b, int(cm[a, b]), int(cm[b, a]), moved / max(1, int(counts[a] + counts[b]))))
    return sorted(out, key=lambda t: (-t[4], t[0], t[1]))
