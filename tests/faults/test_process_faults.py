"""Faults of processes rather than files (issue 18, items 7 and 8): a writer killed while its
forked children live on, a decoding worker killed mid-run, full disks and file-size limits in
the commands that write, read-only output folders."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cache.store import writer_lock

HOLD_AND_FORK = """
import multiprocessing as mp, sys, time
from pathlib import Path
from pipeline.cache.store import writer_lock

def child():
    time.sleep(60)  # like a DataLoader worker that has not noticed its parent died yet

with writer_lock(Path(sys.argv[1])):
    p = mp.get_context("fork").Process(target=child)
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
"""


def test_a_killed_writers_forked_children_do_not_keep_its_lock(tmp_path):
    out = tmp_path / "f.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child is still alive ...
        with writer_lock(out):  # ... and the lock is free at once
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        with pytest.raises(ChildProcessError):
            os.waitpid(child, 0)  # not our child: reaped by init; just make sure it is gone
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
            time.sleep(0.05)
