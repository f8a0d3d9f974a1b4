"""Stage: feature cache -> catalog audit report. ``audit(cfg) -> AuditSummary``.

Everything comes from the cached features; no photo is decoded again (thumbnails aside).

1. Labels through the label map (``--classes``, or the one of ``--head``), as fit-head does.
2. The head fit-head would fit: its kind and options, C swept on fit-head's validation split
   (the same grouped split and sweep), or kind, C and options read from ``--head HEAD_DIR``.
3. Out-of-fold probabilities: ``--folds`` heads on stratified folds grouped by near duplicate
   (:mod:`pipeline.probe.crossfit`).
4. ``label_issues.csv`` (confident learning, :mod:`pipeline.probe.label_issues`),
   ``overlaps.csv`` (pairs photos move between out of fold, with a ``[rename]`` line),
   ``duplicates.csv`` and ``outliers.csv`` (:mod:`pipeline.probe.neighbours`), ``label_next.csv``
   (uncertainty-weighted k-means over the most uncertain unlabelled rows,
   :func:`pipeline.probe.label_next.weighted_kmeans`; docs/benchmarks.md "Audit" compares it with
   k-center, BADGE, margin alone and random), and ``report.html``
   (:mod:`pipeline.artifacts.audit_report`, which says what each file holds).

``--apply FILE`` does none of that: it reads the rows of ``label_issues.csv`` a person kept and
writes ``OUT/relabelled.csv``, a manifest for ``headstart extract`` with their new labels.

Memory: the labelled rows' features as float32 for the heads (as fit-head in memory, about
``12 * N * D`` bytes) plus every row's unit features as float16 (``2 * N * D``: 2.6 GB for a
million 1280-d rows) for the neighbour searches.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .artifacts.audit_report import AuditTables, summarise, write_audit
from .artifacts.relabel import apply_accepted
from .cache.store import Cache, require_finite
from .config import AuditConfig, FitHeadConfig, save_resolved
from .data.labels import LabelMap, apply_label_map
from .errors import CacheError, InputError
from .probe import label_next, neighbours
from .probe.crossfit import cross_fit, grouped_folds
from .probe.kinds import head_kind
from .probe.label_issues import find_label_issues, overlapping_pairs
from .probe.rows import blas_threads_for
from .probe.splits import grouped_split, near_duplicate_groups

POOL_ROWS = 100_000  # unlabelled rows label-next chooses from (a random sample above)
BYTES_PER_LABELLED = 12  # float32 features + a fold's train copy + the head's standardised copy
MERGE_SHARE = 1 / 3  # a pair of classes swapping this share of photos out of fold: suggest a merge


@dataclass
class AuditSummary:
    path: Path
    counts: dict[str, Any]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        c = self.counts
        if "relabelled" in c:
            return f"{self.path}: {c['relabelled']} photos relabelled, {c['rows']} rows listed ({self.seconds:.1f}s)"
        return (
            f"{self.path / 'report.html'}: {c['label_issues']} label issues, {c['overlaps']} overlapping pairs "
            f"({c['merge_suggestions']} to merge), {c['duplicate_clusters']} duplicate clusters "
            f"({c['spanning_clusters']} across categories), {c['outliers']} outliers, {c['label_next']} to label "
            f"next; out-of-fold accuracy {c['oof_accuracy']:.3f} on {c['labelled']} photos ({self.seconds:.1f}s)"
        ) + "".join(f"\nwarning: {w}" for w in self.warnings)

    def to_json(self) -> str:
        body = {"path": str(self.path), **self.counts, "seconds": round(self.seconds, 3), "warnings": self.warnings}
        return json.dumps(body, indent=2, ensure_ascii=False)


def _head_choice(cfg: AuditConfig) -> tuple[str, FitHeadConfig, float | None, LabelMap | None, Any]:
    """(kind, fit-head options, C or None = sweep, label map, near-duplicate threshold). The
    options are a FitHeadConfig - fit-head's defaults, or the head's - so the heads are built
    from exactly what fit-head builds them from."""
    label_map = LabelMap.load(cfg.classes) if cfg.classes else None
    fit = dataclasses.replace(FitHeadConfig(cache=cfg.cache), class_weight=cfg.class_weight, seed=cfg.seed)
    if cfg.head is None:
        return fit.head, fit, None, label_map, cfg.near_duplicate_threshold
    from .artifacts.head_dir import read_head_meta

    head = Path(cfg.head)
    meta = read_head_meta(head)
    if cfg.attribute is not None and cfg.attribute != meta.get("attribute", cfg.attribute):
        entry = next((a for a in meta.get("attributes") or [] if a.get("name") == cfg.attribute), None)
        if entry is None:
            raise InputError(f"{head} has no head for attribute {cfg.attribute!r}; leave out --head or fit one")
        head = head / str(entry["dir"])
        meta = read_head_meta(head)
    try:
        used = json.loads((head / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        used = {}
    options = dataclasses.replace(
        fit, class_weight=used.get("class_weight", cfg.class_weight), max_iter=int(used.get("max_iter", fit.max_iter)),
        hidden=int(used.get("hidden", fit.hidden)),
    )  # fmt: skip
    if label_map is None:
        label_map = LabelMap.from_record(meta.get("label_map"))
    threshold = (meta.get("split") or {}).get("near_duplicate_threshold", cfg.near_duplicate_threshold)
    return str(meta.get("kind", "logreg")), options, meta.get("C"), label_map, threshold


def _column(cache: Cache, attribute: str | None, label_map: LabelMap | None) -> tuple[list[str], np.ndarray]:
    """The labels audited: the label column's, or ``--attribute``'s (single-label only: the
    confident-learning rule ranks one given class per photo against the others)."""
    from .data.attributes import looks_multi_label

    name = attribute or cache.label_column
    col = cache.column(name)
    values, labels = col.values, col.labels
    if looks_multi_label(values) or (label_map is not None and label_map.multi_label):
        raise InputError(
            f"{name!r} is a multi-label attribute; audit finds label issues of single-label ones "
            "(one given class per photo): audit another --attribute"
        )
    return values, labels


def _available_memory() -> float:
    """Half the available RAM, as fit-head's default budget."""
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2
    except (ValueError, OSError):
        return 8e9


