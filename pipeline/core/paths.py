"""The one check of output paths, shared by every command (``--out``, ``--embeddings``).

A command writes either one file (extract's cache, predict's CSV) or one directory (a head, a
model, a report). :func:`check_output` says, before any work starts, when the path given is the
wrong kind (a directory where a file goes, or the reverse), when a component of its parent is a
file, or when nothing can be created there (``/proc/x.h5``, a read-only mount) - instead of a
``FileExistsError`` traceback at the end of a long run.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import InputError

OUTPUT_KINDS = ("file", "dir")


def check_output(raw: str | os.PathLike[str], kind: str, *, option: str = "--out", example: str = "") -> Path:
    """``raw`` as a Path if a ``kind`` ("file" or "dir") can be written there; else InputError.

    ``example`` is a file name suggested when a directory is given for a file."""
    if kind not in OUTPUT_KINDS:
        raise ValueError(f"kind must be one of {OUTPUT_KINDS}, not {kind!r}")
    text = os.fspath(raw)
    path = Path(text)
    hint = f", e.g. {option} {path / example}" if example else ""
    if kind == "file":
        if path.is_dir():
            raise InputError(f"{option} {text} is a directory; {option} takes a file path{hint}")
        if text.endswith(("/", os.sep)):
            raise InputError(f"{option} {text} names a directory; {option} takes a file path{hint}")
    elif path.exists() and not path.is_dir():
        raise InputError(f"{option} {text} is a file; {option} takes a directory (it is created if missing)")
    parent = path.absolute().parent
    existing = parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"{option} {text}: {existing} is a file, not a directory; choose another {option}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise InputError(
            f"{option} {text}: cannot create files in {existing} ({reason}); choose another {option}"
        ) from None
    return path
