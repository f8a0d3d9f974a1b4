"""``headstart cache info`` and ``headstart cache verify``: read-only inspection of a cache.

Kept apart from ``store.py`` (schema, segments, index writer, reader) so that module stays
about what is stored and how it is written safely.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CacheError
from ..models.fingerprint import KEYS as FINGERPRINT_KEYS
from .segments import read_segment_info, unindexed_segments
from .store import Cache, segment_dir


def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``headstart cache info`` prints: fingerprint, counts, classes, skipped files."""
    path = Path(path)
    with Cache(path) as c:
        a = c.attrs
        labels = c.labels
        names = c.class_names
        counts = {n: int((labels == i).sum()) for i, n in enumerate(names)}
        out: dict[str, Any] = {
            "path": str(path),
            "schema_version": a.get("schema_version"),
            "fingerprint": {k: c.attrs.get(k) for k in FINGERPRINT_KEYS},  # as stored, even if damaged
            "rows": c.n_rows,
            "feature_dim": c.feature_dim,
            "dtype": a.get("dtype"),
            "classes": len(names),
            "rows_per_class": counts,
            "unlabelled": int((labels < 0).sum()),
            "duplicates": len(c.duplicates),
            "skipped": [{"path": p, "reason": r} for p, r in c.skipped],
            "image_root": a.get("image_root"),
            "created": a.get("created"),
            "updated": a.get("updated"),
            "size_bytes": path.stat().st_size + sum((segment_dir(path) / s).stat().st_size for s in c.segments),
            "segments": len(c.segments),
            "dead_rows": sum(c.segment_rows.values()) - c.n_rows if c.segments else 0,
        }
        indexed = set(c.segments)
    out["unindexed_rows"] = sum(s.n_rows for s in unindexed_segments(path, indexed))
    return out


def format_info(d: dict[str, Any]) -> str:
    fp = d["fingerprint"]
    lines = [
        f"{d['path']}: schema v{d['schema_version']}, {d['rows']} rows x {d['feature_dim']} ({d['dtype']}), "
        f"{d['size_bytes'] / 1e6:.1f} MB in the index and {d['segments']} segment(s)",
        f"backbone      {fp['backbone']} ({fp['weights']})",
        f"weights sha256 {fp['weights_sha256']}",
        f"precision     {fp['precision']}",
        f"preprocessing {fp['preprocessing']}",
        f"image root    {d['image_root']}",
        f"updated       {d['updated']} (created {d['created']})",
        f"classes       {d['classes']}, unlabelled rows {d['unlabelled']}, duplicate files {d['duplicates']}",
    ]
    lines += [f"  {n}: {k}" for n, k in d["rows_per_class"].items()]
    lines.append(f"skipped       {len(d['skipped'])}")
    lines += [f"  {s['path']}: {s['reason']}" for s in d["skipped"]]
    if d["dead_rows"]:
        lines.append(f"dead rows     {d['dead_rows']} (of deleted photos, still in segments)")
    if d["unindexed_rows"]:
        lines.append(
            f"unindexed     {d['unindexed_rows']} rows in segments of an unfinished extraction; "
            "re-run the same `headstart extract` to adopt them"
        )
    return "\n".join(lines)