def _solver(device: str) -> tuple[str, str]:
    if device == "cpu":
        return "sklearn", "cpu"  # no torch import on the common path
    from .core.runtime import resolve_device

    dev = resolve_device(device)
    return ("torch", str(dev)) if dev.type == "cuda" else ("sklearn", "cpu")


def _bar(cfg: AuditConfig, desc: str) -> Any:
    return lambda it: tqdm(it, desc=desc, disable=not cfg.progress, leave=False)


def audit(cfg: AuditConfig) -> AuditSummary:
    t0 = time.perf_counter()
    if cfg.apply:
        path, counts = apply_accepted(Path(cfg.cache), Path(cfg.apply), Path(cfg.out), cfg.attribute)
        return AuditSummary(path, counts, time.perf_counter() - t0)
    kind_name, options, chosen_c, label_map, nd_threshold = _head_choice(cfg)
    kind = head_kind(kind_name)
    if getattr(kind, "needs_text", False):
        raise InputError(
            f"{cfg.head} is a {kind.name} head, built from class prompts, not fitted on photos: there is nothing "
            "to cross-fit; leave out --head to audit with the head fit-head fits by default"
        )
    solver, device = _solver(cfg.device)
    warnings: list[str] = []
    with Cache(cfg.cache) as cache:
        if cfg.head is not None:
            _check_same_features(cache, Path(cfg.head))
        values, labels = _column(cache, cfg.attribute, label_map)
        mapped = apply_label_map(label_map, values, labels)
        lab = np.flatnonzero(mapped.y >= 0)
        unl = np.flatnonzero(labels < 0)
        names = mapped.class_names
        if len(names) < 2:
            raise InputError(
                f"{cfg.cache} has labelled photos of {len(names)} class(es); an audit cross-fits a classifier "
                "and needs at least two (extract a folder of class folders, images/<class>/*.jpg)"
            )
        paths, hashes = cache.paths, cache.content_hash
        root = Path(str(cache.attrs.get("image_root", "")))
        y = mapped.y[lab]
        if int((np.bincount(y) >= 2).sum()) < 2:
            raise InputError(
                f"{cfg.cache} has too few labelled photos to cross-fit ({len(lab)} in {len(names)} classes): "
                "give at least two classes two or more photos each"
            )
        need = float(cache.feature_dim) * (
            BYTES_PER_LABELLED * len(lab) + 2 * cache.n_rows + 4 * min(len(unl), POOL_ROWS)
        )
        if need > _available_memory():
            raise InputError(
                f"auditing {cache.n_rows} rows ({len(lab)} labelled) x {cache.feature_dim} features needs about "
                f"{need / 1e9:.1f} GB of memory, more than half of what is available "
                f"({_available_memory() / 1e9:.1f} GB); run it on a machine with more memory"
            )
        X = cache.features(lab)
        require_finite(cfg.cache, X, lab, [paths[int(r)] for r in lab])
        U = np.empty((cache.n_rows, cache.feature_dim), np.float16)
        for start, chunk in cache.iter_features():
            if not np.isfinite(chunk).all():
                rows = np.arange(start, start + len(chunk))
                require_finite(cfg.cache, chunk, rows, [paths[int(r)] for r in rows])
            U[start : start + len(chunk)] = neighbours.unit(chunk)
        rng = np.random.default_rng(cfg.seed)
        pool = unl if len(unl) <= POOL_ROWS else np.sort(rng.choice(unl, POOL_ROWS, replace=False))
        X_pool = cache.features(pool)

    with blas_threads_for(len(lab) * X.shape[1]):
        groups = near_duplicate_groups(lambda idx: X[idx], y, nd_threshold)
        c_value, swept = chosen_c, False
        if kind.uses_c and c_value is None:
            from .probe.selection import sweep_c

            split = grouped_split(y, groups, options.val_fraction, cfg.seed)
            if len(split.val) and len(np.unique(y[split.train])) >= 2:
                c_value, _ = sweep_c(
                    X[split.train], y[split.train], X[split.val], y[split.val], class_weight=options.class_weight,
                    max_iter=options.max_iter, solver=solver, device=device,
                )  # fmt: skip
                swept = True
        c_used = float(c_value) if c_value is not None else 1.0
        folds = grouped_folds(y, groups, cfg.folds, cfg.seed)
        cf = cross_fit(
            X, y, folds, lambda: kind.estimator(options, C=c_used, solver=solver, device=device),
            extra=X_pool, progress=_bar(cfg, "cross-fit"),
        )  # fmt: skip
    if folds.ungrouped_classes:
        listed = ", ".join(names[c] for c in folds.ungrouped_classes[:5])
        warnings.append(
            f"photos of {len(folds.ungrouped_classes)} class(es) were too alike to fold by near-duplicate group "
            f"({listed}{', ...' if len(folds.ungrouped_classes) > 5 else ''}): twins may vouch for each other there"
        )
    unscored = int((~cf.scored).sum())
    if unscored:
        warnings.append(f"{unscored} photo(s) of classes with a single photo were not scored; add photos")

    issues = find_label_issues(cf.oof, y, scored=cf.scored)
    predicted = cf.oof.argmax(1)
    ok = cf.scored
    pairs = overlapping_pairs(y[ok], predicted[ok], len(names))
    dup_pairs, dup_method = neighbours.near_duplicate_pairs(U, cfg.duplicate_threshold, seed=cfg.seed)
    dup_clusters = neighbours.clusters(len(U), dup_pairs)
    geometry = neighbours.class_geometry(U, lab, y, len(names))
    out_score, out_nearest = neighbours.outlier_scores(U, geometry)
    picks, gains = label_next.weighted_kmeans(
        U[pool], label_next.margin_uncertainty(cf.extra) if cf.extra is not None else np.ones(0),
        cfg.budget if len(pool) else 0, seed=cfg.seed, progress=_bar(cfg, "label next"),
    )  # fmt: skip

    label_of = np.full(len(U), -1, np.int64)
    label_of[lab] = y
    tables = AuditTables(
        paths=paths, files=[root / p for p in paths], hashes=hashes, class_names=names, label_of=label_of,
        labelled=lab, issues=issues, oof=cf.oof, pairs=pairs, merge_share=MERGE_SHARE, dup_pairs=dup_pairs,
        dup_clusters=dup_clusters, outlier_score=out_score, outlier_nearest=out_nearest,
        outlier_threshold=cfg.outlier_threshold, pool=pool, picks=picks, gains=gains,
        pool_proba=cf.extra if cf.extra is not None else np.zeros((0, len(names))),
    )  # fmt: skip
    oof_accuracy = float((predicted[ok] == y[ok]).mean()) if ok.any() else 0.0
    facts = {
        "cache": str(Path(cfg.cache).resolve()),
        "rows": len(U),
        "labelled": len(lab),
        "unlabelled": len(unl),
        "classes": len(names),
        "head": kind.name,
        "C": c_used if kind.uses_c else None,
        "C_swept": swept,
        "folds": folds.k,
        "oof_accuracy": oof_accuracy,
        "duplicate_search": dup_method,
        "label_map": label_map.source if label_map else None,
    }
    summary = AuditSummary(Path(cfg.out), {**facts, **summarise(tables)}, 0.0, warnings)

    def more(stage: Path) -> None:  # the last files, once everything else is written
        summary.seconds = time.perf_counter() - t0
        save_resolved(cfg, stage / "config.json", C=facts["C"], solver=solver, head_kind=kind.name)
        (stage / "summary.json").write_text(summary.to_json() + "\n", encoding="utf-8")

    write_audit(Path(cfg.out), tables, facts, warnings, examples=cfg.examples, raw_csv=cfg.raw_csv, write_more=more)
    return summary


def _check_same_features(cache: Cache, head: Path) -> None:
    from .artifacts.head_dir import read_head_meta
    from .models.fingerprint import Fingerprint

    want = Fingerprint.from_record(read_head_meta(head)["fingerprint"], source=str(head / "head.json"))
    fp = cache.fingerprint
    if not fp.same_function(want):
        raise CacheError(
            f"{cache.path} was extracted with {fp.backbone} (weights {fp.weights_sha256[:12]}) but {head} was "
            f"fitted on {want.backbone} (weights {want.weights_sha256[:12]}) features; audit the cache the head "
            "was fitted on, or leave out --head"
        )
