"""Geometry of the cached features: near-duplicate clusters, outliers, what to label next.

All three work on L2-normalised features, so a dot product is the cosine similarity.

**Near duplicates** (:func:`near_duplicate_pairs`): every pair of rows with cosine above the
threshold, across classes (a photo filed under two categories is the interesting case here, the
opposite of :mod:`.splits`, which looks within a class). Up to :data:`BRUTE_FORCE_ROWS` rows the
search is exact: the Gram matrix in blocks of :data:`BLOCK` rows (memory: one block, not N^2).
Above it, when FAISS is installed (``pip install '.[faiss]'``), an inverted-file index on a
128-d PCA projection finds each row's :data:`ANN_NEIGHBOURS` nearest rows, and every candidate
pair is then checked on the exact features, so a reported pair is always a true one; what the
index can miss is a pair whose rows it did not put among each other's neighbours (the benchmark
counts them: none missed up to 40,000 rows). Without FAISS the exact search runs at any size,
with a warning of its cost. :data:`BRUTE_FORCE_ROWS` is measured (docs/benchmarks.md, "Audit"):
at 10,000 rows both take about 5 s on 2 cores; above, the exact search grows as N^2 (40,000
rows: 64 s) and the index far slower (8.5 s; 200,000 rows: 24 s).

**Outliers** (:func:`outlier_scores`): a photo far from every category - another product type,
a placeholder, the packaging box. Per class ``c``: its centroid (the mean of its photos' unit
features) and the distribution of its own photos' cosine distance to it, summarised robustly
(median and MAD: an outlier filed under ``c`` must not widen the yardstick that should catch
it). A photo's score is its robust z-score ``(d_c - median_c) / (1.4826 MAD_c)`` to the class it
is *closest to in those units*; it is an outlier when even that is above the threshold, i.e.
when it is further from every class than nearly all of that class's own photos. Why per-class
units, not one distance: some categories are tight (trousers on white), others spread out (bags
of every shape), and a single cut-off either flags half the bags or no trouser. Why centroids,
not nearest neighbours: a cost of ``N x K`` (streams over any cache), and two copies of the
same placeholder image are each other's nearest neighbour but still far from every centroid.
A photo that is mislabelled, not foreign, is close to its true class and so not an outlier: it
is a label issue.

**Label next, k-center** (:func:`label_next`): uncertainty-weighted k-center greedy, what
``label_next.csv`` used before :func:`pipeline.probe.label_next.weighted_kmeans` (kept for
``bench/audit_label_next.py --variants``, which measured the two). Each pick is the
unlabelled row maximising ``uncertainty x distance to the nearest labelled or already picked
row``: uncertain photos first, but never two of the same kind, because a pick makes its
neighbours close to a labelled row. Uncertainty is ``1 - (p1 - p2)`` (one minus the margin of
the two most probable classes under the fold heads' mean probabilities): a photo between two
classes teaches the head more than one it cannot place at all.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from .splits import _union_find

BLOCK = 2048
COLUMNS = 8192  # a block of the Gram matrix: 2048 x 8192 float32 = 64 MB
BRUTE_FORCE_ROWS = 10_000  # measured: docs/benchmarks.md, "Audit" (both about 5 s there)
ANN_NEIGHBOURS = 16  # candidates per row, each checked exactly
ANN_DIMS = 128
ANN_PROBES = 8
MAD_SCALE = 1.4826  # MAD -> standard deviation for a normal distribution
DIVERSITY_ROWS = 20_000  # labelled rows kept as k-center starting points (a random sample above)


def unit(F: np.ndarray) -> np.ndarray:
    F = np.asarray(F, np.float32)
    return F / (np.linalg.norm(F, axis=1, keepdims=True) + 1e-12)


# --------------------------------------------------------------------------- near duplicates


def _exact_pairs(U: np.ndarray, threshold: float) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    for s in range(0, len(U), BLOCK):
        rows = np.asarray(U[s : s + BLOCK], np.float32)
        for t in range(s, len(U), COLUMNS):  # the upper triangle only: memory one block
            sim = rows @ np.asarray(U[t : t + COLUMNS], np.float32).T
            a, b = np.nonzero(sim > threshold)
            keep = a + s < b + t
            a, b = a[keep], b[keep]
            yield a + s, b + t, sim[a, b]


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _ann_pairs(U: np.ndarray, threshold: float, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Candidates from FAISS on a PCA projection, each checked on the exact features.

    Projection only shrinks distances, so a near copy stays among a row's nearest rows in the
    :data:`ANN_DIMS`-d space, and the projected distance bounds the cosine (below); the index
    (IVF, ``nlist = 4 sqrt(N)`` as FAISS advises, trained on a sample) then costs a tenth of the
    full-width search, and memory is ``N x ANN_DIMS`` floats."""
    import faiss

    n, d = U.shape
    rng = np.random.default_rng(seed)
    sample = np.asarray(U[np.sort(rng.choice(n, size=min(n, 20_000), replace=False))], np.float32)
    mean = sample.mean(0)
    centred = sample - mean
    # The covariance's eigenvectors, one LAPACK thread: threaded LAPACK on a busy 2-core machine
    # spins (measured: eigh of 1280 x 1280 in 25 s on two threads, 4.8 s on one; an SVD of the
    # sample itself 34 s).
    with threadpool_limits(limits=1):
        _, vecs = np.linalg.eigh((centred.T @ centred).astype(np.float64))
    proj = np.ascontiguousarray(vecs[:, ::-1][:, : min(ANN_DIMS, d)], np.float32)
    P = np.concatenate([(np.asarray(U[s : s + 65536], np.float32) - mean) @ proj for s in range(0, n, 65536)])
    nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))  # FAISS wants >= 39 training rows per list
    index = faiss.IndexIVFFlat(faiss.IndexFlatL2(P.shape[1]), P.shape[1], nlist, faiss.METRIC_L2)
    index.train(P[np.sort(rng.choice(n, size=min(n, 64 * nlist), replace=False))])
    index.add(P)
    index.nprobe = ANN_PROBES
    # |P_a - P_b|^2 <= |U_a - U_b|^2 = 2 - 2 cos: a pair further apart than 2 (1 - threshold) in
    # the projection cannot be above the threshold, so only the others are checked exactly.
    bound = 2.0 * (1.0 - threshold) + 1e-4
    for s in range(0, n, 16384):
        dist, nbrs = index.search(P[s : s + 16384], ANN_NEIGHBOURS + 1)
        # each pair once (b > a), and not the -1 FAISS pads with
        a, j = np.nonzero((nbrs > np.arange(s, s + len(nbrs))[:, None]) & (dist < bound))
        a, b = a + s, nbrs[a, j]
        exact = np.einsum("ij,ij->i", np.asarray(U[a], np.float32), np.asarray(U[b], np.float32))
        keep = exact > threshold
        yield a[keep], b[keep], exact[keep]