def verify(path: str | os.PathLike[str]) -> list[str]:
    """Integrity problems of a cache (empty list = sound). Reads every byte of every dataset
    and every segment (whose Fletcher-32 checksums are checked on read), so a damaged chunk
    shows up here rather than in the middle of a fit; checks that the index points at
    existing segments holding the rows it says."""
    problems: list[str] = []
    with Cache(path) as c:
        if c.schema_version >= 2:
            problems += _verify_segments(c)
        try:
            contents = c.read_all()
        except (OSError, KeyError, ValueError, CacheError) as e:
            return [*problems, f"cannot read every dataset: {e}"]
        a = contents.attrs
        n, d = contents.features.shape if contents.features.ndim == 2 else (-1, -1)
        if contents.features.ndim != 2:
            problems.append(f"/features has shape {contents.features.shape}, expected [N, D]")
        lengths = {
            "/content_hash": len(contents.content_hash),
            "/paths": len(contents.paths),
            "/labels": len(contents.labels),
        }
        for name, count in lengths.items():
            if count != n:
                problems.append(f"{name} has {count} entries but /features has {n} rows")
        if int(a.get("n_rows", -1)) != n:
            problems.append(f"attribute n_rows is {a.get('n_rows')} but /features has {n} rows")
        if str(a.get("feature_dim")) != str(d):
            problems.append(f"attribute feature_dim is {a.get('feature_dim')} but /features has {d} columns")
        for name, values in (("content_hash", contents.content_hash), ("paths", contents.paths)):
            counts: dict[str, int] = {}
            for v in values:
                counts[v] = counts.get(v, 0) + 1
            dup = sorted(v for v, k in counts.items() if k > 1)
            if dup:
                problems.append(f"{len(dup)} duplicate value(s) in /{name}, e.g. {dup[0]}")
        bad_hash = [h for h in contents.content_hash if len(h) != 32 or any(ch not in "0123456789abcdef" for ch in h)]
        if bad_hash:
            problems.append(f"{len(bad_hash)} malformed content hash(es), e.g. {bad_hash[0]!r}")
        n_cls = len(contents.class_names)
        if contents.class_names != sorted(set(contents.class_names)):
            problems.append("/class_names is not sorted and unique")
        out_of_range = int(((contents.labels < -1) | (contents.labels >= n_cls)).sum())
        if out_of_range:
            problems.append(f"{out_of_range} label(s) outside -1 .. {n_cls - 1}")
        if n > 0 and not np.isfinite(contents.features).all():
            bad = int((~np.isfinite(contents.features)).any(axis=1).sum())
            problems.append(f"{bad} row(s) of /features contain NaN or inf")
        keys = set(contents.content_hash)
        orphans = [p for p, h in contents.duplicates if h not in keys]
        if orphans:
            problems.append(f"{len(orphans)} /duplicates entries point at no row, e.g. {orphans[0]}")
        for k in FINGERPRINT_KEYS:
            if k not in a:
                problems.append(f"fingerprint attribute {k!r} is missing")
    return problems


def _verify_segments(c: Cache) -> list[str]:
    problems: list[str] = []
    folder = segment_dir(c.path)
    rows = c.segment_rows
    infos = {}
    for name, n in rows.items():
        p = folder / name
        try:
            infos[name] = read_segment_info(p)
            with h5py.File(p, "r") as f:
                for start in range(0, n, 65536):
                    f["features"][start : start + 65536]  # decoding checks each chunk's checksum
        except (OSError, KeyError, ValueError) as e:
            problems.append(f"segment {name} is damaged: {e}")
            continue
        if infos[name].n_rows != n:
            problems.append(f"segment {name} has {infos[name].n_rows} rows but the index says {n}")
    try:
        locations = c.locations
    except (OSError, KeyError, IndexError) as e:
        return [*problems, f"cannot read /location: {e}"]
    hashes = c.content_hash
    wrong = 0
    for h, (name, r) in zip(hashes, locations, strict=False):
        info = infos.get(name)
        if info is not None and (r >= len(info.content_hash) or info.content_hash[r] != h):
            wrong += 1
    if wrong:
        problems.append(f"{wrong} row(s) of the index point at a segment row with another content hash")
    if len(locations) != len(hashes):
        problems.append(f"/location has {len(locations)} entries but /content_hash has {len(hashes)}")
    return problems


def verify_or_raise(path: str | os.PathLike[str]) -> str:
    """``headstart cache verify``: a one-line verdict, or :class:`CacheError` listing the problems."""
    problems = verify(path)
    if problems:
        raise CacheError(
            f"{path} failed verification ({len(problems)} problem(s)): {'; '.join(problems)}. "
            "Re-create it with `headstart extract IMAGES --out CACHE --rebuild`"
        )
    with Cache(path) as c:
        n, d, k = c.n_rows, c.feature_dim, len(set(c.content_hash))
    return f"{path}: OK ({n} rows x {d}, {k} distinct content hashes, every dataset read in full)"
