"""A single-label attribute's head in a fit-head run: split, C sweep, probe, calibration, refit."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..artifacts.head_dir import AttributeHead
from ..cache.store import Cache, require_finite
from ..config import FitHeadConfig
from ..data.attributes import Target
from ..data.labels import LabelMap, default_prompts
from ..errors import InputError
from ..probe.calibration import calibration_report, fit_temperature
from ..probe.kinds import KINDS, HeadKind
from ..probe.metrics import classification_metrics
from ..probe.rows import blas_threads_for
from ..probe.selection import sweep_c
from ..probe.splits import grouped_split, groups_by_hash, near_duplicate_groups
from .common import BYTES_PER_VALUE_IN_MEMORY, CacheRows, FitSummary, Fitted, common_meta, memory_budget


def fit_single(cfg: FitHeadConfig, kind: HeadKind, cache: Cache, target: Target, solver: str, device: str) -> Fitted:
    """A single-label attribute's head: the split, the C sweep, the probe, the refit."""
    t0 = time.perf_counter()
    label_map, mapped = target.label_map, target.mapped
    assert mapped is not None
    text: dict[str, Any] | None = None
    with contextlib.ExitStack() as stack:
        tree = label_map.head_tree(mapped.class_names, target.categories) if label_map else None
        rows = np.flatnonzero(mapped.y >= 0)
        if len(rows) == 0:
            raise InputError(
                f"{cfg.cache} has no labelled rows"
                + (" left after the label map" if label_map else "")
                + "; extract a folder of class folders (images/<class>/*.jpg)"
            )
        class_names = mapped.class_names
        if len(class_names) < 2:
            raise InputError(
                f"{cfg.cache} has labelled photos of one class only ({class_names[0]!r}); "
                "a classifier needs at least two"
            )
        y = mapped.y[rows]
        all_hashes = cache.content_hash
        hashes = [all_hashes[i] for i in rows]
        need = float(len(rows)) * cache.feature_dim * BYTES_PER_VALUE_IN_MEMORY
        streamed = need > memory_budget(cfg)
        stack.enter_context(blas_threads_for(len(rows) * cache.feature_dim))
        X: Any
        if cfg.text_prior is not None:
            text = text_record(cache, class_names, label_map)
        if streamed:
            if not kind.streams or text is not None:
                streaming = " or ".join(k.name for k in KINDS.values() if k.streams)
                raise InputError(
                    f"{len(rows)} x {cache.feature_dim} features need about {need / 1e9:.1f} GB, more than "
                    f"--max-memory-gb allows; use --head {streaming}"
                    + (" without --text-prior" if text is not None else "")
                    + " (it streams from the cache) or raise --max-memory-gb"
                )
            solver, device = "torch", device if solver == "torch" else "cpu"
            X = CacheRows(cache, rows)
        else:
            X = cache.features(rows)
            all_paths = cache.paths
            require_finite(cfg.cache, X, rows, [all_paths[int(r)] for r in rows])

        def features_of(idx: np.ndarray) -> np.ndarray:
            return np.asarray(cache.features(rows[idx]) if streamed else X[idx])

        groups = near_duplicate_groups(features_of, y, cfg.near_duplicate_threshold)
        split = grouped_split(y, groups, cfg.val_fraction, cfg.seed)
        tr, va = split.train, split.val
        ungrouped = [class_names[c] for c in split.ungrouped_classes]
        warnings = []
        if ungrouped:
            warnings.append(
                f"photos of {len(ungrouped)} class(es) were too alike to split by near-duplicate group "
                f"({', '.join(ungrouped[:5])}{', ...' if len(ungrouped) > 5 else ''}): their validation photos "
                "were drawn ignoring the groups, so validation may be optimistic for them"
            )
        if len(va) == 0:
            raise InputError("too few labelled photos for a validation split: give each class at least two")
        counts = np.bincount(y[va], minlength=len(class_names))
        unvalidated = [class_names[c] for c in np.flatnonzero(counts == 0)]
        if unvalidated:
            n_photos = np.bincount(y, minlength=len(class_names))
            listed = ", ".join(f"{class_names[c]} ({n_photos[c]} photo{'s' if n_photos[c] != 1 else ''})"
                               for c in np.flatnonzero(counts == 0)[:5])  # fmt: skip
            warnings.append(
                f"{len(unvalidated)} class(es) too small to validate: {listed}{', ...' if len(unvalidated) > 5 else ''}"
                " have no validation photos; they are trained on but left out of the validation macro-F1 - "
                "add photos (two or more per class, five or more to trust the numbers)"
            )
        curve: list[dict[str, float]] = []
        best_c: float | None = None

        def make() -> Any:
            if text is None:
                return kind.estimator(cfg, C=best_c or 1.0, solver=solver, device=device)
            from ..probe.zeroshot import TextPriorHead

            return TextPriorHead(
                text["embeddings"], text["logit_scale"], float(cfg.text_prior or 0), cfg.class_weight, cfg.max_iter
            )

        uses_c = kind.uses_c and text is None  # with a text prior, its weight is the one knob
        if uses_c and cfg.c is None:
            best_c, curve = sweep_c(
                X[tr], y[tr], X[va], y[va], class_weight=cfg.class_weight, max_iter=cfg.max_iter, solver=solver,
                device=device,
            )  # fmt: skip
        elif uses_c:
            best_c = float(cfg.c)  # type: ignore[arg-type]
        probe = make().fit(X[tr], y[tr])
        val_logits = probe.logits(X[va])
        metrics = classification_metrics(y[va], val_logits.argmax(1), class_names)
        metrics["split"] = "validation"
        temperature = fit_temperature(val_logits, y[va]) if cfg.calibrate else 1.0
        calibration = calibration_report(val_logits, y[va], temperature, cfg.unknown_threshold)
        # Final head: same hyper-parameters, refit on train + validation, the probe's temperature.
        head = make().fit(X, y)
        head.temperature_ = temperature

    merged = groups_by_hash(groups, hashes)
    split_record = {
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "near_duplicate_threshold": cfg.near_duplicate_threshold,
        "val_content_hash": [hashes[i] for i in va],
        "fit_content_hash": hashes,  # every photo the final head was fitted on (train + validation)
        "near_duplicate_groups": merged,
    }
    meta = {
        "class_names": class_names,
        "class_ids": mapped.class_ids,
        "absent_classes": mapped.absent,
        "label_map": label_map.record() if label_map else None,
        "tree": tree.record() if tree else None,  # [parents] over these classes (data/tree.py)
        "C": best_c,
        "c_sweep": curve,
        "solver": solver,
        "streamed": streamed,
        "temperature": temperature,
        "unknown_threshold": cfg.unknown_threshold,
        "calibration": calibration,
        "metrics": metrics,
        "n_train": len(tr),
        "n_val": len(va),
        "split": {
            "stratified": True,
            "grouped": cfg.near_duplicate_threshold is not None and cfg.near_duplicate_threshold < 1,
            "near_duplicate_threshold": cfg.near_duplicate_threshold,
            "near_duplicate_groups": len(merged),
            "rows_in_near_duplicate_groups": sum(len(g) for g in merged),
            "ungrouped_classes": ungrouped,
        },
        "warnings": warnings,
        **({"text_prior": {"weight": cfg.text_prior, **text["record"]}} if text is not None else {}),
        **common_meta(cfg, cache),
    }
    summary = FitSummary(
        Path(cfg.out), metrics, best_c, len(tr), len(va), time.perf_counter() - t0, kind.name, temperature, warnings,
        attribute=target.name,
    )  # fmt: skip
    return Fitted(AttributeHead(target.name, head, kind.name, meta, split_record), summary, solver)


def text_record(cache: Cache, class_names: list[str], label_map: LabelMap | None) -> dict[str, Any]:
    """The class embeddings of the cache's backbone's text tower (same weights, sha256 checked)."""
    from ..models.text import text_tower
    from ..probe.zeroshot import class_text_embeddings

    tower = text_tower(cache.fingerprint)
    prompts = [label_map.prompts_for(n) if label_map else default_prompts(n) for n in class_names]
    record = {
        "logit_scale": tower.logit_scale,
        "tokenizer": tower.tokenizer,
        "prompts": dict(zip(class_names, prompts, strict=True)),
    }
    return {"embeddings": class_text_embeddings(tower.encode, prompts), "logit_scale": tower.logit_scale,
            "record": record}  # fmt: skip
