"""Low-level pieces of the feature cache: fault injection, atomic HDF5 files, dataset helpers.

Used by ``segments`` (immutable row files), ``index`` (the file that maps them) and ``store``
(the lock and the reader); see ``store.py`` for the layout. No torch here.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..core.atomic import fsync_dir
from ..core.faults import crash_point
from ..errors import CacheError

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
_STR = h5py.string_dtype("utf-8")


def segment_dir(cache_path: Path) -> Path:
    """``CACHE.h5.segments/``: where the cache's segment files live."""
    return cache_path.with_name(cache_path.name + ".segments")


CONFLICT = -2  # an attribute row whose identical files carry different cells


@dataclass
class Column:
    """One attribute column of the index (``/attributes/<name>``): per row an index into
    ``values`` (the column's distinct cells as written, sorted), -1 = empty, -2 = identical
    files whose cells disagree (:data:`CONFLICT`: left out of the attribute's head)."""

    labels: np.ndarray  # int32 [N]
    values: list[str]


@dataclass
class StatTable:
    """The stat cache: (path, size, mtime_ns, inode, device) -> content hash, one per file.
    Columns are lists, or numpy arrays as stored (``Cache.stat_table()``: bytes for the
    strings), which the index writer takes as they are."""

    path: list[str] | np.ndarray = field(default_factory=list)
    size: list[int] | np.ndarray = field(default_factory=list)
    mtime_ns: list[int] | np.ndarray = field(default_factory=list)
    inode: list[int] | np.ndarray = field(default_factory=list)
    device: list[int] | np.ndarray = field(default_factory=list)
    content_hash: list[str] | np.ndarray = field(default_factory=list)


def _decode(arr: Any) -> list[str]:
    """A string dataset (fixed width or variable length) as ``str``. Per-row datasets hold up to
    a row per photo, so the common case is decoded in one piece: the values joined by NUL (none
    can hold one: HDF5 pads fixed-width strings with NULs), decoded and split, about 3x faster
    than a ``decode`` per value."""
    values = arr[()]
    items = values.tolist() if isinstance(values, np.ndarray) else list(values)
    try:
        joined = b"\0".join(items)
    except TypeError:  # not all bytes (h5py hands out str in some modes)
        joined = None
    if joined is not None and joined.count(b"\0") == len(items) - 1:
        return joined.decode("utf-8").split("\0") if items else []
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in items]


# Files up to this size are built in memory and written with plain file I/O. Why: when the disk
# fills (or a quota or file-size limit hits) while the HDF5 library itself is writing, h5py
# leaves objects it cannot close, prints tracebacks from their destructors and can crash the
# interpreter at exit (seen here: SIGSEGV after EFBIG). Plain writes fail with one clean OSError.
# Segments and indexes are far below it; a larger file is written by HDF5 directly after
# checking the free space.
IN_MEMORY_WRITE_LIMIT = 1 << 30
# An index is built in memory only up to this size (before compression): an in-memory image is
# the whole file, twice while it is written out, and an index grows with the catalog (about 70
# bytes a row on disk), where a segment's size is fixed. A larger index is written by HDF5 straight
# to disk after the free-space check, so a commit's memory stays flat in the catalog's size.
INDEX_IN_MEMORY_LIMIT = 32 << 20
_WRITE_CHUNK = 64 << 20


