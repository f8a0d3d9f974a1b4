"""Out-of-fold probabilities: every labelled photo scored by a head that never saw it.

Confident learning (:mod:`.label_issues`) needs, for each photo, the probabilities of a head
trained without that photo - a head that saw it has memorised its label, right or wrong. So the
photos are cut into ``k`` folds and ``k`` heads are fitted, each on the other folds.

**Folds are stratified and grouped by near-duplicate** (the groups of
:func:`.splits.near_duplicate_groups`, the same ones fit-head keeps on one side of its split):
a photo must never be scored by a head that saw its twin, or a mislabelled SKU listed twice
vouches for itself. Per class, groups go largest first to the fold holding fewest photos of
that class, so every fold gets about ``n_c / k`` photos of it and a class of two or more photos
has photos in at least two folds (so every fold's head knows the class). Like
:func:`.splits.grouped_split`, a class whose groups are too big for that (all its photos alike:
uniform photography, the random ``tiny`` backbone) is split ignoring its groups and reported.

**The head** is the one fit-head would fit: the same kind, options and C (the stage chooses C
once with :func:`.selection.sweep_c` on fit-head's validation split, or takes them from a
fitted head). The ``k`` fold heads also score photos outside the folds (the cache's unlabelled
rows): their mean probability, for :func:`.label_next.weighted_kmeans` (what to label next).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import InputError

FOLDS = 5


@dataclass(frozen=True)
class Folds:
    fold: np.ndarray  # fold id per row
    k: int
    ungrouped_classes: tuple[int, ...] = ()


def grouped_folds(y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> Folds:
    """Fold id per row, stratified by class, near-duplicate groups kept whole where possible."""
    if k < 2:
        raise InputError(f"--folds must be at least 2, not {k}")
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(y), np.int64)
    ungrouped: list[int] = []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        order = list(dict.fromkeys(groups[idx].tolist()))  # shuffled group order
        members = {g: idx[groups[idx] == g] for g in order}
        share = -(-len(idx) // k)  # ceil(n_c / k)
        limit = share + share // 2
        fill = np.zeros(k, np.int64)
        ok = True
        for g in sorted(order, key=lambda g: -len(members[g])):  # stable: ties keep the shuffle
            f = int(np.argmin(fill))
            if fill[f] + len(members[g]) > max(limit, 1) or fill[f] + len(members[g]) >= len(idx) > 1:
                ok = False
                break
            fold[members[g]] = f
            fill[f] += len(members[g])
        if not ok:  # plain stratified: rows dealt round-robin from a random fold
            fold[idx] = (np.arange(len(idx)) + int(rng.integers(k))) % k
            ungrouped.append(int(c))
    return Folds(fold, k, tuple(ungrouped))


@dataclass(frozen=True)
class CrossFit:
    """``oof[i]``: the probabilities (``[N, K]``, all classes) the head of photo ``i``'s fold
    gives it; ``scored``: rows whose class was in their fold head's training photos (False only
    for a class of one photo); ``extra``: the fold heads' mean probabilities of the extra rows."""

    oof: np.ndarray
    scored: np.ndarray
    extra: np.ndarray | None


def cross_fit(
    X: Any,
    y: np.ndarray,
    folds: Folds,
    make_head: Callable[[], Any],
    *,
    extra: Any = None,
    progress: Callable[[Iterable[int]], Iterable[int]] = lambda it: it,
) -> CrossFit:
    """Fit ``folds.k`` heads (``make_head()`` gives a fresh unfitted estimator each time) and
    return the out-of-fold probabilities. ``X`` is anything the heads fit on (an array);
    ``extra`` (optional, the same kind) is scored by every fold head."""
    k_classes = int(y.max()) + 1
    oof = np.zeros((len(y), k_classes))
    scored = np.zeros(len(y), bool)
    extra_sum = None if extra is None else np.zeros((int(extra.shape[0]), k_classes))
    for f in progress(range(folds.k)):
        held = np.flatnonzero(folds.fold == f)
        train = np.flatnonzero(folds.fold != f)
        if len(held) == 0:
            continue
        head = make_head().fit(X[train], y[train])
        cols = np.asarray(head.classes_, np.int64)
        oof[np.ix_(held, cols)] = head.predict_proba(X[held])
        scored[held] = np.isin(y[held], cols)
        if extra_sum is not None and len(extra_sum):
            extra_sum[:, cols] += head.predict_proba(extra)
    return CrossFit(oof, scored, None if extra_sum is None else extra_sum / folds.k)