def near_duplicate_pairs(
    U: np.ndarray, threshold: float, *, method: str = "auto", seed: int = 0
) -> tuple[np.ndarray, str]:
    """``[P, 3]`` rows ``(i, j, cosine)`` with ``i < j`` and cosine > ``threshold``, and the
    method used (``exact`` or ``faiss``). ``U``: unit features ``[N, D]``."""
    n = len(U)
    if method == "auto":
        method = "exact"
        if n > BRUTE_FORCE_ROWS:
            if faiss_available():
                method = "faiss"
            else:
                warnings.warn(
                    f"{n} rows: the exact near-duplicate search costs N^2 (about {n * n / 2.5e7:.0f} s on 2 cores); "
                    "pip install '.[faiss]' for an approximate index that takes minutes",
                    stacklevel=2,
                )
    parts = list(_ann_pairs(U, threshold, seed) if method == "faiss" else _exact_pairs(U, threshold))
    if not parts:
        return np.zeros((0, 3)), method
    a = np.concatenate([p[0] for p in parts])
    b = np.concatenate([p[1] for p in parts])
    s = np.concatenate([p[2] for p in parts])
    return np.stack([a, b, s], 1) if len(a) else np.zeros((0, 3)), method


def clusters(n: int, pairs: np.ndarray) -> list[np.ndarray]:
    """Connected groups (two or more rows) of the pair graph, largest first."""
    find, union = _union_find(n)
    for i, j in pairs[:, :2].astype(np.int64).tolist():
        union(i, j)
    members: dict[int, list[int]] = {}
    for i in np.unique(pairs[:, :2].astype(np.int64)).tolist():
        members.setdefault(find(i), []).append(i)
    out = [np.array(sorted(m)) for m in members.values() if len(m) > 1]
    return sorted(out, key=lambda m: (-len(m), int(m[0])))


