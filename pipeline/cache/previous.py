"""The committed index as the next ``extract`` run sees it: made ready under the writer lock
(cleaned up after killed writers, converted from schema v1, checked against this run's
backbone) and read as :class:`PreviousIndex`, its per-row data as stored arrays. No torch here."""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import CacheError
from ..models.fingerprint import Fingerprint
from . import statcache
from .h5io import Column
from .index import migrate_v1
from .scan import INPUTS_ATTR, LabelColumns
from .segments import remove_stale_temporaries, set_aside_damaged
from .store import Cache


@dataclass
class PreviousIndex:
    """What the committed index says that the next run needs, without any feature bytes. Its
    per-row data stay arrays as stored; a run that commits looks rows up in them with numpy
    (:meth:`locations_of`, :attr:`label_columns`), an unchanged re-run (``inputs``) not at all."""

    attrs: dict[str, Any]
    segment_rows: dict[str, int]  # the index's segments, in its order
    dtype: str
    stat: statcache.Remembered  # the stat cache, as the file check takes it
    rejected: dict[str, tuple[str, str]]  # content hash -> (reason, limits): known not to decode
    n_rows: int
    class_names: list[str]
    skipped: list[tuple[str, str]]
    _hashes: np.ndarray  # S32, as stored: never decoded whole
    _locations: tuple[list[str], np.ndarray, np.ndarray]  # segment names; each row's index into them, its row
    _labels: np.ndarray
    _columns: dict[str, Column]

    @property
    def inputs(self) -> str | None:
        """The inputs_digest it was committed with (None: not a fixed point, or older)."""
        v = self.attrs.get(INPUTS_ATTR)
        return str(v) if v else None

    def locations_of(self, hashes: Collection[str]) -> Iterator[tuple[str, tuple[str, int]]]:
        """``(content hash, (segment, row))`` of each of ``hashes`` that the index holds: one
        sorted intersection with its keys as stored, not a dict of every row of the index (with
        the set of its keys, about a sixth of the memory of a run that commits)."""
        names, seg, row = self._locations
        wanted = list(hashes)
        _, at, of = np.intersect1d(
            np.asarray(self._hashes, dtype="S32"),
            np.array(wanted, dtype="S32"),
            assume_unique=True,
            return_indices=True,
        )
        where = zip(map(names.__getitem__, seg[at].tolist()), row[at].tolist(), strict=True)
        return zip(map(wanted.__getitem__, of.tolist()), where, strict=True)

    @functools.cached_property
    def label_columns(self) -> LabelColumns:  # what the removed and relabelled counts compare
        return LabelColumns.of(self._hashes, self._labels, self.class_names, self._columns)


def previous_index(out: Path, c: Cache) -> PreviousIndex:
    """The index ``c`` (at ``out``) as :class:`PreviousIndex`; a schema-v1 cache is an error
    (extract converts it first)."""
    if c.schema_version < 2:
        raise CacheError(f"{out} is still in schema v{c.schema_version}; run extract again to convert it")
    hashes = c.stored("content_hash")
    return PreviousIndex(
        attrs=c.attrs,
        segment_rows=c.segment_rows,
        dtype=c.dtype,
        stat=statcache.Remembered.of(c.stat_table()),
        rejected=c.rejected,
        n_rows=len(hashes),
        class_names=c.class_names,
        skipped=c.skipped,
        _hashes=hashes,
        _locations=(c.segments, *c.location_arrays()),
        _labels=c.labels,
        _columns=c.attributes(),
    )


def prepare(out: Path, fp: Fingerprint, *, rebuild: bool) -> tuple[list[tuple[str, str]], PreviousIndex | None]:
    """Under the writer lock, before any rank writes: clean up after killed writers, set
    damaged segment files aside, refuse a cache of another configuration, convert a schema-v1
    cache (start over on --rebuild). Returns the segments set aside, with why, and what the
    index says (:func:`read_previous`; read in the same open of the index as the checks)."""
    remove_stale_temporaries(out)
    if rebuild or not out.exists():
        return ([] if rebuild else set_aside_damaged(out, set())), None
    with Cache(out) as c:
        check_fingerprint(out, c.fingerprint, fp)
        version, indexed = c.schema_version, set(c.segments)
        old = previous_index(out, c) if version >= 2 else None
    if version == 1:
        migrate_v1(out)
        old = read_previous(out, rebuild=rebuild)
    return set_aside_damaged(out, indexed), old


def read_previous(out: Path, *, rebuild: bool) -> PreviousIndex | None:
    """The committed index, if it is to be reused: keys, row locations and the stat cache."""
    if rebuild or not out.exists():
        return None
    with Cache(out) as c:
        return previous_index(out, c)


def check_fingerprint(out: Path, have: Fingerprint, want: Fingerprint) -> None:
    diff = have.diff(want)
    if diff:
        raise CacheError(
            f"{out} was extracted with {have.describe()} but this run uses {want.describe()} "
            f"({'; '.join(diff)}); re-run with --backbone {have.backbone} and the same options, "
            f"or pass --rebuild to start the cache over, or choose another --out"
        )
