"""The HDF5 feature cache: schema, segments, atomic index writer, lock, reader. No torch here.

Layout (schema v2). ``CACHE.h5`` is a small *index*; the feature rows live in immutable
*segment* files beside it, in ``CACHE.h5.segments/``::

    features.h5                     the index (what users and other tools open)
    features.h5.segments/seg-*.h5   feature rows, each file written once and never changed
    features.h5.lock                the writer lock

The index's ``/features`` is an HDF5 *virtual dataset* that maps ranges of the segments'
``/features``, with source paths relative to the index's folder, so plain h5py reads it as one
``[N, D]`` dataset from any working directory and after the folder is moved or copied.
:class:`Cache` itself reads the rows from the segments, by ``/location`` (:mod:`.reader`: memory
flat in N, where the virtual dataset keeps every source it has read open with its chunk cache).

Why segments instead of appending to one file: HDF5 is not crash-safe (a process killed while
h5py writes can leave the file's metadata half-flushed and the whole file unreadable), and
rewriting one file per commit costs the whole catalog. A segment is written to a temporary
name, fsynced and renamed into place: from that moment it is durable. The index is replaced the
same way. A run killed before its index was written leaves finished segments that are not in
the index; the next run (same fingerprint, under the lock) adopts their rows instead of
extracting them again. So a kill at any instant leaves the old index intact plus whole
segments. Segments are written with HDF5's Fletcher-32 chunk filter: a flipped byte is an error
on read, not a plausible number.

Index datasets (names are a public contract; other tools read them):

=====================  ================================================================
``/features``          float16 or float32 ``[N, D]``: virtual, mapped onto the segments
``/content_hash``      ``S32`` ``[N]``: blake2b-128 hex of the file's bytes - the row key
``/paths``             UTF-8 ``[N]``: one path (relative to the image root) per row
``/labels``            int32 ``[N]``: index into ``/class_names``, -1 = unlabelled
``/class_names``       UTF-8 ``[C]`` (sorted; may be Chinese, e.g. 口红)
``/attributes/<col>/*`` a manifest's other label columns (``data/attributes.py``): ``labels``
                       int32 ``[N]`` into ``class_names``, the column's distinct cells as
                       written (-1 = empty cell); the group's ``columns`` attr lists them in
                       order. Absent for class folders. Attr ``label_column`` names the
                       column ``/labels`` holds.
``/duplicates/path``   UTF-8: further files with the same bytes as a row ...
``/duplicates/content_hash``  ... and that row's key (identical files are extracted once)
``/skipped/path``      UTF-8: files that could not be used ...
``/skipped/reason``    ... and why
``/rejected/*``        ``content_hash``, ``reason``, ``limits``: content that gave no row,
                       remembered so an unchanged broken file is not decoded again under the
                       same decode limits
``/segments/name``     UTF-8 ``[S]``: segment files (in ``CACHE.h5.segments/``) the rows use
``/segments/rows``     int64 ``[S]``: rows in each segment file (live or not)
``/location/segment``  int32 ``[N]``: each row's segment (index into ``/segments/name``) ...
``/location/row``      int64 ``[N]``: ... and its row in that segment
``/stat/*``            the stat cache: ``path`` (relative), ``size``, ``mtime_ns``, ``inode``,
                       ``device``, ``content_hash`` of every file hashed by the last run
attrs                  fingerprint (backbone, weights, weights_sha256, preprocessing JSON,
                       precision, feature_dim), dtype, n_rows, schema_version, versions,
                       created/updated, image_root, config JSON
=====================  ================================================================

A segment file holds ``/features`` (chunked, Fletcher-32), ``/content_hash``,
``/skipped/content_hash`` + ``/skipped/reason`` (content that gave no row) and the fingerprint
attributes. Schema v1 (one file holding ``/features`` itself, release 0.1.0) is read as is and
converted by :func:`migrate_v1` on the next extract.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import BackboneError, CacheError, InputError
from ..models.fingerprint import Fingerprint
from . import validation
from .h5io import CONFLICT, SCHEMA_VERSION, Column, StatTable, _decode, crash_point, segment_dir
from .lock import writer_lock
from .reader import SegmentFiles, locate, read_into

__all__ = ["SCHEMA_VERSION", "Cache", "CacheContents", "crash_point", "segment_dir", "writer_lock"]


# --------------------------------------------------------------------------- reader


@dataclass
class CacheContents:
    """Everything a cache holds, in memory (the reader's full output)."""

    features: np.ndarray
    content_hash: list[str]
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    attrs: dict[str, Any]
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, content_hash)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


