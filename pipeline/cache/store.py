"""The HDF5 feature cache: schema, atomic writer, crash journal, lock, reader. No torch here.

Why a journal instead of appending to the HDF5 file in place: HDF5 is not crash-safe. A
process killed (SIGKILL, OOM, power) while h5py is writing can leave the file's metadata
half-flushed and the whole file unreadable - every row lost, not just the last batch. So the
committed cache is only ever *replaced*, atomically (write ``.tmp``, fsync, ``os.replace``), and
rows extracted since the last commit live in ``CACHE.h5.journal/``: small ``.npz`` batch files,
each itself written atomically. A kill at any moment leaves the old cache intact plus whole
batches; the next run picks both up and extracts only what is missing.

Schema v1 (dataset names are a public contract; other tools read them):

=====================  ================================================================
``/features``          float16 or float32 ``[N, D]``, chunked by rows
``/content_hash``      ``S32`` ``[N]``: blake2b-128 hex of the file's bytes - the row key
``/paths``             UTF-8 ``[N]``: one path (relative to the image root) per row
``/labels``            int32 ``[N]``: index into ``/class_names``, -1 = unlabelled
``/class_names``       UTF-8 ``[C]`` (sorted; may be Chinese, e.g. 口红)
``/duplicates/path``   UTF-8: further files with the same bytes as a row ...
``/duplicates/content_hash``  ... and that row's key (identical files are extracted once)
``/skipped/path``      UTF-8: files that could not be used ...
``/skipped/reason``    ... and why
attrs                  fingerprint (backbone, weights, weights_sha256, preprocessing JSON,
                       precision, feature_dim), dtype, n_rows, schema_version, versions,
                       created/updated, image_root, config JSON
=====================  ================================================================
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..core.atomic import atomic_file, fsync_dir
from ..errors import BackboneError, CacheError
from ..models.fingerprint import Fingerprint

SCHEMA_VERSION = 1
_STR = h5py.string_dtype("utf-8")


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: ``HEADSTART_CRASH_AT=name[:n]`` makes the process
    SIGKILL itself the n-th time (default 1st) it reaches ``name``. A real kill -9 at a chosen
    instant, which a timer from outside cannot hit reliably (e.g. between writing the new cache
    and removing the journal). Costs one dict lookup when unset."""
    spec = os.environ.get("HEADSTART_CRASH_AT")
    if not spec:
        return
    want, _, nth = spec.partition(":")
    if want != name:
        return
    _CRASH_COUNTS[name] = _CRASH_COUNTS.get(name, 0) + 1
    if _CRASH_COUNTS[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)


_CRASH_COUNTS: dict[str, int] = {}


# --------------------------------------------------------------------------- lock


