"""What the heads of one fit-head run share: the summary, the row source over a cache, the
memory budget, the record of a fitted attribute head and the head.json entries of every head."""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..artifacts.head_dir import AttributeHead
from ..cache.store import Cache
from ..config import FitHeadConfig

BYTES_PER_VALUE_IN_MEMORY = 12  # float32 features + train/val copies + standardised copy


@dataclass
class FitSummary:
    path: Path
    metrics: dict[str, Any]
    C: float | None
    n_train: int
    n_val: int
    seconds: float
    kind: str = "logreg"
    temperature: float = 1.0
    warnings: list[str] = field(default_factory=list)
    attribute: str = ""  # the manifest column ("label" for class folders)
    attributes: list[FitSummary] = field(default_factory=list)  # the other attributes' heads

    def line(self) -> str:
        return "\n".join([self._line(str(self.path)), *(a._line(f"  {a.attribute}") for a in self.attributes)])

    def _line(self, where: str) -> str:
        m = self.metrics
        warnings = "".join(f"\nwarning: {w}" for w in self.warnings)
        if not m:  # a zero-shot head with no labelled photo to validate on
            return f"{where}: zero-shot head from prompts, no labelled photos to validate or calibrate on"
        what = f"C={self.C:.3g}" if self.C is not None else self.kind
        if "micro_f1" in m:  # multi-label
            return (
                f"{where}: validation micro-F1 {m['micro_f1']:.3f}, macro-F1 {m['macro_f1']:.3f}, mean AP "
                f"{m['macro_average_precision']:.3f} over {len(m['per_label'])} labels on {self.n_val} photos "
                f"({what}, {self.n_train} train, {self.seconds:.1f}s)"
            ) + warnings
        named = f" {self.attribute}" if self.attributes else ""
        return (
            f"{where}:{named} validation accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} "
            f"on {self.n_val} photos ({what}, T={self.temperature:.2f}, {self.n_train} train, {self.seconds:.1f}s)"
        ) + warnings


class CacheRows:
    """Rows of an open cache, read from disk on every slice (a ``probe.rows.RowSource``)."""

    is_row_source = True

    def __init__(self, cache: Cache, rows: np.ndarray) -> None:
        self.cache, self.rows = cache, np.asarray(rows, np.int64)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), self.cache.feature_dim)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, slice):
            return self.cache.features(self.rows[key])
        return CacheRows(self.cache, self.rows[key])  # an index array: a smaller lazy view


def memory_budget(cfg: FitHeadConfig) -> float:
    if cfg.max_memory_gb is not None:
        return cfg.max_memory_gb * 1e9
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
    except (ValueError, OSError):
        return 8e9


@dataclass
class Fitted:
    """One attribute's head, fitted, before the head directory is written."""

    head: AttributeHead  # the attribute's name, estimator, kind, head.json and split.json
    summary: FitSummary
    solver: str = "none"


def common_meta(cfg: FitHeadConfig, cache: Cache) -> dict[str, Any]:
    return {
        "fingerprint": cache.fingerprint.to_record(),
        "cache": str(Path(cfg.cache).resolve()),
        "cache_updated": cache.attrs.get("updated"),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "headstart_version": __version__,
    }