class Cache:
    """Read-only view of a cache (schema v1 or v2). Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str], *, check: bool = True, features: bool = True) -> None:
        """Open and check the layout (:mod:`.validation`: metadata only, O(1) in the rows): a
        damaged or hand-made file is one CacheError here, whichever reader opened it. With
        ``check=False`` (``cache verify``) layout problems are listed in :attr:`problems`
        instead; a file that is not a readable headstart cache is refused either way.
        ``features=False``: for metadata only (compaction): the features cannot be read.
        ``/features`` is opened only for its shape and dtype, never held: HDF5 keeps every
        mapping of an open virtual dataset in memory (about 6.5 KB each: 700 MB for an index
        written before one mapping per segment, fragmented by scattered deletions at 1M rows)
        and every source file it has read from open, with its chunk cache. The rows are read
        from the segments (:mod:`.reader`)."""
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(_not_a_file(self.path))
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheError(f"{self.path} is not a readable HDF5 feature cache ({e})") from None
        try:
            try:
                self.schema_version = validation.schema_version(self.path, self._f)
                layout = validation.layout_problems(self._f, self.schema_version)
            except validation.BadSchema as e:
                if check:
                    raise
                self.schema_version, layout = 0, [e.problem]
            self.problems = validation.attribute_problems(self._f) + layout
            self.readable = not layout  # attribute problems alone leave the datasets usable
            if check and self.problems:
                raise CacheError(validation.damaged(self.path, self.problems))
            if self.schema_version >= 2 and self.readable:
                # A virtual dataset reads a missing source file as zeros, silently: check first.
                folder = segment_dir(self.path)
                missing = [s for s in self.segments if not (folder / s).is_file()]
                if missing:
                    raise CacheError(
                        f"{self.path} names {len(missing)} segment file(s) missing from {folder}/, e.g. "
                        f"{missing[0]}; copy or move the whole folder ({self.path.name} and {folder.name}/ "
                        "together), or extract again with --rebuild"
                    )
        except BaseException:
            self._f.close()
            raise
        # Unusable only for check=False on a file whose /features is not a dataset (verify reports
        # it and reads nothing).
        ds = self._f.get("features")
        usable = isinstance(ds, h5py.Dataset)
        self._shape: tuple[int, ...] = tuple(ds.shape) if usable else ()
        self._dtype = str(ds.dtype) if usable else ""
        del ds  # closes it (the only reference)
        self._features = features and usable
        self._files: SegmentFiles | None = None
        if self._features and self.schema_version >= 2:
            self._files = SegmentFiles(self.path, segment_dir(self.path), self.segments)

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._files is not None:
            self._files.close()
        self._f.close()

    @property
    def attrs(self) -> dict[str, Any]:
        return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in self._f.attrs.items()}

    @property
    def fingerprint(self) -> Fingerprint:
        try:
            return Fingerprint.from_record(self.attrs, source=f"the fingerprint attributes of {self.path}")
        except BackboneError as e:
            raise CacheError(
                f"{e}; run `headstart cache verify {self.path}`, or extract again with --rebuild"
            ) from None

    @property
    def n_rows(self) -> int:
        return int(self._shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self._shape[1])

    @property
    def dtype(self) -> str:
        return self._dtype

    @property
    def class_names(self) -> list[str]:
        return _decode(self._f["class_names"])

    @property
    def paths(self) -> list[str]:
        return _decode(self._f["paths"])

    @property
    def content_hash(self) -> list[str]:
        return _decode(self._f["content_hash"])

    def stored(self, name: str) -> np.ndarray:
        """The per-row dataset ``name`` (``content_hash``, ``paths``) as stored, strings as bytes:
        for a reader that may never need them as ``str``, or writes them back as they are."""
        return self._f[name][()]

    @property
    def labels(self) -> np.ndarray:
        """Per row: index into :attr:`class_names`, -1 = unlabelled (checked: see :meth:`read_labels`)."""
        return self.read_labels()

    def read_labels(self, *, check: bool = True) -> np.ndarray:
        """The labels; a value outside -1 .. classes-1 is a CacheError unless ``check=False``
        (``cache verify`` counts them). Checked here, where they are read anyway, rather than at
        open: they are per-row data, and opening stays O(1)."""
        labels = np.asarray(self._f["labels"][()], dtype=np.int64)
        if check:
            validation.check_labels(self.path, labels, int(self._f["class_names"].shape[0]))
        return labels

    @property
    def label_column(self) -> str:
        """The name of the column ``/labels`` holds: the manifest's, or ``label`` for class
        folders and caches from before attributes."""
        return str(self._f.attrs.get("label_column") or "label")

    @property
    def attribute_names(self) -> list[str]:
        """The manifest's other label columns (``/attributes``), in its order; [] for most caches."""
        g = self._f.get("attributes")
        return list(json.loads(g.attrs["columns"])) if g is not None else []

    def attribute(self, name: str) -> Column:
        """The column ``name``: its cells (``values``) and, per row, the index of its cell
        (-1 = empty), range-checked like :attr:`labels`."""
        if name not in self.attribute_names:
            raise KeyError(name)
        g = self._f["attributes"][name]
        labels = np.asarray(g["labels"][()], dtype=np.int64)
        validation.check_labels(self.path, labels, int(g["class_names"].shape[0]), f"/attributes/{name}", CONFLICT)
        return Column(labels, _decode(g["class_names"]))

    def columns(self) -> dict[str, Column]:
        """Every label column by name: :attr:`label_column` (``/labels``) first, then the
        attributes in the manifest's order. What fit-head, audit, evaluate and ``audit --apply``
        choose a column from."""
        return {self.label_column: Column(self.labels, self.class_names), **self.attributes()}

    def column(self, name: str | None = None) -> Column:
        """The label column ``name`` (None: :attr:`label_column`); an ``InputError`` naming the
        columns there are when the cache has none of that name (``--attribute`` is a user's)."""
        name = self.label_column if name is None else name
        if name == self.label_column:
            return Column(self.labels, self.class_names)
        if name in self.attribute_names:
            return self.attribute(name)
        names = ", ".join([self.label_column, *self.attribute_names])
        raise InputError(f"{self.path} has no column {name!r}; its columns are: {names}")

    def attributes(self) -> dict[str, Column]:
        return {name: self.attribute(name) for name in self.attribute_names}

    @property
    def skipped(self) -> list[tuple[str, str]]:
        g = self._f["skipped"]
        return list(zip(_decode(g["path"]), _decode(g["reason"]), strict=True))

    @property
    def rejected(self) -> dict[str, tuple[str, str]]:
        """Content hash -> (why it gave no row, the decode limits of that run); empty before 0.2."""
        if "rejected" not in self._f:
            return {}
        g = self._f["rejected"]
        hashes = _decode(g["content_hash"])
        return dict(zip(hashes, zip(_decode(g["reason"]), _decode(g["limits"]), strict=True), strict=True))

    @property
    def duplicates(self) -> list[tuple[str, str]]:
        g = self._f["duplicates"]
        return list(zip(_decode(g["path"]), _decode(g["content_hash"]), strict=True))

    @property
    def segments(self) -> list[str]:
        """Segment file names (schema v2; empty for v1, whose rows are in the file itself)."""
        return _decode(self._f["segments/name"]) if "segments" in self._f else []

    @property
    def segment_rows(self) -> dict[str, int]:
        if "segments" not in self._f:
            return {}
        return dict(zip(self.segments, self._f["segments/rows"][()].tolist(), strict=True))

    @property
    def locations(self) -> list[tuple[str, int]]:
        """Per row: (segment name, row in it). Schema v2 only."""
        names = self.segments
        seg, row = self.location_arrays()
        return list(zip(map(names.__getitem__, seg.tolist()), row.tolist(), strict=True))  # no Python code per row

    def location_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Per row: its segment (index into :attr:`segments`) and its row in that segment, as
        arrays, checked against the segment list. Schema v2 only."""
        n_segments = len(self.segments)
        seg = self._f["location/segment"][()]
        row = self._f["location/row"][()]
        if len(seg) and (seg.min() < 0 or seg.max() >= n_segments or row.min() < 0):
            raise CacheError(
                f"{self.path} is damaged: /location points outside the {n_segments} segment(s) of /segments; "
                + validation.fix_hint(self.path)
            )
        return seg, row

    def stat_table(self) -> StatTable:
        """The stat cache, its columns as numpy arrays as they are stored (bytes for the
        strings): no Python object per file. The file check decodes what it needs
        (``statcache.Remembered.of``); compaction writes them back unchanged."""
        if "stat" not in self._f:
            return StatTable()
        g = self._f["stat"]
        return StatTable(*(g[k][()] for k in ("path", "size", "mtime_ns", "inode", "device", "content_hash")))

    def _read(self, rows: slice | np.ndarray, dtype: Any = None) -> np.ndarray:
        """Index rows ``rows`` (a slice, or row numbers in any order) as ``dtype`` (None: as
        stored), read straight from the segments (:mod:`.reader`; v1: from ``/features``)."""
        if not self._features:
            raise CacheError(f"{self.path} was opened for its metadata only; its features cannot be read")
        n_segments = len(self._files.names) if self._files is not None else None
        seg, row = locate(self._f, rows, self.n_rows, n_segments, self.path)
        out = np.empty((len(seg), self.feature_dim), dtype=self._dtype if dtype is None else dtype)
        try:
            read_into(out, seg, row, self._source, self.path)
        except OSError as e:
            raise CacheError(
                f"cannot read the features of {self.path} ({e}): a segment is damaged (its checksum "
                f"does not match); run `headstart cache verify {self.path}`, then extract again with --rebuild"
            ) from None
        return out

    def _source(self, i: int) -> tuple[str, Any]:
        if self._files is None:  # schema v1: the rows are the file's own /features
            return self.path.name, self._f["features"]
        return self._files.dataset(i)

    def features(self, rows: np.ndarray | None = None, dtype: Any = np.float32) -> np.ndarray:
        """Features as ``dtype``. ``rows`` (any order, repeats allowed) selects rows; read in
        row chunks so a cache larger than memory can be consumed piecewise by the caller."""
        return self._read(slice(0, self.n_rows) if rows is None else np.asarray(rows), dtype)

    def iter_features(self, chunk_rows: int = 65536, dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, rows start .. start + chunk_rows as dtype)`` over the whole cache. Memory:
        one chunk (and, converting, one piece of a segment), whatever the cache's size."""
        for start in range(0, self.n_rows, chunk_rows):
            yield start, self._read(slice(start, start + chunk_rows), dtype)

    def read_all(self, *, check: bool = True) -> CacheContents:
        return CacheContents(
            features=self._read(slice(0, self.n_rows)),
            content_hash=self.content_hash,
            paths=self.paths,
            labels=self.read_labels(check=check),
            class_names=self.class_names,
            attrs=self.attrs,
            duplicates=self.duplicates,
            skipped=self.skipped,
        )


