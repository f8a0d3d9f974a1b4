"""What ``predict`` reads: image files, folders, glob patterns, lists of paths and stdin,
expanded into one list of files (``expand_inputs``). Only regular files are read: a FIFO named
``x.jpg`` would block the reader for ever. No torch here."""

from __future__ import annotations

import csv
import glob
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from ..errors import InputError
from .catalog import IMAGE_EXTENSIONS

LIST_EXTENSIONS = frozenset({".txt", ".lst", ".csv"})


def expand_inputs(inputs: Sequence[str], stdin: IO[str] | None = None) -> list[Path]:
    """Files as given; folders searched recursively for images (sorted); glob patterns; list
    files (``.txt``/``.lst``: one path a line; ``.csv``: a ``path`` column, else the first)
    with paths relative to the list; ``-``: paths on stdin, as given (relative ones stay relative,
    like a folder's). Only regular files are read: a FIFO in a folder is passed over, and one
    named or listed is an error (reading it would block for ever).

    Listed files that do not exist are kept: they become rows with their error."""
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if raw == "-":
            paths.extend(_read_list(stdin or sys.stdin, Path(), csv_file=False))  # as typed, like folders
        elif p.is_dir():
            paths.extend(_images_under(p))
        elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
            with open(p, encoding="utf-8-sig", newline="") as f:
                paths.extend(_read_list(f, p.parent, csv_file=p.suffix.lower() == ".csv"))
        elif p.is_file() or (p.is_symlink() and not p.exists()):
            paths.append(p)  # a dangling link becomes a row with its error
        elif p.exists():
            raise InputError(f"{p} is not a regular file (a FIFO, socket or device); give image files or folders")
        elif glob.has_magic(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                raise InputError(f"no files match {raw!r}")
            for m in map(Path, matches):
                paths.extend(_images_under(m) if m.is_dir() else [m] if m.is_file() else [])
        else:
            raise InputError(f"{p} does not exist")
    if not paths:
        raise InputError(f"no images found in {', '.join(inputs)}")
    special = [q for q in paths if q.exists() and not q.is_file()]
    if special:
        raise InputError(
            f"{special[0]} is not a regular file (a folder, FIFO, socket or device)"
            + (f", nor {len(special) - 1} more" if len(special) > 1 else "")
            + "; list image files only"
        )
    return paths


def _images_under(folder: Path) -> list[Path]:
    """Regular image files under ``folder``: a FIFO named x.jpg would block the reader for ever."""
    return sorted(
        q
        for q in folder.rglob("*")
        if q.suffix.lower() in IMAGE_EXTENSIONS and not q.name.startswith(".") and q.is_file()
    )


def _read_list(f: IO[str], base: Path, *, csv_file: bool) -> list[Path]:
    if not csv_file:
        lines = (line.strip() for line in f)
        return [base / line for line in lines if line and not line.startswith("#")]
    rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    col, body = (header.index("path"), rows[1:]) if "path" in header else (0, rows)
    return [base / r[col].strip() for r in body if len(r) > col and r[col].strip()]
