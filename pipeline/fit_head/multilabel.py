"""A multi-label attribute's head in a fit-head run (the method: :mod:`pipeline.probe.multilabel`)."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..artifacts.head_dir import AttributeHead
from ..cache.store import Cache, require_finite
from ..config import FitHeadConfig
from ..data.attributes import Target
from ..errors import InputError
from ..probe.splits import groups_by_hash
from .common import FitSummary, Fitted, common_meta


def fit_multi(cfg: FitHeadConfig, cache: Cache, target: Target) -> Fitted:
    """A multi-label attribute's head (:func:`pipeline.probe.multilabel.fit_multilabel`) on
    every photo but those whose identical files disagree, and its head.json record."""
    from ..probe.multilabel import fit_multilabel

    t0 = time.perf_counter()
    multi = target.multi
    assert multi is not None
    names = multi.class_names
    if len(names) < 1:
        raise InputError(f"{cfg.cache} has no labels in its {target.name!r} column")
    rows = np.flatnonzero(multi.known)  # every photo but those whose identical files disagree
    Y = multi.Y[rows]
    X = cache.features(rows)
    all_paths = cache.paths
    require_finite(cfg.cache, X, rows, [all_paths[int(r)] for r in rows])
    fit = fit_multilabel(
        X, Y, names, target.name, val_fraction=cfg.val_fraction, seed=cfg.seed,
        near_duplicate_threshold=cfg.near_duplicate_threshold, C=cfg.c, class_weight=cfg.class_weight,
        max_iter=cfg.max_iter, target_precision=cfg.target_precision,
    )  # fmt: skip
    head, thresholds, metrics, warnings = fit.head, fit.thresholds, fit.metrics, fit.warnings
    best_c, curve, tr, va, groups = fit.C, fit.curve, fit.train, fit.val, fit.groups
    all_hashes = cache.content_hash
    hashes = [all_hashes[int(r)] for r in rows]
    merged = groups_by_hash(groups, hashes)
    meta = {
        "class_names": names,
        "class_ids": multi.class_ids,
        "absent_classes": multi.absent,
        "multi_label": True,
        "thresholds": [float(t) for t in thresholds],
        "target_precision": cfg.target_precision,
        "label_map": target.label_map.record() if target.label_map else None,
        "C": best_c,
        "c_sweep": curve,
        "solver": "sklearn",
        "temperature": 1.0,
        "metrics": metrics,
        "n_train": len(tr),
        "n_val": len(va),
        "warnings": warnings,
        **common_meta(cfg, cache),
    }
    split_record = {
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "near_duplicate_threshold": cfg.near_duplicate_threshold,
        "val_content_hash": [hashes[i] for i in va],
        "fit_content_hash": hashes,
        "near_duplicate_groups": merged,
    }
    summary = FitSummary(
        Path(cfg.out), metrics, best_c, len(tr), len(va), time.perf_counter() - t0, "multilabel", 1.0, warnings,
        attribute=target.name,
    )  # fmt: skip
    return Fitted(AttributeHead(target.name, head, "multilabel", meta, split_record), summary, "sklearn")
