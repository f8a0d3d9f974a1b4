"""``headstart similar IMAGE --cache CACHE.h5 -k 10``: the catalog photos most like IMAGE.

Cosine similarity of cached features ("more like this", duplicate listings). The query is
embedded exactly as the cache's rows were - the backbone, weights and preprocessing come from
the cache's fingerprint - and a query whose bytes are already in the cache uses its cached row
(no backbone at all). The cache is scanned in row chunks, so memory stays one chunk.
"""

from __future__ import annotations

import heapq
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .cache.store import Cache, require_finite
from .errors import InputError

CHUNK_ROWS = 65536


@dataclass
class Match:
    rank: int
    similarity: float
    path: str
    label: str | None
    content_hash: str

    def line(self) -> str:
        return f"{self.rank:>3}  {self.similarity:.4f}  {self.path}" + (f"  ({self.label})" if self.label else "")


def embed_query(image: str | os.PathLike[str], cache: Cache, device: str = "auto") -> np.ndarray:
    """The query's features, computed with the cache's backbone, weights and preprocessing."""
    import torch

    from .core import runtime
    from .data.images import DecodeError, load_pixels
    from .models.engine import make_embedder

    fp = cache.fingerprint
    loaded = fp.load_backbone(
        made=str(cache.path), fix="similarity across different weights is meaningless: use the same weights file"
    )
    dev = runtime.resolve_device(device)
    # The cache's precision when this machine runs it, so the query sits in the same space.
    engine, precision = fp.inference_choice(dev)
    prep = fp.preprocessing
    try:
        pixels = load_pixels(image, prep)
    except DecodeError as e:
        raise InputError(f"{image}: {e}") from None
    embed = make_embedder(loaded.net, prep.crop, engine=engine, device=dev, precision=precision)
    return embed(torch.from_numpy(pixels)[None].to(dev))[0]


def similar(
    image: str | os.PathLike[str],
    cache_path: str | os.PathLike[str],
    k: int = 10,
    device: str = "auto",
    *,
    exclude_self: bool = False,
) -> list[Match]:
    """The ``k`` rows of the cache most like ``image``; ``exclude_self``: leave out rows with the
    same bytes as ``image`` (the query photo itself, and exact copies of it)."""
    from .core.hashing import hash_file

    image = Path(image)
    if image.exists() and not image.is_file():
        raise InputError(f"{image} is not a regular file (a folder, FIFO or device); give one photo")
    if not image.is_file():
        raise InputError(f"{image} does not exist")
    if k < 1:
        raise InputError(f"-k must be at least 1, not {k}")
    with Cache(cache_path) as cache:
        hashes = cache.content_hash
        if cache.n_rows == 0:
            raise InputError(f"{cache_path} has no rows; extract some photos first")
        own = hash_file(image)
        query = cache.features(np.array([hashes.index(own)]))[0] if own in hashes else embed_query(image, cache, device)
        q = query / (np.linalg.norm(query) + 1e-12)
        skip = {i for i, h in enumerate(hashes) if h == own} if exclude_self else set()
        best: list[tuple[float, int]] = []  # min-heap of (similarity, row)
        for start, chunk in cache.iter_features(CHUNK_ROWS):
            sims = (chunk @ q) / (np.linalg.norm(chunk, axis=1) + 1e-12)
            if not np.isfinite(sims).all():
                rows = range(start, start + len(sims))
                require_finite(cache_path, sims, rows, [cache.paths[r] for r in rows])
            for i in skip:
                if start <= i < start + len(sims):
                    sims[i - start] = -np.inf
            top = np.argpartition(-sims, min(k, len(sims)) - 1)[:k]
            for i in top:
                if sims[i] == -np.inf:
                    continue
                item = (float(sims[i]), start + int(i))
                if len(best) < k:
                    heapq.heappush(best, item)
                elif item > best[0]:
                    heapq.heapreplace(best, item)
        paths, labels, names = cache.paths, cache.labels, cache.class_names
    ranked = sorted(best, key=lambda t: (-t[0], t[1]))
    return [
        Match(r + 1, s, paths[i], names[int(labels[i])] if labels[i] >= 0 else None, hashes[i])
        for r, (s, i) in enumerate(ranked)
    ]
