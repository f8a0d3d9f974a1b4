"""Stage: feature cache -> head directory. ``fit_head(cfg) -> FitSummary``.

1. Labels go through the label map (``--classes``): merge, rename, drop, stable class ids.
2. Validation split: stratified by class and grouped so near-duplicate photos (feature cosine
   above ``--near-duplicate-threshold``) stay on one side (``splits.py``).
3. Head: logistic regression with C swept on validation log-loss (default), an MLP, or nearest
   centroid (few-shot). A probe trained on the training rows gives the validation metrics and
   the temperature (scaling on validation log-loss); the final head is refit on train +
   validation and carries that temperature. (Why not calibrate the final head directly: it has
   seen every labelled photo, so nothing is left to calibrate it on honestly.)

Heads from text (image-text backbones only: :mod:`pipeline.models.text`): ``--head zeroshot``
is built from the class prompts of ``--classes`` (``[prompts]``; needs no photo: every labelled
one is a validation photo, only its temperature is fitted), and ``--text-prior WEIGHT`` keeps the
logistic head near that zero-shot head (:mod:`pipeline.probe.zeroshot`).

Writes ``HEAD_DIR/`` (``head.joblib``, ``head.npz``, ``head.json``, ``split.json``,
``config.json``; what each holds: :mod:`pipeline.artifacts.head_dir`, which writes it atomically).
The kinds (``--head``) and what each exports as: :mod:`pipeline.probe.kinds`.

Device: ``--device`` resolves once (:func:`resolve_solver`) and every fit uses the result - the
C sweep, the validation probe and the final refit alike.

Memory: in memory, about ``12 * N * D`` bytes for N labelled rows of D features (float32
features, the train/validation copies, scikit-learn's standardised copy). Above
``--max-memory-gb`` (default: half the available RAM) logistic regression streams the rows from
the cache in chunks on every L-BFGS pass (torch solver): slower, but memory is one chunk.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .artifacts.head_dir import AttributeHead, write_head
from .cache.store import Cache, require_finite
from .config import FitHeadConfig, save_resolved
from .data.attributes import Target, resolve_targets
from .data.labels import LabelMap, default_prompts
from .errors import InputError
from .probe.calibration import calibration_error, fit_temperature, mean_log_loss, softmax
from .probe.kinds import KINDS, HeadKind, head_kind
from .probe.metrics import at_threshold, classification_metrics
from .probe.rows import blas_threads_for
from .probe.selection import sweep_c
from .probe.splits import grouped_split, near_duplicate_groups

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


def resolve_solver(device: str) -> tuple[str, str]:
    """``--device`` -> (solver, torch device). CUDA: torch L-BFGS on the GPU; CPU: scikit-learn."""
    from .core.runtime import resolve_device

    dev = resolve_device(device)
    return ("torch", str(dev)) if dev.type == "cuda" else ("sklearn", "cpu")


def fit_head(cfg: FitHeadConfig) -> FitSummary:
    """Fit one head per attribute (:mod:`pipeline.data.attributes`) and write them as one head
    directory: the first single-label attribute's head at its top (what predict's ``label``
    answers), every other attribute's under ``attributes/`` (:mod:`pipeline.artifacts.head_dir`)."""
    t0 = time.perf_counter()
    kind = head_kind(cfg.head)
    if cfg.unknown_threshold is not None and not 0.0 <= cfg.unknown_threshold <= 1.0:
        raise InputError(f"--unknown-threshold is a probability between 0 and 1, not {cfg.unknown_threshold}")
    if cfg.text_prior is not None and kind.name != "logreg":
        raise InputError(f"--text-prior applies to --head logreg, not {kind.name} (a zero-shot head: --head zeroshot)")
    label_maps = [LabelMap.load(path) for path in cfg.classes]
    solver, device = resolve_solver(cfg.device)
    fitted: list[_Fitted] = []
    notes: list[str] = []
    with Cache(cfg.cache) as cache:
        targets = attribute_targets(cache, label_maps, cfg.attribute)
        if kind.needs_text and len(targets) > 1:  # prompts name the classes of one attribute
            notes.append(f"--head {kind.name} fits the {targets[0].name!r} attribute only")
            targets = targets[:1]
        several = len(targets) > 1
        for t in targets:
            try:
                if t.multi is not None:
                    fitted.append(_fit_multi(cfg, cache, t))
                elif kind.needs_text:
                    fitted.append(_fit_zeroshot(cfg, kind, cache, t))
                else:
                    fitted.append(_fit_single(cfg, kind, cache, t, solver, device))
            except InputError as e:
                if not several or t is targets[0] or t.name in cfg.attribute:
                    raise InputError(f"attribute {t.name!r}: {e}" if several else str(e)) from None
                notes.append(f"attribute {t.name!r} was not fitted: {e}")
    main, rest = fitted[0], fitted[1:]
    meta = {**main.head.meta, "attribute": main.head.name}
    meta["warnings"] = [*meta.get("warnings", []), *notes]
    out = write_head(
        cfg.out,
        main.head.estimator,
        kind=main.head.kind,
        meta=meta,
        split=main.head.split,
        write_config=lambda path: save_resolved(
            cfg, path, C=main.summary.C, solver=main.solver, temperature=main.summary.temperature
        ),
        attributes=[f.head for f in rest],
    )
    summary = main.summary
    summary.path, summary.seconds = out, time.perf_counter() - t0
    summary.warnings = [*summary.warnings, *notes]
    summary.attributes = [f.summary for f in rest]
    return summary


