"""File identities: the sha256 of a weights or artifact file (memoised per size and mtime, so a
17 MB weights file is hashed once per process), and the blake2b content key of a photo."""

from __future__ import annotations

import functools
import hashlib
import os

HASH_HEX_CHARS = 32  # blake2b-128, the cache's content key: fast, and collisions are not a concern at catalog scale


@functools.lru_cache(maxsize=16)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: str | os.PathLike[str]) -> str:
    st = os.stat(path)
    return _sha256_cached(str(path), st.st_size, st.st_mtime_ns)


def hash_file(path: str | os.PathLike[str]) -> str:
    """The cache key: blake2b-128 of the file's bytes, as 32 hex characters."""
    h = hashlib.blake2b(digest_size=HASH_HEX_CHARS // 2)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
