"""File identities: the sha256 of a weights or artifact file (memoised per size and mtime, so a
17 MB weights file is hashed once per process), and the blake2b content key of a photo.

Input photos are opened only through :func:`open_regular`, by hashing and by decoding alike: a
FIFO or device put in a photo's place (even after the folder was scanned) is refused instead of
blocking the reader forever."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import stat
from typing import BinaryIO

HASH_HEX_CHARS = 32  # blake2b-128, the cache's content key: fast, and collisions are not a concern at catalog scale
NOT_REGULAR = "not a regular file"


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


def open_regular(path: str | os.PathLike[str]) -> tuple[BinaryIO, os.stat_result]:
    """Open ``path`` for reading only if it is a regular file; return the file and its fstat.

    ``O_NONBLOCK`` makes opening a FIFO return at once instead of waiting for a writer, and the
    check is on the descriptor (``fstat``), not the name, so a file swapped for a FIFO between a
    check and the open cannot slip through. Raises ``OSError`` (``EINVAL``, "not a regular
    file") for FIFOs, devices, sockets and folders."""
    fd, st = _regular_fd(path)
    try:
        # Reads of a regular file never block anyway; clear the flag so no later reader can
        # ever see EAGAIN from this descriptor.
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


def _regular_fd(path: str | os.PathLike[str]) -> tuple[int, os.stat_result]:
    """A descriptor of ``path`` opened without blocking, and its fstat, if it is a regular file
    (else ``OSError`` ``EINVAL``, closed): the one guard of :func:`open_regular` and :func:`hash_file`."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, NOT_REGULAR, os.fspath(path))
        return fd, st
    except BaseException:
        os.close(fd)
        raise


def hash_bytes(data: bytes | bytearray | memoryview) -> str:
    """The cache key of bytes already in memory: the same blake2b-128 hex as :func:`hash_file`."""
    return hashlib.blake2b(data, digest_size=HASH_HEX_CHARS // 2).hexdigest()


def hash_file(path: str | os.PathLike[str]) -> str:
    """The cache key: blake2b-128 of the file's bytes, as 32 hex characters.

    The guard of :func:`open_regular` (a FIFO or device is refused on its descriptor), then
    the bare descriptor: no file object and no blocking-mode switch, since a regular file's
    reads never block. Why: a small photo costs a handful of system calls and nothing else,
    and at a few hundred bytes a file those calls were half of the hashing time."""
    h = hashlib.blake2b(digest_size=HASH_HEX_CHARS // 2)
    fd, _ = _regular_fd(path)
    try:
        while block := os.read(fd, 1 << 20):
            h.update(block)
    finally:
        os.close(fd)
    return h.hexdigest()
