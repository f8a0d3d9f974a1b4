"""Which unlabelled photos to label next: uncertain ones, spread over the catalog.

The two pure strategies both lose somewhere. Pure uncertainty (the lowest margins) picks a batch
of near-identical photos from the one boundary the head is least sure of; pure diversity
(k-center) spends labels on photos the head already classifies well, and on the odd photos at
the pool's edge. The strategies below combine them. ``label_next.csv`` uses
:func:`weighted_kmeans`: in the benchmark (docs/benchmarks.md, "Audit", label next: real
Fashion-MNIST photos, 5 labelled per class at the start, rounds of 50) it reached random
labelling's final accuracy with a third fewer labels, ahead of uncertainty-weighted k-center
(what it replaced), of margin alone, and from 200 labels on of BADGE. Low budgets are where
this matters: the typical photo of an uncertain region teaches the head more than the region's
most uncertain outlier, so one pick per cluster, nearest the centre, beats the top of a ranking.

* :func:`badge` - BADGE (Ash et al., ICLR 2020): k-means++ seeding on the gradient the head's
  last layer would get from each photo, were its predicted class its label. For a linear
  softmax head on features ``x`` that gradient is ``(p - e_top) (x) x``: its length is the
  uncertainty (``|p - e_top|``; ``x`` is unit length), its direction says where in feature
  space and between which classes. k-means++ samples each next pick with probability
  proportional to the squared distance to the nearest pick so far, so it takes uncertain photos
  (long gradients) that are unlike each other (different directions). The gradients are never
  formed (``K x D`` numbers per photo): ``<g_i, g_j> = <a_i, a_j> <x_i, x_j>`` with
  ``a = p - e_top``.
* :func:`weighted_kmeans` - "diverse mini-batch" active learning (Zhdanov, 2019): keep the
  ``beta x budget`` most uncertain photos, cluster them into ``budget`` groups with k-means
  weighted by uncertainty, and label the photo nearest each centre.

Both are seeded (the same cache and seed give the same list).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

BETA = 10  # weighted_kmeans: candidates per pick (Zhdanov's prefilter)
LLOYD_ITERATIONS = 10
LLOYD_BUDGET = 2000  # above it, 2 iterations (each costs candidates x budget x D)


def margin_uncertainty(proba: np.ndarray) -> np.ndarray:
    """``1 - (p1 - p2)``: one minus the margin of the two most probable classes."""
    top2 = -np.sort(-proba, axis=1)[:, :2]
    return 1.0 - (top2[:, 0] - (top2[:, 1] if proba.shape[1] > 1 else 0.0))


def badge(
    U_pool: np.ndarray,
    proba: np.ndarray,
    budget: int,
    *,
    seed: int = 0,
    progress: Callable[[range], range] = lambda r: r,
) -> tuple[np.ndarray, np.ndarray]:
    """(picks, gain): indices into ``U_pool`` (unit feature rows) in pick order, and each pick's
    squared gradient distance to the nearest earlier pick when it was picked (the first: its
    squared gradient length). ``proba``: the head's probabilities of the pool rows."""
    budget = min(budget, len(U_pool))
    if budget <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    X = np.asarray(U_pool, np.float32)
    a = np.asarray(proba, np.float64).copy()
    a[np.arange(len(a)), a.argmax(1)] -= 1.0  # p - e_top
    a = a.astype(np.float32)
    norm2 = (a * a).sum(1).astype(np.float64)  # |g|^2 (x is unit length)
    rng = np.random.default_rng(seed)
    first = int(norm2.argmax())
    picks, gains = [first], [float(norm2[first])]
    nearest = np.maximum(norm2 + norm2[first] - 2.0 * (a @ a[first]) * (X @ X[first]), 0.0)
    for _ in progress(range(1, budget)):
        nearest[picks] = 0.0
        total = float(nearest.sum())
        if total <= 0.0:  # every row is a copy of a pick: fill up with the most uncertain rest
            rest = np.setdiff1d(np.argsort(-norm2, kind="stable"), picks, assume_unique=True)
            picks += rest[: budget - len(picks)].tolist()
            gains += [0.0] * (budget - len(gains))
            break
        i = int(rng.choice(len(nearest), p=nearest / total))
        picks.append(i)
        gains.append(float(nearest[i]))
        d = np.maximum(norm2 + norm2[i] - 2.0 * (a @ a[i]) * (X @ X[i]), 0.0)
        nearest = np.minimum(nearest, d)
    return np.array(picks, np.int64), np.array(gains)


def weighted_kmeans(
    U_pool: np.ndarray,
    uncertainty: np.ndarray,
    budget: int,
    *,
    seed: int = 0,
    beta: int = BETA,
    progress: Callable[[range], range] = lambda r: r,
) -> tuple[np.ndarray, np.ndarray]:
    """(picks, mass): indices into ``U_pool`` (unit feature rows), one per cluster of a
    ``budget``-means clustering of the ``beta x budget`` most uncertain rows weighted by their
    uncertainty: the candidate nearest each centre. ``mass``: the uncertainty its cluster holds
    (the summed weights), the order of the picks (largest first: the photo that stands for the
    most uncertain photos is the most useful label)."""
    budget = min(budget, len(U_pool))
    if budget <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    w = np.asarray(uncertainty, np.float64)
    cand = np.argsort(-w, kind="stable")[: beta * budget]
    X = np.asarray(U_pool[cand], np.float32)
    wc = w[cand] + 1e-12
    rng = np.random.default_rng(seed)
    centres = [int(rng.choice(len(X), p=wc / wc.sum()))]  # weighted k-means++ seeding
    d2 = np.maximum(2.0 - 2.0 * (X @ X[centres[0]]), 0.0).astype(np.float64)
    for _ in progress(range(1, budget)):
        p = wc * d2
        p[centres] = 0.0
        total = float(p.sum())
        # every candidate left is a copy of a centre: take the most uncertain of them
        i = int(rng.choice(len(X), p=p / total)) if total > 0 else next(j for j in range(len(X)) if j not in centres)
        centres.append(i)
        d2 = np.minimum(d2, np.maximum(2.0 - 2.0 * (X @ X[i]), 0.0))
    C = X[centres].copy()
    # Lloyd's iterations cost what the seeding did, each: few where the budget is large.
    for _ in range(LLOYD_ITERATIONS if budget <= LLOYD_BUDGET else 2):
        assign = (X @ C.T).argmax(1)  # unit rows: the nearest centre has the largest dot product
        for c in np.unique(assign):
            m = assign == c
            C[c] = (wc[m, None] * X[m]).sum(0) / wc[m].sum()
    sims = X @ C.T
    assign = sims.argmax(1)
    mass = np.bincount(assign, weights=wc, minlength=budget)
    taken = np.zeros(len(X), bool)
    picks = np.zeros(budget, np.int64)
    for c in np.argsort(-mass, kind="stable"):  # nearest candidate not yet taken to each centre
        best = int(np.argmax(np.where(taken, -np.inf, sims[:, c])))
        taken[best] = True
        picks[c] = best
    order = np.argsort(-mass, kind="stable")
    return cand[picks[order]].astype(np.int64), mass[order]
