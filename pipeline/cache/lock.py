"""One writer per cache: an exclusive ``flock`` on ``CACHE.h5.lock``. No torch here.

The kernel releases a ``flock`` when the last descriptor of its open file goes away, so a killed
writer never leaves a stale lock. A forked child (a DataLoader worker) shares the parent's
descriptors, and would keep the lock alive after a kill -9 of its parent until it notices and
exits - a new writer was refused for about a second, naming the dead pid. So a child closes its
copies of the lock descriptors right after the fork (``os.register_at_fork``): only the process
that took the lock holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import CacheError

_HELD: set[int] = set()  # lock descriptors this process holds


def _close_inherited() -> None:
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_inherited)


@contextlib.contextmanager
def writer_lock(cache_path: Path) -> Iterator[None]:
    """Hold the writer lock of ``cache_path`` for the ``with`` block, or raise CacheError
    naming the process that holds it."""
    lock_path = cache_path.with_name(cache_path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise CacheError(
                f"{cache_path} is being written by {holder}; wait for it to finish "
                "(readers such as fit-head can use the cache meanwhile)"
            ) from None
        _HELD.add(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        _HELD.discard(fd)
        os.close(fd)