@contextlib.contextmanager
def writer_lock(cache_path: Path) -> Iterator[None]:
    """One writer per cache. ``flock`` is released by the kernel when the process dies,
    so a killed extractor never leaves a stale lock behind."""
    lock_path = cache_path.with_name(cache_path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            raise CacheError(
                f"{cache_path} is being written by {holder}; wait for it to finish "
                "(readers such as fit-head can use the cache meanwhile)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}".encode(), 0)
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- journal


class Journal:
    """Rows extracted but not yet merged into the cache: ``CACHE.h5.journal/batch-*.npz``."""

    def __init__(self, cache_path: Path) -> None:
        self.dir = cache_path.with_name(cache_path.name + ".journal")

    def exists(self) -> bool:
        return self.dir.is_dir()

    def fingerprint(self) -> Fingerprint | None:
        p = self.dir / "fingerprint.json"
        if not p.is_file():
            return None
        return Fingerprint.from_record(json.loads(p.read_text()), source=str(p))

    def start(self, fingerprint: Fingerprint) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (self.dir / "fingerprint.json").is_file():
            with atomic_file(self.dir / "fingerprint.json") as f:
                f.write(json.dumps(fingerprint.to_record()).encode())

    def append(
        self,
        hashes: list[str],
        features: np.ndarray,
        skipped_hashes: list[str],
        skipped_reasons: list[str],
    ) -> None:
        seq = len(list(self.dir.glob("batch-*.npz")))
        # Host and pid keep names unique when torchrun ranks on several machines share the journal.
        name = self.dir / f"batch-{seq:07d}-{socket.gethostname()}-{os.getpid()}-{time.monotonic_ns()}.npz"
        tmp = name.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(
                    f,
                    content_hash=np.array(hashes, dtype=f"S{32}"),
                    features=features,
                    skipped_hash=np.array(skipped_hashes, dtype="S32"),
                    skipped_reason=np.array(skipped_reasons, dtype=np.str_),
                )
                f.flush()
                os.fsync(f.fileno())
            crash_point("journal-before-rename")
            os.replace(tmp, name)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _disk_error(e, name) from None
        crash_point("journal-appended")

    def load(self) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """hash -> feature row, and hash -> skip reason, over every complete batch."""
        rows: dict[str, np.ndarray] = {}
        skips: dict[str, str] = {}
        for p in sorted(self.dir.glob("batch-*.npz")):
            try:
                with np.load(p, allow_pickle=False) as z:
                    for h, row in zip(z["content_hash"], z["features"], strict=True):
                        rows[h.decode()] = row
                    for h, r in zip(z["skipped_hash"], z["skipped_reason"], strict=True):
                        skips[h.decode()] = str(r)
            except (OSError, ValueError, KeyError):
                continue  # a batch cut off by a crash before its rename cannot exist; be lenient
        return rows, skips

    def n_rows(self) -> int:
        """Rows waiting in complete batches (for ``cache info``)."""
        rows, _ = self.load() if self.exists() else ({}, {})
        return len(rows)

    def clear(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                p.unlink(missing_ok=True)
                crash_point("journal-clearing")
            self.dir.rmdir()


def remove_stale_temporaries(cache_path: Path) -> None:
    """Delete ``.CACHE.h5.tmp-PID`` files left by a writer killed mid-write. Call it only
    while holding :func:`writer_lock`: then no live writer can own one."""
    for p in cache_path.parent.glob(f".{cache_path.name}.tmp-*"):
        p.unlink(missing_ok=True)


# --------------------------------------------------------------------------- data & writer


@dataclass
class CacheContents:
    """Everything a cache file holds, in memory. The writer's input, the reader's full output."""

    features: np.ndarray
    content_hash: list[str]
    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    attrs: dict[str, Any]
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (path, content_hash)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


# Caches up to this size are built in memory and written with plain file I/O. Why: when the
# disk fills (or a quota or file-size limit hits) while the HDF5 library itself is writing, h5py
# leaves objects it cannot close, prints tracebacks from their destructors and can crash the
# interpreter at exit (seen here: SIGSEGV after EFBIG). Plain writes fail with one clean OSError.
# The price is one extra copy of the file in memory, so larger caches are written by HDF5
# directly after checking the free space.
IN_MEMORY_WRITE_LIMIT = 1 << 30
_WRITE_CHUNK = 64 << 20


def write_cache(path: Path, c: CacheContents) -> None:
    """Write a complete cache atomically: readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        if c.features.nbytes <= IN_MEMORY_WRITE_LIMIT:
            with h5py.File(tmp, "w", driver="core", backing_store=False) as f:
                _fill(f, c)
                f.flush()
                image = memoryview(f.id.get_file_image())
            with open(tmp, "wb") as fh:
                half = len(image) // 2
                fh.write(image[:half])
                crash_point("cache-writing")  # a half-written temporary file, never the cache itself
                for start in range(half, len(image), _WRITE_CHUNK):
                    fh.write(image[start : start + _WRITE_CHUNK])
                fh.flush()
                os.fsync(fh.fileno())
            del image
        else:
            _check_free_space(path, int(c.features.nbytes * 1.05) + (1 << 20))
            with h5py.File(tmp, "w") as f:
                _fill(f, c)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        crash_point("cache-before-replace")
        os.replace(tmp, path)
        fsync_dir(path.parent)
        crash_point("cache-replaced")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _disk_error(e, path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fill(f: h5py.File, c: CacheContents) -> None:
    n, d = c.features.shape if c.features.ndim == 2 else (0, int(c.attrs.get("feature_dim", 0)))
    f.create_dataset(
        "features",
        data=c.features.reshape(n, d),
        chunks=(max(1, min(n, 1024)), d) if n and d else None,
        maxshape=(None, d),
    )
    f.create_dataset("content_hash", data=np.array(c.content_hash, dtype="S32"))
    f.create_dataset("paths", data=np.array(c.paths, dtype=object), dtype=_STR)
    f.create_dataset("labels", data=np.asarray(c.labels, dtype=np.int32))
    f.create_dataset("class_names", data=np.array(c.class_names, dtype=object), dtype=_STR)
    g = f.create_group("duplicates")
    g.create_dataset("path", data=np.array([p for p, _ in c.duplicates], dtype=object), dtype=_STR)
    g.create_dataset("content_hash", data=np.array([h for _, h in c.duplicates], dtype="S32"))
    g = f.create_group("skipped")
    g.create_dataset("path", data=np.array([p for p, _ in c.skipped], dtype=object), dtype=_STR)
    g.create_dataset("reason", data=np.array([r for _, r in c.skipped], dtype=object), dtype=_STR)
    attrs = dict(c.attrs)
    attrs.update(schema_version=SCHEMA_VERSION, n_rows=n, feature_dim=d, dtype=str(c.features.dtype))
    for k, v in attrs.items():
        f.attrs[k] = v if isinstance(v, (int, float, np.integer, np.floating)) else str(v)


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
            "(the cache file is untouched and finished batches stay in its .journal folder); "
            "free some space and re-run the same command to finish"
        )
    return CacheError(f"cannot write {target}: {e}")


# --------------------------------------------------------------------------- reader


def _decode(arr: Any) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr[()]]


class Cache:
    """Read-only view of a cache file. Use as a context manager, or call :meth:`close`."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CacheError(f"{self.path} does not exist; create it with `headstart extract IMAGES --out {self.path}`")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheError(f"{self.path} is not a readable HDF5 feature cache ({e})") from None
        version = int(self._f.attrs.get("schema_version", -1))
        if version == -1 or "features" not in self._f:
            self._f.close()
            raise CacheError(f"{self.path} is not a headstart feature cache (no schema_version)")
        if version > SCHEMA_VERSION:
            self._f.close()
            raise CacheError(
                f"{self.path} uses cache schema v{version}, newer than this headstart (v{SCHEMA_VERSION}); "
                "upgrade headstart"
            )

    def __enter__(self) -> Cache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
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
        return int(self._f["features"].shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self._f["features"].shape[1])

    @property
    def class_names(self) -> list[str]:
        return _decode(self._f["class_names"])

    @property
    def paths(self) -> list[str]:
        return _decode(self._f["paths"])

    @property
    def content_hash(self) -> list[str]:
        return [h.decode() for h in self._f["content_hash"][()]]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self._f["labels"][()], dtype=np.int64)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        g = self._f["skipped"]
        return list(zip(_decode(g["path"]), _decode(g["reason"]), strict=True))

    @property
    def duplicates(self) -> list[tuple[str, str]]:
        g = self._f["duplicates"]
        return list(zip(_decode(g["path"]), [h.decode() for h in g["content_hash"][()]], strict=True))

    def features(self, rows: np.ndarray | None = None, dtype: Any = np.float32) -> np.ndarray:
        """Features as ``dtype``. ``rows`` (any order) selects rows; read in row chunks so a
        cache larger than memory can be consumed piecewise by the caller."""
        ds = self._f["features"]
        if rows is None:
            return np.asarray(ds[()], dtype=dtype)
        rows = np.asarray(rows, dtype=np.int64)
        order = np.argsort(rows)
        out = np.empty((len(rows), ds.shape[1]), dtype=dtype)
        out[order] = ds[rows[order]] if len(rows) else out[order]
        return out

    def iter_features(self, chunk_rows: int = 65536, dtype: Any = np.float32) -> Iterator[tuple[int, np.ndarray]]:
        ds = self._f["features"]
        for start in range(0, ds.shape[0], chunk_rows):
            yield start, np.asarray(ds[start : start + chunk_rows], dtype=dtype)

    def read_all(self) -> CacheContents:
        return CacheContents(
            features=np.asarray(self._f["features"][()]),
            content_hash=self.content_hash,
            paths=self.paths,
            labels=self.labels,
            class_names=self.class_names,
            attrs=self.attrs,
            duplicates=self.duplicates,
            skipped=self.skipped,
        )
