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
given one are the estimated number of label errors: ``n`` in all, ``n_i`` among the photos
given ``i`` (row ``i`` of the joint, uncalibrated).

**Which photos: lowest self-confidence, cut twice** (``filter_by="both"``, the default). A photo
is flagged when it is among the ``n`` of lowest self-confidence ``p_given`` of the whole catalog
*and* among the ``n_i`` of lowest self-confidence of its own given class. The first cut is
cleanlab's ``filter_by="low_self_confidence"`` (``"self_confidence"`` here); the second is the
paper's *prune by class* (PBC) with the uncalibrated row counts (``"by_class"``). Intersecting two
confident-learning cuts is the paper's ``C+NR`` construction (cleanlab's ``filter_by="both"``
intersects *prune by class* with *prune by noise rate*), applied to the two cuts that rank by
self-confidence. Why each cut alone falls short: the global cut spends the count on the classes
whose honest photos are hard (shirts, pullovers: their self-confidence is low for every photo),
so when errors crowd into a few look-alike classes it flags honest hard photos there while
flipped photos elsewhere are left; the per-class cut fills each class up to its row count even
with photos the head is fairly sure of, which costs precision when errors are spread thinly
(random flips). A photo both cuts agree on is low in its class *and* low overall.

Measured (``bench/audit_label_issues.py``, docs/benchmarks.md "Audit"): Fashion-MNIST photos
with 5 % and 10 % of the labels flipped, at random or only between look-alike classes, 1,500
photos x 5 seeds and 10,000 photos x 6 runs, against cleanlab's default ``prune_by_noise_rate``
(the *calibrated* joint's count per off-diagonal cell, photos chosen per cell by margin) on the
same out-of-fold probabilities. F1 of the flagged set at least cleanlab's in 25 of the 26 runs
and in every setting's mean (the miss: 0.646 against 0.656, 10 % look-alike flips); the global
cut alone, this module's rule before, in 20 of 26 (it lost every 10,000-photo run with 10 %
look-alike flips, by 0.008-0.010); the per-class cut alone also in 25, but 0.03-0.04 below this
rule with random flips. Calibration (scaling each row of the joint up to the class's photo
count) inflates the count by a third to a half on a head that is unsure of many honest photos. The
other filters are kept for that benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FILTERS = ("both", "self_confidence", "by_class", "off_diagonal", "prune_by_noise_rate")


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


def _cut_by_class(
    flagged: np.ndarray, by_score: np.ndarray, y: np.ndarray, off_diagonal: np.ndarray, k: int, *, alone: bool
) -> np.ndarray:
    """Per given class ``i``: its ``n_i`` photos of lowest self-confidence (``by_score`` is every
    scored photo, most likely mislabelled first), at most all but one of the class (cleanlab's
    ``min_examples_per_class=1``). ``alone``: that set; else its intersection with ``flagged``."""
    n_i = np.bincount(y[off_diagonal], minlength=k)
    size = np.bincount(y[by_score], minlength=k)
    ranks = np.zeros(len(y), np.int64)  # rank of each photo within its given class
    for c in range(k):
        members = by_score[y[by_score] == c]
        ranks[members] = np.arange(len(members))
    in_class = np.zeros(len(y), bool)
    in_class[by_score] = ranks[by_score] < np.minimum(n_i, np.maximum(size - 1, 0))[y[by_score]]
    return in_class if alone else flagged & in_class


def find_label_issues(
    proba: np.ndarray, y: np.ndarray, *, scored: np.ndarray | None = None, filter_by: str = "both"
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
    if filter_by in ("both", "self_confidence", "by_class"):
        flagged = np.zeros(n, bool)
        flagged[by_score[: int(off_diagonal.sum())]] = True
        if filter_by != "self_confidence":
            flagged = _cut_by_class(flagged, by_score, y, off_diagonal, k, alone=filter_by == "by_class")
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
