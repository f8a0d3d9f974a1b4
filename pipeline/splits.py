"""Honest validation splits: stratified by class and grouped by near-duplicate.

Catalogs hold the same product several times - re-shot, re-cropped, re-compressed. If one copy
lands in training and another in validation, validation measures memory, not generalisation,
and the C sweep and the temperature are tuned on that optimism. Exact copies are already one row
in the cache (rows are keyed by content hash); near copies are found here as rows whose features
have cosine similarity above a threshold, and every connected group goes to one side.

The default threshold, 0.97, is measured (EfficientNet-Lite0, raw features): distinct photos of
one category in the bundled catalog reach at most 0.948 (median nearest neighbour 0.81); the same
photo exported again slightly brighter scores 0.992.

Near duplicates are searched *within each class*: the cost is sum(n_c^2 * D) instead of
N^2 * D (100 classes x 1,000 photos x 1280-d: about 1e10 multiply-adds, seconds), and a photo
filed under two classes is a labelling problem, not a split problem.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import InputError

BLOCK = 4096


def _union_find(n: int) -> tuple[Callable[[int], int], Callable[[int, int], None]]:
    parent = np.arange(n)

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return int(root)

    def union(a: int, b: int) -> None:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)

    return find, union


def near_duplicate_groups(
    features_of: Callable[[np.ndarray], np.ndarray], y: np.ndarray, threshold: float | None
) -> np.ndarray:
    """Group id per row: rows of one class joined (transitively) when cosine > ``threshold``.

    ``features_of(idx)`` returns the features of rows ``idx`` (so a cache can be read one class
    at a time). ``threshold`` None or >= 1 disables the search: every row is its own group."""
    groups = np.arange(len(y))
    if threshold is None or threshold >= 1.0:
        return groups
    for c in np.unique(y[y >= 0]):
        idx = np.flatnonzero(y == c)
        if len(idx) < 2:
            continue
        F = np.asarray(features_of(idx), dtype=np.float32)
        F /= np.linalg.norm(F, axis=1, keepdims=True) + 1e-12
        find, union = _union_find(len(idx))
        for s in range(0, len(idx), BLOCK):
            sim = F[s : s + BLOCK] @ F.T
            a, b = np.nonzero(sim > threshold)
            for i, j in zip(a + s, b, strict=True):
                if i < j:
                    union(int(i), int(j))
        groups[idx] = idx[[find(i) for i in range(len(idx))]]
    return groups


def stratified_group_split(
    y: np.ndarray, groups: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per class: shuffle its groups, move whole groups to validation until it holds about
    ``round(n * fraction)`` rows (at least one group when the class has two or more). Groups
    never straddle. With singleton groups this is exactly the plain stratified split.
    Returns sorted (train_idx, val_idx)."""
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    rng = np.random.default_rng(seed)
    val_mask = np.zeros(len(y), bool)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        rng.shuffle(idx)
        target = 0 if len(idx) < 2 else max(1, round(len(idx) * val_fraction))
        # Group order follows the shuffled rows, so singletons reproduce the plain split.
        order = list(dict.fromkeys(groups[idx].tolist()))
        if len(order) < 2:
            continue  # one group: it cannot be on both sides, keep it for training
        sizes = {g: int(np.sum(groups[idx] == g)) for g in order}
        taken = 0
        for g in order[:-1]:  # leave at least one group for training
            if taken >= target:
                break
            if taken and taken + sizes[g] > target + sizes[g] // 2:
                continue  # a large group would overshoot; try the next
            val_mask[idx[groups[idx] == g]] = True
            taken += sizes[g]
    return np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
