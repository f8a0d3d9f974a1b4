"""Stage: feature cache -> head directory. ``fit_head(cfg) -> FitSummary``.

Writes ``HEAD_DIR/``:

* ``head.joblib`` - the fitted scikit-learn estimator (pickle: trust only your own);
* ``head.npz`` - the same head as plain tensors, which export uses (no unpickling);
* ``head.json`` - backbone fingerprint, class names, chosen C and the validation curve,
  metrics (accuracy, macro-F1, per-class precision/recall), sha256 of the two files above;
* ``split.json`` - which rows (by content hash) were validation, so fine-tuning can be compared
  with the linear probe on identical photos;
* ``config.json`` - the configuration used.
"""

from __future__ import annotations

import datetime as _dt
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np

from . import __version__
from .backbones import sha256_file
from .cache import Cache
from .config import FitHeadConfig, save_resolved
from .errors import InputError
from .heads import LogisticHead, classification_metrics, sweep_c

HEAD_SCHEMA_VERSION = 1


@dataclass
class FitSummary:
    path: Path
    metrics: dict[str, Any]
    C: float
    n_train: int
    n_val: int
    seconds: float

    def line(self) -> str:
        m = self.metrics
        return (
            f"{self.path}: validation accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} "
            f"on {self.n_val} photos (C={self.C:.3g}, {self.n_train} train, {self.seconds:.1f}s)"
        )


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class: shuffle, hold out round(n * fraction) rows (at least one if the class has
    two or more), deterministically for a given seed. Returns (train_idx, val_idx)."""
    if not 0.0 < val_fraction < 1.0:
        raise InputError(f"--val-fraction must be between 0 and 1, not {val_fraction}")
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        n_val = 0 if len(idx) < 2 else max(1, int(round(len(idx) * val_fraction)))
        val.extend(idx[:n_val])
        train.extend(idx[n_val:])
    return np.sort(np.array(train, dtype=np.int64)), np.sort(np.array(val, dtype=np.int64))


def fit_head(cfg: FitHeadConfig) -> FitSummary:
    t0 = time.perf_counter()
    if cfg.head != "logreg":
        raise InputError(f"unknown head {cfg.head!r}; available: logreg")
    with Cache(cfg.cache) as cache:
        labels_all = cache.labels
        rows = np.flatnonzero(labels_all >= 0)
        if len(rows) == 0:
            raise InputError(
                f"{cfg.cache} has no labelled rows; extract a folder of class folders (images/<class>/*.jpg)"
            )
        present = np.unique(labels_all[rows])
        all_names = cache.class_names
        if len(present) < 2:
            only = all_names[int(present[0])]
            raise InputError(
                f"{cfg.cache} has labelled photos of one class only ({only!r}); a classifier needs at least two"
            )
        class_names = [all_names[int(i)] for i in present]
        remap = {int(old): new for new, old in enumerate(present)}
        y = np.array([remap[int(v)] for v in labels_all[rows]], dtype=np.int64)
        X = cache.features(rows)
        hashes = [cache.content_hash[i] for i in rows] if len(rows) < 10_000_000 else []
        fingerprint = cache.fingerprint
        cache_attrs = cache.attrs

    tr, va = stratified_split(y, cfg.val_fraction, cfg.seed)
    if len(va) == 0:
        raise InputError("too few labelled photos for a validation split: give each class at least two")
    if cfg.c is None:
        best_c, curve = sweep_c(X[tr], y[tr], X[va], y[va], class_weight=cfg.class_weight, max_iter=cfg.max_iter)
    else:
        best_c, curve = float(cfg.c), []
    probe = LogisticHead(C=best_c, class_weight=cfg.class_weight, max_iter=cfg.max_iter).fit(X[tr], y[tr])
    metrics = classification_metrics(y[va], probe.predict(X[va]), class_names)
    metrics["split"] = "validation"
    # Final head: same C, refit on train + validation (more data for the deployed model).
    head = LogisticHead(C=best_c, class_weight=cfg.class_weight, max_iter=cfg.max_iter).fit(X, y)

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    joblib.dump(head, out / "head.joblib")
    state = head.torch_state()
    np.savez(out / "head.npz", weight=state["weight"], bias=state["bias"])
    (out / "split.json").write_text(
        json.dumps({"seed": cfg.seed, "val_fraction": cfg.val_fraction, "val_content_hash": [hashes[i] for i in va]})
        + "\n"
    )
    meta = {
        "schema_version": HEAD_SCHEMA_VERSION,
        "kind": "logreg",
        "class_names": class_names,
        "C": best_c,
        "c_sweep": curve,
        "metrics": metrics,
        "n_train": len(tr),
        "n_val": len(va),
        "fingerprint": fingerprint,
        "cache": str(Path(cfg.cache).resolve()),
        "cache_updated": cache_attrs.get("updated"),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "headstart_version": __version__,
        "files": {"head.joblib": sha256_file(out / "head.joblib"), "head.npz": sha256_file(out / "head.npz")},
    }
    (out / "head.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    save_resolved(cfg, out / "config.json", C=best_c)
    return FitSummary(out, metrics, best_c, len(tr), len(va), time.perf_counter() - t0)
