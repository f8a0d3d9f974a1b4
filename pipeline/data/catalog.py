"""Finding the photos of a catalog: a folder of class folders, a folder of unlabelled photos,
or a CSV manifest -> a :class:`Catalog` of items (absolute file, relative path, label) and the
files skipped with why. Only names; no byte of a photo is read here (``images.py`` decodes).

Bad names are skips, never fatal: a file name that is not UTF-8, a NUL in a manifest, a
broken symlink, a FIFO named ``x.jpg``, an unreadable file.
"""

from __future__ import annotations

import functools
import operator
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import compress, repeat
from operator import attrgetter, methodcaller
from pathlib import Path
from typing import NamedTuple

from ..errors import InputError
from .attributes import label_column
from .manifest import read_manifest

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})


class Item(NamedTuple):
    """One photo. A named tuple, not a frozen dataclass: it is made once per file on every run,
    and a frozen dataclass's ``__init__`` (one ``object.__setattr__`` per field) cost about 1 us
    of the 10-20 us an unchanged re-run spends per file."""

    file: str  # absolute path, as a string: a million Path objects cost seconds per run
    rel: str  # relative to the image root, POSIX separators (what the cache stores)
    label: str | None  # the label column's cell; None = unlabelled
    attributes: tuple[str, ...] = ()  # the other columns' cells ("" = empty), in Catalog.attribute_names order

    @property
    def path(self) -> Path:
        return Path(self.file)


@dataclass(frozen=True)
class Skip:
    rel: str
    reason: str


@dataclass
class Catalog:
    root: Path
    items: list[Item]
    skipped: list[Skip]
    layout: str  # "folders" | "manifest" | "unlabelled" | "files"
    label_column: str = ""  # the manifest column ``label`` holds ("" for folders: the folder name)
    attribute_names: list[str] = field(default_factory=list)  # the other manifest columns (attributes.py)

    @property
    def class_names(self) -> list[str]:
        return sorted({i.label for i in self.items if i.label is not None})


_NAME = attrgetter("name")
_PATH = attrgetter("path")
_IS_DIR = methodcaller("is_dir", follow_symlinks=False)
_IS_FILE = methodcaller("is_file", follow_symlinks=False)  # a plain file, not a symlink to one
_SUFFIXES = tuple(sorted(IMAGE_EXTENSIONS))
_ITEM = functools.partial(tuple.__new__, Item)  # Item from a tuple of its fields, with no Python code


def _walk(folder: Path) -> Iterator[tuple[str, list[os.DirEntry[str]]]]:
    """Every folder under ``folder`` as (its path relative to ``folder``, "" or ending in "/";
    its image files in name order), each folder before its sub-folders (``os.walk``'s order).
    ``scandir`` entries carry the file type from the directory listing, so a plain file costs
    no ``stat`` and no ``pathlib`` object here, and a folder's entries are filtered by C-level
    ``map``/``compress`` over them, with no Python step per file: at 100,000 files a function
    call per name was a sixth of an unchanged re-run."""
    stack: list[tuple[str, str]] = [(os.fspath(folder), "")]
    while stack:
        where, prefix = stack.pop()
        with os.scandir(where) as listing:
            entries = [e for e in listing if e.name[0] != "."]
        entries.sort(key=_NAME)
        is_dir = list(map(_IS_DIR, entries))
        subdirs = list(compress(entries, is_dir)) if any(is_dir) else []
        if subdirs:
            entries = list(compress(entries, map(operator.not_, is_dir)))
        # The last suffix, in any case (names starting with "." are gone: no ".jpg" alone).
        yield prefix, list(compress(entries, map(str.endswith, map(str.lower, map(_NAME, entries)), repeat(_SUFFIXES))))
        stack.extend((d.path, f"{prefix}{d.name}/") for d in reversed(subdirs))


