"""The fit-head run: resolve the attributes to fit, fit each one's head, write the head directory."""

from __future__ import annotations

import time

from ..artifacts.head_dir import write_head
from ..cache.store import Cache
from ..config import FitHeadConfig, save_resolved
from ..data.attributes import Target, resolve_targets
from ..data.labels import LabelMap
from ..errors import InputError
from ..probe.kinds import head_kind
from .common import FitSummary, Fitted
from .multilabel import fit_multi
from .single import fit_single
from .zeroshot import fit_zeroshot


def resolve_solver(device: str) -> tuple[str, str]:
    """``--device`` -> (solver, torch device). CUDA: torch L-BFGS on the GPU; CPU: scikit-learn."""
    from ..core.runtime import resolve_device

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
    fitted: list[Fitted] = []
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
                    fitted.append(fit_multi(cfg, cache, t))
                elif kind.needs_text:
                    fitted.append(fit_zeroshot(cfg, kind, cache, t))
                else:
                    fitted.append(fit_single(cfg, kind, cache, t, solver, device))
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


def attribute_targets(cache: Cache, label_maps: list[LabelMap], wanted: tuple[str, ...] = ()) -> list[Target]:
    """The attributes of ``cache`` to fit, through their label maps (data/attributes.py)."""
    columns = {name: (col.values, col.labels) for name, col in cache.columns().items()}
    return resolve_targets(cache.label_column, columns, label_maps, wanted)