@dataclass
class _Fitted:
    """One attribute's head, fitted, before the head directory is written."""

    head: AttributeHead  # the attribute's name, estimator, kind, head.json and split.json
    summary: FitSummary
    solver: str = "none"


def attribute_targets(cache: Cache, label_maps: list[LabelMap], wanted: tuple[str, ...] = ()) -> list[Target]:
    """The attributes of ``cache`` to fit, through their label maps (data/attributes.py)."""
    label_column = cache.label_column or "label"
    columns = {label_column: (cache.class_names, cache.labels)}
    for name, col in cache.attributes().items():
        columns[name] = (col.values, col.labels)
    return resolve_targets(label_column, columns, label_maps, wanted)


def _fit_multi(cfg: FitHeadConfig, cache: Cache, target: Target) -> _Fitted:
    """A multi-label attribute's head (probe/multilabel.py): rows with the column filled in,
    a grouped split stratified by each photo's rarest label, C on validation log-loss,
    thresholds from the probe, the final head refit on train + validation."""
    from .probe.multilabel import (
        MultiLabelHead,
        choose_thresholds,
        multilabel_metrics,
        sweep_c_multilabel,
    )

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
    counts = Y.sum(0)
    rarest = np.where(Y.any(1), np.argmin(np.where(Y > 0, counts[None, :], np.iinfo(np.int64).max), axis=1), len(names))
    groups = near_duplicate_groups(lambda idx: X[idx], rarest, cfg.near_duplicate_threshold)
    split = grouped_split(rarest, groups, cfg.val_fraction, cfg.seed)
    tr, va = split.train, split.val
    if len(va) == 0 or len(tr) == 0:
        raise InputError(f"too few photos for a validation split of {target.name!r}")
    warnings = []
    few = [names[j] for j in np.flatnonzero(Y[va].sum(0) == 0)]
    if few:
        warnings.append(
            f"{len(few)} label(s) of {target.name!r} have no validation photo ({', '.join(few[:5])}"
            f"{', ...' if len(few) > 5 else ''}): their threshold stays at 0.5 and their metrics are empty"
        )
    if cfg.c is None:
        best_c, curve = sweep_c_multilabel(X[tr], Y[tr], X[va], Y[va], class_weight=cfg.class_weight,
                                           max_iter=cfg.max_iter)  # fmt: skip
    else:
        best_c, curve = float(cfg.c), []
    probe = MultiLabelHead(C=best_c, class_weight=cfg.class_weight, max_iter=cfg.max_iter).fit(X[tr], Y[tr])
    val_p = probe.predict_proba(X[va])
    thresholds, short = choose_thresholds(val_p, Y[va], cfg.target_precision)
    if short:
        warnings.append(
            f"{len(short)} label(s) of {target.name!r} cannot reach validation precision {cfg.target_precision} at "
            f"any threshold ({', '.join(names[j] for j in short[:5])}): they use the threshold of their best precision"
        )
    metrics = {**multilabel_metrics(Y[va], val_p, thresholds, names), "split": "validation"}
    head = MultiLabelHead(C=best_c, class_weight=cfg.class_weight, max_iter=cfg.max_iter).fit(X, Y)
    all_hashes = cache.content_hash
    hashes = [all_hashes[int(r)] for r in rows]
    merged = _groups_by_hash(groups, hashes)
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
        **_common_meta(cfg, cache),
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
    return _Fitted(AttributeHead(target.name, head, "multilabel", meta, split_record), summary, "sklearn")


