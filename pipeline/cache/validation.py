"""The one check of a cache's layout, made when :class:`~pipeline.cache.store.Cache` opens it.

Every reader (fit-head, similar, evaluate, cache info, export, compact) opens a cache through
``Cache``, so a damaged or hand-made file - a dataset missing, features of the wrong rank or
type, float labels, per-row datasets of different lengths, attributes that disagree with the
datasets, a ``schema_version`` that is not a number - is one ``Error:`` naming the dataset at
open, not a ``KeyError`` or a broadcasting ``ValueError`` in the middle of a fit.

It reads metadata only (shapes, dtypes, attributes): opening stays O(1) in the catalog's size.
Values are checked where they are read anyway: labels against the class count by
``Cache.labels``, features for NaN and inf by ``store.require_finite`` in each reader, and
everything, byte by byte, by ``headstart cache verify``. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from ..errors import CacheError
from .h5io import READABLE_SCHEMAS

_FLOAT, _INT, _STR = "float", "int", "str"

# (dataset, kind, whether it has one entry per row). Names are store.py's public contract.
_COMMON: tuple[tuple[str, str, bool], ...] = (
    ("content_hash", _STR, True),
    ("paths", _STR, True),
    ("labels", _INT, True),
    ("class_names", _STR, False),
)
# Groups of parallel 1-D datasets: every member of one group has the same length.
_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "skipped": (("path", _STR), ("reason", _STR)),
    "duplicates": (("path", _STR), ("content_hash", _STR)),
}
_V2_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "segments": (("name", _STR), ("rows", _INT)),
    "location": (("segment", _INT), ("row", _INT)),
}
# Present in caches written since the stat cache / the reject memory existed; absent is fine.
_OPTIONAL_GROUPS: dict[str, tuple[tuple[str, str], ...]] = {
    "stat": (
        ("path", _STR),
        ("size", _INT),
        ("mtime_ns", _INT),
        ("inode", _INT),
        ("device", _INT),
        ("content_hash", _STR),
    ),
    "rejected": (("content_hash", _STR), ("reason", _STR), ("limits", _STR)),
}


def fix_hint(path: Path) -> str:
    """What to do about a damaged cache, in every message about one."""
    return f"run `headstart cache verify {path}`, then extract again with --rebuild"


class BadSchema(CacheError):
    """A ``schema_version`` that is there but no version headstart ever wrote: a damaged file
    (``cache verify`` lists :attr:`problem`; every other reader shows the message)."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(damaged(path, [problem]))
        self.problem = problem


def schema_version(path: Path, f: h5py.File) -> int:
    """The file's schema version as an int; CacheError if it has none (not a headstart cache)
    or a newer one, :class:`BadSchema` if it is not a number or not one headstart wrote."""
    raw = f.attrs.get("schema_version")
    if raw is None:
        raise CacheError(f"{path} is not a headstart feature cache (no schema_version attribute)")
    if isinstance(raw, (bool, np.bool_)) or not isinstance(raw, (int, np.integer)):
        raise BadSchema(path, f"attribute schema_version is {_show(raw)}, not a whole number")
    version = int(raw)
    if version > max(READABLE_SCHEMAS):
        raise CacheError(
            f"{path} uses cache schema v{version}, newer than this headstart (v{max(READABLE_SCHEMAS)}); "
            "upgrade headstart"
        )
    if version not in READABLE_SCHEMAS:
        readable = ", ".join(f"v{v}" for v in READABLE_SCHEMAS)
        raise BadSchema(path, f"schema_version {version} was never written by headstart (it reads {readable})")
    return version


def layout_problems(f: h5py.File, version: int) -> list[str]:
    """What is wrong with the datasets' presence, rank, type and lengths (empty = sound).
    Metadata only. A problem here makes reading unsafe; :func:`attribute_problems` does not."""
    problems: list[str] = []
    feats = f.get("features")
    n: int | None = None
    if not isinstance(feats, h5py.Dataset):
        problems.append("/features is missing" if feats is None else "/features is a group, not a dataset")
    elif feats.ndim != 2:
        problems.append(f"/features has shape {feats.shape}, expected [rows, feature_dim]")
    elif _kind(feats.dtype) != _FLOAT:
        problems.append(f"/features holds {feats.dtype}, not floating-point numbers")
    else:
        n = int(feats.shape[0])
    for name, kind, per_row in _COMMON:
        problems += _dataset_problems(f, name, kind, n if per_row else None, f"/features has {n} rows")
    groups = {**_GROUPS, **(_V2_GROUPS if version >= 2 else {})}
    groups.update({g: m for g, m in _OPTIONAL_GROUPS.items() if g in f})
    for group, members in groups.items():
        want = n if group == "location" else None
        problems += _group_problems(f, group, members, want)
    if "attributes" in f:
        problems += _attribute_column_problems(f, n)
    return problems