def _write_h5_atomically(
    path: Path,
    fill: Callable[[h5py.File], None],
    size_hint: int,
    point: str,
    in_memory_limit: int = IN_MEMORY_WRITE_LIMIT,
) -> int:
    """Write the HDF5 file ``fill`` builds to ``path`` atomically (tmp, fsync, rename, fsync the
    folder); ``{point}-writing`` / ``{point}-before-rename`` are crash points. Returns bytes written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if size_hint <= in_memory_limit:
            with h5py.File(tmp, "w", driver="core", backing_store=False) as f:
                fill(f)
                f.flush()
                image = memoryview(f.id.get_file_image())
            with open(tmp, "wb") as fh:
                half = len(image) // 2
                fh.write(image[:half])
                crash_point(f"{point}-writing")  # a half-written temporary file, never the target
                for start in range(half, len(image), _WRITE_CHUNK):
                    fh.write(image[start : start + _WRITE_CHUNK])
                fh.flush()
                os.fsync(fh.fileno())
            written = len(image)
            del image
        else:
            _check_free_space(path, int(size_hint * 1.05) + (1 << 20))
            with h5py.File(tmp, "w") as f:
                fill(f)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            written = tmp.stat().st_size
        crash_point(f"{point}-before-rename")
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return written


def _check_free_space(path: Path, need: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if free < need:
        raise OSError(errno.ENOSPC, f"{need / 1e9:.2f} GB needed, {free / 1e9:.2f} GB free")


def _disk_error(e: OSError, target: Path) -> CacheError:
    full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT) or any(
        s in str(e).lower() for s in ("no space", "file too large", "quota", "write failed")
    )
    if full:
        return CacheError(
            f"disk full while writing {target}: {e}. Every row committed before is kept "
            "(the cache index is untouched and finished segments stay in its .segments folder); "
            "free some space and re-run the same command to finish"
        )
    return CacheError(f"cannot write {target}: {e}")


def _set_attrs(f: h5py.File | h5py.Group, attrs: dict[str, Any]) -> None:
    for k, v in attrs.items():
        f.attrs[k] = v if isinstance(v, (int, float, np.integer, np.floating)) else str(v)


def _str_ds(g: h5py.File | h5py.Group, name: str, values: Sequence[str]) -> None:
    g.create_dataset(name, data=np.array(list(values), dtype=object), dtype=_STR)


def _packed(g: h5py.File | h5py.Group, name: str, data: np.ndarray, compress: bool = True) -> None:
    """A per-row dataset of the index from an array (:meth:`RowColumn.write`)."""
    data = np.asarray(data)
    RowColumn(data, data.dtype).write(g, name, compress=compress)


# Rows of a per-row column converted to their stored form at a time when an index is digested
# and written (:class:`RowColumn`): a commit then holds that many rows of one column, not every
# row of every column at once (314 bytes a row, 314 MB at a million rows, before).
ROW_CHUNK = 1 << 18
_H5_CHUNK = 1 << 14  # rows per HDF5 chunk of a compressed per-row dataset: divides ROW_CHUNK


@dataclass(frozen=True)
class RowColumn:
    """One per-row dataset of the index as it is stored (``dtype``), made from the caller's
    values (a list, or an array as stored) a :data:`ROW_CHUNK` of rows at a time. ``text``:
    strings, stored as fixed-width UTF-8 (variable-length strings live in a heap that
    filters cannot compress; h5py reads both kinds as bytes)."""

    values: Sequence[Any] | np.ndarray
    dtype: np.dtype
    text: bool = False

    @classmethod
    def strings(cls, values: Sequence[str] | np.ndarray) -> RowColumn:
        return cls(values, np.dtype(f"S{_utf8_width(values)}"), True)

    def __len__(self) -> int:
        return len(self.values)

    def chunks(self) -> Iterator[np.ndarray]:
        for a in range(0, len(self.values), ROW_CHUNK):
            part = self.values[a : a + ROW_CHUNK]
            if self.text and not isinstance(part, np.ndarray):
                try:  # numpy turns ASCII str into bytes in C, about 4x faster than an encode each
                    yield np.array(part, dtype=self.dtype)
                except UnicodeEncodeError:
                    yield np.array([v.encode("utf-8") for v in part], dtype=self.dtype)
            else:
                yield np.ascontiguousarray(part, dtype=self.dtype)

    def digest_into(self, h: Any) -> None:
        """Its type, length and bytes into the hash ``h``: the same bytes as the whole array's."""
        h.update(f"{self.dtype.str}{(len(self),)}".encode())
        for part in self.chunks():
            h.update(part.data)

    def write(self, g: h5py.File | h5py.Group, name: str, *, compress: bool = True) -> None:
        """As ``name`` in ``g``: gzip level 1 with byte shuffle (an index is rewritten by every
        commit, so its bytes per row are what a commit costs beyond new rows) unless
        ``compress`` is off (content hashes: random hex, half the bytes for most of the time)."""
        n = len(self)
        dt = h5py.string_dtype("utf-8", self.dtype.itemsize) if self.text else self.dtype
        kw: dict[str, Any] = {}
        if compress and n > 256:
            kw = dict(compression="gzip", compression_opts=1, shuffle=True, chunks=(min(n, _H5_CHUNK),))
        ds = g.create_dataset(name, shape=(n,), dtype=dt, **kw)
        start = 0
        for part in self.chunks():  # whole HDF5 chunks each time: none is read back to be rewritten
            ds[start : start + len(part)] = part.astype(dt) if self.text else part
            start += len(part)


def _utf8_width(values: Sequence[str] | np.ndarray) -> int:
    """Bytes of the longest value in UTF-8 (at least 1)."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "S":
        return max(1, values.dtype.itemsize)
    if not len(values):
        return 1
    width = max(map(len, values))  # characters = bytes for ASCII (and for bytes values)
    if isinstance(values[0], str) and not all(map(str.isascii, values)):
        width = max(len(v.encode("utf-8")) for v in values)
    return max(1, width)
