"""Atomic file replacement, the one crash-safety primitive the stages share.

Write to a temporary file in the same folder, fsync it, ``os.replace`` it over the target and
fsync the folder: a SIGKILL or power cut at any instant leaves either the old file or the new
one, never a torn file. Files and staging directories get the permissions the umask gives
(``mkstemp``/``mkdtemp`` alone make them 0600/0700: readable by their owner only). No torch here
(``cache.py`` uses it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO


def current_umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_stage_dir(parent: Path, prefix: str) -> Path:
    """A new uniquely named directory in ``parent`` with the permissions ``mkdir`` gives under
    the umask (``tempfile.mkdtemp`` makes 0700, which a serving account cannot read once the
    directory is renamed into place)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    return path


def fsync_dir(d: Path) -> None:
    """Make a rename in ``d`` durable (best effort: some filesystems refuse directory fsync)."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """``with atomic_file(p) as f: f.write(...)`` - ``p`` appears complete or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp makes 0600: give what open() would
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# --------------------------------------------------------------------------- staged directories
# An artifact directory (a head, a model) is written into a staging folder beside its target and
# renamed into place, so the target is the old artifact or the new one, never a mixture. Staging
# folders carry the writer's pid, so the next writer can remove those a killed run left behind.


def stage_dir(out: Path) -> Path:
    """A fresh staging folder for ``out``: ``.NAME.partial-PID-RANDOM`` beside it, with the
    permissions ``mkdir`` gives (stale ones of dead writers are removed first)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(out)
    return make_stage_dir(out.parent, f".{out.name}.partial-{os.getpid()}-")


def remove_stale_stages(out: Path) -> None:
    """``.NAME.partial-PID-*`` and ``.NAME.old-PID-*`` of writers that are gone (kill -9).
    A live writer's folders are left alone."""
    for entry in out.parent.glob(f".{out.name}.*-*"):
        kind, _, rest = entry.name[len(out.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind in ("partial", "old") and entry.is_dir() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process
    return True


def replace_dir(stage: Path, out: Path, *, owned: Collection[str] | None = None) -> None:
    """Move the complete ``stage`` to ``out`` with two renames; the old ``out`` stays whole until
    the new one is in place (and is put back if the second rename fails). With ``owned`` (the
    names the artifact consists of), the old directory's other entries (notes, a report) move
    over to the new one; without it the old directory is deleted whole."""
    for f in stage.iterdir():
        if f.is_file():
            with f.open("rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(stage)
    if not out.exists():
        os.replace(stage, out)
        fsync_dir(out.parent)
        return
    old = make_stage_dir(out.parent, f".{out.name}.old-{os.getpid()}-")
    os.rmdir(old)  # only the unique name is wanted: os.replace needs the target absent or empty
    os.replace(out, old)
    try:
        os.replace(stage, out)
    except BaseException:
        os.replace(old, out)
        raise
    fsync_dir(out.parent)
    if owned is not None:
        for entry in old.iterdir():
            if entry.name not in owned:
                os.replace(entry, out / entry.name)
    shutil.rmtree(old, ignore_errors=True)