def _not_a_file(path: Path) -> str:
    """Why ``path`` cannot be opened as a cache, and what to do: a folder given by mistake, or
    no index yet because the first extract into it was interrupted (its finished segments wait
    to be adopted), or nothing at all."""
    if path.is_dir():
        return f"{path} is a directory, not a feature cache; give the .h5 file `headstart extract` wrote"
    folder = segment_dir(path)
    finished = len(list(folder.glob("seg-*.h5"))) if folder.is_dir() else 0
    if finished:
        return (
            f"{path} has no index yet: {folder}/ holds {finished} finished segment(s) of an interrupted "
            "extract; run the same `headstart extract` again to resume"
        )
    return f"{path} does not exist; create it with `headstart extract IMAGES --out {path}`"


def require_finite(
    cache_path: object, values: np.ndarray, rows: Sequence[int] | np.ndarray, paths: Sequence[str]
) -> None:
    """NaN or inf in ``values`` (features, or anything computed row by row from them: a damaged
    cache) become one ``Error:`` naming the rows, not a library's ValueError far downstream.
    ``rows``/``paths``: the cache row and path of each entry of ``values``."""
    finite = np.isfinite(values) if values.ndim == 1 else np.isfinite(values).all(axis=1)
    bad = np.flatnonzero(~finite)
    if len(bad):
        listed = ", ".join(f"row {int(rows[i])} ({paths[i]})" for i in bad[:5])
        raise CacheError(
            f"{cache_path}: {len(bad)} row(s) have features that are not finite numbers: {listed}"
            f"{', ...' if len(bad) > 5 else ''}; the cache is damaged - run `headstart cache verify {cache_path}`, "
            "then extract again with --rebuild"
        )