def _attribute_column_problems(f: h5py.File, n: int | None) -> list[str]:
    """``/attributes`` (caches from manifests with several label columns): a group per column
    named in its ``columns`` attribute, each with per-row ``labels`` and its ``class_names``."""
    g = f["attributes"]
    if not isinstance(g, h5py.Group):
        return ["/attributes is a dataset, not a group"]
    try:
        columns = json.loads(g.attrs["columns"])
        if not (isinstance(columns, list) and all(isinstance(c, str) for c in columns)):
            raise ValueError
    except (KeyError, ValueError, TypeError):
        return ["/attributes has no readable 'columns' attribute (a JSON list of the column names)"]
    problems: list[str] = []
    for name in columns:
        col = g.get(name)
        if not isinstance(col, h5py.Group):
            problems.append(f"/attributes/{name} is missing" if col is None else f"/attributes/{name} is not a group")
            continue
        problems += _dataset_problems(col, "labels", _INT, n, f"/features has {n} rows")
        problems += _dataset_problems(col, "class_names", _STR, None, "")
    return problems


def attribute_problems(f: h5py.File) -> list[str]:
    """Count attributes that disagree with ``/features`` (a lying ``n_rows``). Readers go by the
    datasets, but an index whose own attributes contradict it was not written by headstart
    whole, and nothing else in it can be trusted either."""
    feats = f.get("features")
    if not isinstance(feats, h5py.Dataset) or feats.ndim != 2:
        return []
    problems = []
    for attr, actual, what in (("n_rows", feats.shape[0], "rows"), ("feature_dim", feats.shape[1], "columns")):
        if attr in f.attrs and str(_scalar(f.attrs[attr])) != str(actual):
            problems.append(f"attribute {attr} is {_show(f.attrs[attr])} but /features has {actual} {what}")
    return problems


def damaged(path: Path, problems: list[str]) -> str:
    """The message for a cache whose layout is wrong: the first problems and what to do."""
    shown = "; ".join(problems[:3]) + (f" (and {len(problems) - 3} more)" if len(problems) > 3 else "")
    return f"{path} is damaged or was not written by headstart: {shown}; {fix_hint(path)}"


def check_labels(path: Path, labels: np.ndarray, n_classes: int, where: str = "", lowest: int = -1) -> None:
    """Labels index ``{where}/class_names`` (-1 = unlabelled; an attribute column also has -2,
    ``lowest``): anything else is a damaged cache, which would otherwise be an IndexError far
    downstream or a class that does not exist."""
    bad = np.flatnonzero((labels < lowest) | (labels >= n_classes))
    if len(bad):
        shown = ", ".join(f"row {int(i)}: {int(labels[i])}" for i in bad[:3])
        raise CacheError(
            f"{path} is damaged: {where}/labels has {len(bad)} value(s) outside {lowest} .. {n_classes - 1} "
            f"({where}/class_names has {n_classes} entries), e.g. {shown}; {fix_hint(path)}"
        )


# --------------------------------------------------------------------------- helpers


def _kind(dtype: np.dtype[Any]) -> str | None:
    if h5py.check_string_dtype(dtype) is not None:
        return _STR
    if dtype.kind == "f":
        return _FLOAT
    if dtype.kind in "iu":
        return _INT
    return None


_KIND_WORDS = {_STR: "strings", _INT: "integers", _FLOAT: "floating-point numbers"}


def _dataset_problems(f: h5py.Group, name: str, kind: str, rows: int | None, against: str) -> list[str]:
    ds = f.get(name)
    where = f"{f.name.rstrip('/')}/{name}"
    if ds is None:
        return [f"{where} is missing"]
    if not isinstance(ds, h5py.Dataset):
        return [f"{where} is a group, not a dataset"]
    if ds.ndim != 1:
        return [f"{where} has shape {ds.shape}, expected one dimension"]
    if _kind(ds.dtype) != kind:
        return [f"{where} holds {ds.dtype}, not {_KIND_WORDS[kind]}"]
    if rows is not None and ds.shape[0] != rows:
        return [f"{where} has {ds.shape[0]} entries but {against}"]
    return []


def _group_problems(f: h5py.File, group: str, members: tuple[tuple[str, str], ...], rows: int | None) -> list[str]:
    g = f.get(group)
    if g is None:
        return [f"/{group} is missing"]
    if not isinstance(g, h5py.Group):
        return [f"/{group} is a dataset, not a group"]
    problems: list[str] = []
    lead_name = members[0][0]
    lead = g.get(lead_name)
    for name, kind in members:
        if rows is not None:  # per-row datasets: as long as /features
            length, against = rows, f"/features has {rows} rows"
        elif name != lead_name and isinstance(lead, h5py.Dataset) and lead.ndim == 1:
            length, against = int(lead.shape[0]), f"/{group}/{lead_name} has {lead.shape[0]}"
        else:
            length, against = None, ""
        problems += _dataset_problems(g, name, kind, length, against)
    return problems


def _scalar(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _show(v: Any) -> str:
    v = _scalar(v)
    return repr(v.decode(errors="replace") if isinstance(v, bytes) else v)[:60]
