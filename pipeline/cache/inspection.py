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
from .h5io import Column
from .segments import read_segment_info, unindexed_segments
from .store import Cache, segment_dir


def info(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``headstart cache info`` prints: fingerprint, counts, classes, skipped files; or,
    before the first commit, the unfinished work of an extract (:func:`unfinished`)."""
    path = Path(path)
    if not path.exists():
        pending = unfinished(path)
        if pending is not None:
            return pending
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
            "label_column": str(c.attrs.get("label_column") or ""),  # "" for class folders
            "attributes": {name: _column_summary(c.attribute(name)) for name in c.attribute_names},
        }
        indexed = set(c.segments)
    out["unindexed_rows"] = sum(s.n_rows for s in unindexed_segments(path, indexed))
    return out


def unfinished(path: Path) -> dict[str, Any] | None:
    """A cache with no index yet: what a first extract left (finished segments, temporaries of
    a killed writer, the lock) and whether a writer holds the lock now. None if there is none
    of it. The segments are what the next run adopts, so their rows are work not lost."""
    folder = segment_dir(path)
    lock = path.with_name(path.name + ".lock")
    segments = unindexed_segments(path, set())
    temporaries = list(path.parent.glob(f".{path.name}.tmp-*")) if path.parent.is_dir() else []
    if folder.is_dir():
        temporaries += list(folder.glob(".seg-*.tmp-*"))
    if not (segments or temporaries or lock.is_file() or folder.is_dir()):
        return None
    writer = _lock_holder(lock)
    return {
        "path": str(path),
        "index": False,
        "state": "running" if writer is not None else "interrupted",
        "writer_pid": writer,
        "segments": len(segments),
        "unindexed_rows": sum(s.n_rows for s in segments),
        "temporaries": len(temporaries),
        "fingerprint": dict(segments[0].fingerprint) if segments else None,
        "size_bytes": sum((folder / s.name).stat().st_size for s in segments),
    }


def _lock_holder(lock: Path) -> int | None:
    """The pid holding ``lock``'s ``flock`` on this machine, from ``/proc/locks``; None if no
    one does (or it cannot be told). Read-only: taking the lock to test it, even for a moment,
    could refuse a writer that starts in that moment."""
    try:
        st = lock.stat()
        with open("/proc/locks", encoding="ascii", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4711 fd:01:2621445 0 EOF"; "->" marks a waiting request.
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == want and fields[4].isdigit():
            return int(fields[4])
    return None


def _format_unfinished(d: dict[str, Any]) -> str:
    rows, n = d["unindexed_rows"], d["segments"]
    lines = [
        f"{d['path']}: no index yet: {n} finished segment{'s' if n != 1 else ''} with {rows} row"
        f"{'s' if rows != 1 else ''} from an "
        + (
            f"extract that is running now (pid {d['writer_pid']})"
            if d["state"] == "running"
            else "interrupted extract; run extract again to resume (those rows are adopted, not extracted again)"
        )
    ]
    fp = d["fingerprint"]
    if fp:
        lines.append(f"backbone      {fp.get('backbone')} ({fp.get('weights')}), precision {fp.get('precision')}")
    if d["temporaries"]:
        whose = "the running writer" if d["state"] == "running" else "a killed writer, removed by the next extract"
        lines.append(f"temporaries   {d['temporaries']} half-written file(s) of {whose}")
    return "\n".join(lines)


def _column_summary(col: Column) -> dict[str, Any]:
    """An attribute column for ``cache info``: its labels (a multi-label cell's split) with
    their row counts, and the rows with an empty cell."""
    from ..data.attributes import looks_multi_label, split_cell

    counts = np.bincount(col.labels[col.labels >= 0], minlength=len(col.values))
    per: dict[str, int] = {}
    for value, n in zip(col.values, counts.tolist(), strict=True):
        for lab in split_cell(value) if looks_multi_label(col.values) else [value]:
            per[lab] = per.get(lab, 0) + n
    return {"multi_label": looks_multi_label(col.values), "rows_per_label": per, "empty": int((col.labels < 0).sum())}


def _named(d: dict[str, Any]) -> str:
    return f" (column {d['label_column']})" if d.get("label_column") else ""


def format_info(d: dict[str, Any]) -> str:
    if d.get("index") is False:
        return _format_unfinished(d)
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
        f"classes       {d['classes']}{_named(d)}, unlabelled rows {d['unlabelled']}, "
        f"duplicate files {d['duplicates']}",
    ]
    lines += [f"  {n}: {k}" for n, k in d["rows_per_class"].items()]
    for name, col in (d.get("attributes") or {}).items():
        kind = "multi-label" if col["multi_label"] else "single-label"
        lines.append(f"attribute     {name} ({kind}), {len(col['rows_per_label'])} labels, empty cells {col['empty']}")
        lines += [f"  {n}: {k}" for n, k in col["rows_per_label"].items()]
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
    with Cache(path, check=False) as c:
        # The layout (datasets present, ranks, types, lengths; attributes that contradict them)
        # is the reader's own check at open, listed here instead of raised.
        problems = list(c.problems)
        if not c.readable:
            return problems  # reading further would only trip over the same damage
        if c.schema_version >= 2:
            problems += _verify_segments(c)
        try:
            contents = c.read_all(check=False)
        except (OSError, KeyError, ValueError, CacheError) as e:
            return [*problems, f"cannot read every dataset: {e}"]
        a = contents.attrs
        n = len(contents.content_hash)
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
