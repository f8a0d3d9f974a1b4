"""A zero-shot head in a fit-head run: built from class prompts, calibrated on labelled photos."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.head_dir import AttributeHead
from ..cache.store import Cache, require_finite
from ..config import FitHeadConfig
from ..data.attributes import Target
from ..errors import InputError
from ..probe.calibration import calibration_report, fit_temperature
from ..probe.kinds import HeadKind
from ..probe.metrics import classification_metrics
from .common import CacheRows, FitSummary, Fitted, common_meta
from .single import text_record


def fit_zeroshot(cfg: FitHeadConfig, kind: HeadKind, cache: Cache, target: Target) -> Fitted:
    """The zero-shot head: classes from the label map (all of them: no photo is needed) or the
    cache's labelled categories; every labelled photo validates and calibrates it."""
    t0 = time.perf_counter()
    label_map, mapped = target.label_map, target.mapped
    assert mapped is not None
    if label_map is not None and label_map.classes:
        names = sorted(label_map.classes, key=lambda n: label_map.classes[n])
        ids = [label_map.classes[n] for n in names]
    else:
        names, ids = mapped.class_names, mapped.class_ids
    if len(names) < 2:
        raise InputError(
            f"a zero-shot head needs two or more class names, and {cfg.cache} "
            + (f"has labelled photos of {len(names)} class(es)" if names else "has no labelled photos")
            + "; pass --classes classes.toml with a [classes] table (lipstick = 0, ...) and, optionally, [prompts]"
        )
    tree = label_map.head_tree(names, target.categories) if label_map else None
    text = text_record(cache, names, label_map)
    rows = np.flatnonzero(mapped.y >= 0)
    full = np.array([names.index(n) for n in mapped.class_names], np.int64)
    y = full[mapped.y[rows]] if len(rows) else np.zeros(0, np.int64)
    head = kind.estimator(cfg, C=1.0, solver="sklearn", device="cpu")
    head.set_params(text_embeddings=text["embeddings"], logit_scale=text["logit_scale"]).fit()
    metrics: dict[str, Any] = {}
    temperature, calibration = 1.0, {}
    hashes = [cache.content_hash[int(i)] for i in rows]
    if len(rows):
        X = CacheRows(cache, rows)  # read in chunks: a zero-shot head may meet a whole catalog
        logits = head.logits(X)
        if not np.isfinite(logits).all():
            require_finite(cfg.cache, cache.features(rows), rows, [cache.paths[int(r)] for r in rows])
        metrics = {**classification_metrics(y, logits.argmax(1), names), "split": "all labelled photos"}
        temperature = fit_temperature(logits, y) if cfg.calibrate else 1.0
        calibration = calibration_report(logits, y, temperature, cfg.unknown_threshold)
    head.temperature_ = temperature
    meta = {
        "class_names": names,
        "class_ids": ids,
        "absent_classes": [],
        "label_map": label_map.record() if label_map else None,
        "tree": tree.record() if tree else None,
        "C": None,
        "temperature": temperature,
        "unknown_threshold": cfg.unknown_threshold,
        "calibration": calibration,
        "metrics": metrics,
        "n_train": 0,
        "n_val": len(rows),
        "zeroshot": text["record"],
        "warnings": [],
        **common_meta(cfg, cache),
    }
    # the weights saw no photo, the temperature saw every labelled one: all are "fitted on"
    split = {"seed": cfg.seed, "val_content_hash": hashes, "fit_content_hash": hashes, "near_duplicate_groups": []}
    summary = FitSummary(
        Path(cfg.out), metrics, None, 0, len(rows), time.perf_counter() - t0, kind.name, temperature,
        attribute=target.name,
    )  # fmt: skip
    return Fitted(AttributeHead(target.name, head, kind.name, meta, split), summary)