def escape_name(name: str) -> str:
    """``name`` as text that is always valid UTF-8, reversibly: each byte of the file name that
    is not UTF-8 (``os.walk`` hands those over as surrogate escapes) becomes ``\\xNN``, and a NUL
    becomes ``\\x00`` (docs/formats.md says how to get the bytes back)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace").replace("\0", "\\x00")


def _name_problem(text: str) -> str | None:
    """Why ``text`` cannot be stored as a path or label (HDF5, CSV and JSON need UTF-8)."""
    if text.isascii() and "\0" not in text:  # almost every name: no encoding needed to know
        return None
    if "\0" in text:
        return "contains a NUL character"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    return None


def _bad_name(rel: str, what: str, fix: str) -> Skip | None:
    why = _name_problem(rel)
    return None if why is None else Skip(escape_name(rel), f"{what} {why} (shown escaped as \\xNN); {fix}")


def _check_file(path: Path | str, rel: str, entry: os.DirEntry[str] | None = None) -> Skip | None:
    """Why the file at ``path`` cannot be read as a photo, or None. ``entry`` (from a folder
    scan) answers the type questions from the directory listing, without a ``stat``."""
    if entry is not None and not entry.is_symlink():
        regular = entry.is_file(follow_symlinks=False)
    else:
        p = Path(path)
        if p.is_symlink() and not p.exists():
            return Skip(rel, "broken symlink")
        regular = p.is_file()
    if not regular:
        # A FIFO or device named .jpg would block or never end when hashed.
        return Skip(rel, "not a regular file")
    # Readable or not is left to the read (hashing says "permission denied"): an access() per
    # file cost a third of the folder scan, and a file the stat cache knows is never read.
    return None


def discover(source: str | os.PathLike[str], *, labelled: bool | None = None) -> Catalog:
    """Find the images under ``source``.

    * a folder of class folders (``root/口红/a.jpg``) -> labelled by folder name;
    * a folder of images with no sub-folders -> unlabelled;
    * a ``.csv`` manifest with columns ``path,label`` (label may be empty; paths relative to
      the manifest's folder).

    ``labelled=False`` treats a folder tree as unlabelled (for ``predict``).
    """
    src = Path(source)
    if not src.exists():
        raise InputError(f"{src} does not exist; pass a folder of images or a CSV manifest")
    if src.is_file() and src.suffix.lower() == ".csv":
        return _from_manifest(src)
    if not src.is_dir():
        raise InputError(f"{src} is not a folder or a .csv manifest")
    root = src.resolve()
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    items: list[Item] = []
    skipped: list[Skip] = []
    by_folder = bool(subdirs) if labelled is None else labelled
    for prefix, entries in _walk(root):
        # A stray file beside the class folders is unlabelled.
        label = prefix.split("/", 1)[0] if by_folder and prefix else None
        rels = list(map(prefix.__add__, map(_NAME, entries)))
        joined = "\0".join(rels)
        if joined.isascii() and joined.count("\0") == len(rels) - 1 and all(map(_IS_FILE, entries)):
            # Almost every folder: plain files (no symlink: is_file without following says so)
            # with ASCII names. The checks below give the same answer, a file at a time.
            items.extend(map(_ITEM, zip(map(_PATH, entries), rels, repeat(label), repeat(()))))
            continue
        for entry, rel in zip(entries, rels, strict=True):
            bad = _bad_name(rel, "file name", "rename it") or _check_file(entry.path, rel, entry)
            if bad:
                skipped.append(bad)
            else:
                items.append(Item(entry.path, rel, label))
    if not items and not skipped:
        raise InputError(
            f"no images found in {root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "expected class folders such as images/lipstick/*.jpg"
        )
    return Catalog(root, items, skipped, "folders" if by_folder else "unlabelled")


def _from_manifest(manifest: Path) -> Catalog:
    root = manifest.resolve().parent
    rows: list[tuple[str, str, dict[str, str]]] = []  # rel, file, the other columns' cells
    skipped: list[Skip] = []
    for raw, cells in read_manifest(manifest):
        rel = Path(raw).as_posix()
        bad = _bad_name(raw, "path", "fix the manifest")
        if bad is None:
            bad = next(
                (Skip(rel, f"{column} {escape_name(cell)!r} {why}; fix the manifest")
                 for column, cell in cells.items() if (why := _name_problem(cell))),
                None,
            )  # fmt: skip
        if bad is None:
            path = Path(raw) if os.path.isabs(raw) else root / raw
            try:
                found = path.exists() or path.is_symlink()
                bad = _check_file(path, rel) if found else Skip(rel, "file not found")
            except OSError as e:  # a name too long for the filesystem, say
                bad = Skip(rel, f"cannot use this path: {e.strerror or e}")
        if bad:
            skipped.append(bad)
        else:
            rows.append((rel, os.fspath(path), cells))
    if not rows and not skipped:
        raise InputError(f"{manifest} lists no images")
    columns = list(rows[0][2]) if rows else []
    main = label_column(columns, {c: (cells[c] for _, _, cells in rows) for c in columns})
    others = [c for c in columns if c != main]
    items = [
        Item(file, rel, (cells[main] or None) if main else None, tuple(cells[c] for c in others))
        for rel, file, cells in rows
    ]
    return Catalog(root, items, skipped, "manifest", main or "", others)
