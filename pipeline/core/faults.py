"""Fault injection for the crash tests: ``HEADSTART_CRASH_AT=name[:n]`` makes the process that
reaches the point ``name`` for the n-th time (default 1st) SIGKILL itself.

A real kill -9 at a chosen instant, which a timer from outside cannot hit reliably (between
writing a segment and writing the index; inside a DataLoader worker mid-decode). Costs one
environment lookup when unset. No torch here.
"""

from __future__ import annotations

import os
import signal

_CRASH_COUNTS: dict[str, int] = {}


def crash_point(name: str) -> None:
    spec = os.environ.get("HEADSTART_CRASH_AT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