# --------------------------------------------------------------------------- outliers


@dataclass(frozen=True)
class ClassGeometry:
    centroids: np.ndarray  # [K, D] unit
    median: np.ndarray  # [K] median cosine distance of the class's photos to its centroid
    scale: np.ndarray  # [K] 1.4826 * MAD of those distances


def class_geometry(U: np.ndarray, rows: np.ndarray, y: np.ndarray, k: int) -> ClassGeometry:
    """Centroids and in-class distance scales of the labelled rows ``rows`` of ``U`` (class
    ``y``); ``U`` may be float16 (a class at a time is read as float32)."""
    d = U.shape[1]
    centroids = np.zeros((k, d), np.float32)
    median, scale = np.zeros(k), np.ones(k)
    for c in range(k):
        members = np.asarray(U[rows[y == c]], np.float32)
        if not len(members):
            continue
        centroids[c] = unit(members.mean(0, keepdims=True))[0]
        dist = 1.0 - members @ centroids[c]
        median[c] = np.median(dist)
        # A floor for classes of one photo or identical photos (MAD 0): a hundredth of a cosine.
        scale[c] = max(MAD_SCALE * np.median(np.abs(dist - median[c])), 0.01)
    return ClassGeometry(centroids, median, scale)


def outlier_scores(U: np.ndarray, geometry: ClassGeometry) -> tuple[np.ndarray, np.ndarray]:
    """(score, nearest class) per row: the robust z-score of its distance to the class it is
    closest to in per-class units. Rows are processed in blocks: any number of rows."""
    scores, nearest = np.empty(len(U)), np.empty(len(U), np.int64)
    for s in range(0, len(U), 65536):
        dist = 1.0 - np.asarray(U[s : s + 65536], np.float32) @ geometry.centroids.T
        z = (dist - geometry.median) / geometry.scale
        nearest[s : s + len(z)] = z.argmin(1)
        scores[s : s + len(z)] = z.min(1)
    return scores, nearest


# --------------------------------------------------------------------------- label next


def label_next(
    U_pool: np.ndarray,
    uncertainty: np.ndarray,
    U: np.ndarray,
    labelled: np.ndarray,
    budget: int,
    *,
    seed: int = 0,
    progress: Callable[[range], range] = lambda r: r,
) -> tuple[np.ndarray, np.ndarray]:
    """(picks, gain): indices into ``U_pool`` in pick order, and each pick's
    ``uncertainty x distance`` when it was picked. Starting points: the rows ``labelled`` of
    ``U`` (a random :data:`DIVERSITY_ROWS` of them above that many)."""
    budget = min(budget, len(U_pool))
    if budget <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    if len(labelled) > DIVERSITY_ROWS:
        labelled = np.sort(np.random.default_rng(seed).choice(labelled, DIVERSITY_ROWS, replace=False))
    U_pool = np.asarray(U_pool, np.float32)
    nearest = np.full(len(U_pool), 2.0)  # cosine distance to the nearest centre (2 = none yet)
    for s in range(0, len(labelled), BLOCK):
        centres = np.asarray(U[labelled[s : s + BLOCK]], np.float32)
        nearest = np.minimum(nearest, (1.0 - U_pool @ centres.T).min(1))
    nearest = np.maximum(nearest, 0.0)
    weight = np.asarray(uncertainty, np.float64)
    picks: list[int] = []
    gains: list[float] = []
    for _ in progress(range(budget)):
        gain = weight * nearest
        gain[picks] = -1.0
        i = int(gain.argmax())
        picks.append(i)
        gains.append(float(gain[i]))
        nearest = np.minimum(nearest, np.maximum(1.0 - U_pool @ U_pool[i], 0.0))
    return np.array(picks, np.int64), np.array(gains)