def _common_meta(cfg: FitHeadConfig, cache: Cache) -> dict[str, Any]:
    return {
        "fingerprint": cache.fingerprint.to_record(),
        "cache": str(Path(cfg.cache).resolve()),
        "cache_updated": cache.attrs.get("updated"),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "headstart_version": __version__,
    }


def _fit_single(cfg: FitHeadConfig, kind: HeadKind, cache: Cache, target: Target, solver: str, device: str) -> _Fitted:
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
            text = _text(cache, class_names, label_map)
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
            from .probe.zeroshot import TextPriorHead

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
        calibration = _calibration(val_logits, y[va], temperature, cfg.unknown_threshold)
        # Final head: same hyper-parameters, refit on train + validation, the probe's temperature.
        head = make().fit(X, y)
        head.temperature_ = temperature

    merged = _groups_by_hash(groups, hashes)
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
        **_common_meta(cfg, cache),
    }
    summary = FitSummary(
        Path(cfg.out), metrics, best_c, len(tr), len(va), time.perf_counter() - t0, kind.name, temperature, warnings,
        attribute=target.name,
    )  # fmt: skip
    return _Fitted(AttributeHead(target.name, head, kind.name, meta, split_record), summary, solver)


def _text(cache: Cache, class_names: list[str], label_map: LabelMap | None) -> dict[str, Any]:
    """The class embeddings of the cache's backbone's text tower (same weights, sha256 checked)."""
    from .models.text import text_tower
    from .probe.zeroshot import class_text_embeddings

    tower = text_tower(cache.fingerprint)
    prompts = [label_map.prompts_for(n) if label_map else default_prompts(n) for n in class_names]
    record = {
        "logit_scale": tower.logit_scale,
        "tokenizer": tower.tokenizer,
        "prompts": dict(zip(class_names, prompts, strict=True)),
    }
    return {"embeddings": class_text_embeddings(tower.encode, prompts), "logit_scale": tower.logit_scale,
            "record": record}  # fmt: skip


def _fit_zeroshot(cfg: FitHeadConfig, kind: HeadKind, cache: Cache, target: Target) -> _Fitted:
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
    text = _text(cache, names, label_map)
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
        calibration = _calibration(logits, y, temperature, cfg.unknown_threshold)
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
        **_common_meta(cfg, cache),
    }
    # the weights saw no photo, the temperature saw every labelled one: all are "fitted on"
    split = {"seed": cfg.seed, "val_content_hash": hashes, "fit_content_hash": hashes, "near_duplicate_groups": []}
    summary = FitSummary(
        Path(cfg.out), metrics, None, 0, len(rows), time.perf_counter() - t0, kind.name, temperature,
        attribute=target.name,
    )  # fmt: skip
    return _Fitted(AttributeHead(target.name, head, kind.name, meta, split), summary)


def _calibration(logits: np.ndarray, y: np.ndarray, temperature: float, threshold: float | None) -> dict[str, Any]:
    before, after = softmax(logits), softmax(logits / temperature)
    out: dict[str, Any] = {
        "val_log_loss_before": mean_log_loss(before, y),
        "val_log_loss_after": mean_log_loss(after, y),
        "val_ece_before": calibration_error(before, y),
        "val_ece_after": calibration_error(after, y),
    }
    if threshold is not None:
        u = at_threshold(after, y, threshold)
        out["unknown_threshold"] = {
            "threshold": threshold,
            "val_coverage": u["coverage"],
            "val_accuracy_covered": u["accuracy_answered"],
        }
    return out


def _groups_by_hash(groups: np.ndarray, hashes: list[str]) -> list[list[str]]:
    """Near-duplicate groups with more than one member, as lists of content hashes."""
    members: dict[int, list[str]] = {}
    for i, g in enumerate(groups.tolist()):
        members.setdefault(g, []).append(hashes[i])
    return [m for m in members.values() if len(m) > 1]
