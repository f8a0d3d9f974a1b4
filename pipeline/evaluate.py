"""Stage: score a model or a head on labelled photos -> report directory. ``evaluate(cfg)``.

``MODEL_OR_HEAD`` is an exported model directory (``manifest.json``; native or ONNX - an ONNX
model scores photos, not cached features) or a head directory (``head.json``).
``IMAGES_OR_CACHE`` is a folder of class folders / CSV manifest (the photos are run through the
backbone) or a feature cache (``.h5``; no backbone needed, seconds). A head is
read from ``head.npz`` (tensors; nothing unpickled). True categories go through the label map
the head was trained with, so a report on a merged catalog compares like with like; photos of
categories the model does not know are left out and counted. Photos the head was fitted on
(``split.json`` records their content hashes) are counted and warned about: they are no test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .artifacts.report import Scored, write_report
from .config import EvaluateConfig, save_resolved
from .data.labels import LabelMap
from .data.tree import Tree
from .errors import ArtifactError, CacheError, InputError
from .models.fingerprint import Fingerprint
from .probe.calibration import softmax
from .probe.hierarchy import TreeIndex


@dataclass
class Scorer:
    """A head (torch module on features) plus what is needed to make its features."""

    kind: str  # "model" | "head"
    path: Path
    class_names: list[str]
    head: nn.Module
    fingerprint: Fingerprint
    label_map: LabelMap | None
    unknown_threshold: float | None
    net: nn.Module | None = None  # the backbone, when already loaded (a model)
    fitted: frozenset[str] | None = None  # content hashes the head was fitted on, when known
    fitted_on: str | None = None  # the cache the head was fitted on (heads without ``fitted``)
    session: Any = None  # onnxruntime session of an ONNX model: pixels -> probabilities
    tree: Tree | None = None  # the category tree (classes.toml [parents]) the head carries
    attribute: str | None = None  # the manifest column it answers (None: the label column)
    thresholds: list[float] | None = None  # a multi-label head's, one per label (None: single-label)
    output: str = "probabilities"  # the ONNX output read

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    def logits(self, feats: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.head(torch.from_numpy(np.ascontiguousarray(feats, np.float32))).numpy()

    def backbone(self) -> nn.Module:
        if self.net is None:
            self.net = self.fingerprint.load_backbone(
                made=str(self.path),
                fix="evaluate on the feature cache instead, or export the model on the machine that has them",
            ).net
        return self.net


def load_scorer(path: str | Path, attribute: str | None = None) -> Scorer:
    """The head (or model) at ``path``; with ``attribute``, the head of that attribute."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return _model_scorer(p, attribute)
    if (p / "head.json").is_file():
        return _head_scorer(p, attribute)
    raise InputError(
        f"{p} is neither an exported model (manifest.json) nor a head directory (head.json); "
        "pass the output of `headstart export` or `headstart fit-head`"
    )


def _pick(attribute: str | None, main: str | None, others: list[str], where: Path) -> int | None:
    """Which attribute head: None for the main one, else its index among ``others``."""
    if attribute is None or attribute == main:
        return None
    if attribute not in others:
        names = ", ".join(n for n in (main, *others) if n) or "(one, unnamed)"
        raise InputError(f"{where} has no head for attribute {attribute!r}; its attributes are: {names}")
    return others.index(attribute)


def _model_scorer(p: Path, attribute: str | None) -> Scorer:
    from .artifacts.head_dir import fitted_content_hashes
    from .artifacts.model_dir import load_model

    loaded = load_model(p)
    m = loaded.manifest
    prov = m.get("provenance", {})
    head_dir = prov.get("head_dir")
    fitted = fitted_content_hashes(head_dir) if head_dir else None
    entries = loaded.attributes
    i = _pick(attribute, m["head"].get("attribute"), [a["name"] for a in entries], p)
    a = entries[i] if i is not None else None
    names = a["class_names"] if a else loaded.class_names
    label_map = LabelMap.from_record((a or m["head"]).get("label_map"))
    threshold = None if a else m["head"].get("unknown_threshold")
    tree = Tree.from_record(a.get("tree"), names, what=str(p), fix="re-export it") if a else loaded.tree
    common = {
        "fitted": fitted, "fitted_on": prov.get("cache"), "tree": tree, "attribute": attribute,
        "thresholds": a.get("thresholds") if a and a.get("multi_label") else None,
    }  # fmt: skip
    if loaded.model is None:  # ONNX: pixels in, probabilities out; log p are its "logits"
        from .artifacts.onnx import onnx_session

        return Scorer(
            "model", p, names, nn.Identity(), loaded.fingerprint, label_map, threshold,
            session=onnx_session(loaded.weights_path), output=a["output"] if a else "probabilities", **common,
        )  # fmt: skip
    head = loaded.model.attributes[i] if i is not None else loaded.model.head
    return Scorer("model", p, names, head, loaded.fingerprint, label_map, threshold, loaded.model.net, **common)


def _head_scorer(p: Path, attribute: str | None) -> Scorer:
    from .artifacts.head_dir import fitted_content_hashes, read_attribute_heads, read_head
    from .models.heads import build_head

    meta, spec = read_head(p)
    fp = Fingerprint.from_record(meta["fingerprint"], source=str(p / "head.json"))
    others = read_attribute_heads(p, meta)
    i = _pick(attribute, meta.get("attribute"), [a.name for a in others], p)
    folder = p
    if i is not None:
        folder = p / meta["attributes"][i]["dir"]
        meta, spec = others[i].meta, others[i].spec
    multi = bool(meta.get("multi_label"))
    return Scorer(
        "head", p, list(meta["class_names"]), build_head(spec.kind, spec.torch_tensors()).eval(), fp,
        LabelMap.from_record(meta.get("label_map")), None if multi else meta.get("unknown_threshold"),
        fitted=fitted_content_hashes(folder), fitted_on=meta.get("cache"),
        tree=Tree.from_record(meta.get("tree"), meta["class_names"], what=str(p), fix="re-run fit-head"),
        attribute=attribute, thresholds=list(meta["thresholds"]) if multi else None,
    )  # fmt: skip


def _truth_index(scorer: Scorer, categories: list[str | None]) -> np.ndarray:
    """Category names -> the scorer's class index (-1: unlabelled, dropped or unknown to it)."""
    index = {n: i for i, n in enumerate(scorer.class_names)}
    out = np.full(len(categories), -1, np.int64)
    for j, name in enumerate(categories):
        if name is None:
            continue
        target: str | None = name
        if scorer.label_map is not None:
            try:
                target = scorer.label_map.target(name)
            except InputError:
                target = None
        if target is not None and target in index:
            out[j] = index[target]
    return out


Rows = tuple[np.ndarray, list[str | None], list[str], list[Path | None], list[str] | None]


def _from_cache(scorer: Scorer, path: Path) -> Rows:
    from .cache.store import Cache, require_finite

    if scorer.session is not None:
        raise ArtifactError(
            f"{scorer.path} is an ONNX model: it scores photos, not cached features; evaluate it on the "
            "image folder, or pass its head directory to evaluate on the cache"
        )
    with Cache(path) as c:
        fp, want = c.fingerprint, scorer.fingerprint
        if not fp.same_function(want):
            raise CacheError(
                f"the features do not match the model:\n"
                f"  {path} was extracted with {fp.backbone} (weights {fp.weights_sha256[:12]})\n"
                f"  {scorer.path} expects {want.backbone} (weights {want.weights_sha256[:12]}) with its preprocessing\n"
                f"evaluate on the image folder, or extract it with --backbone {want.backbone}"
            )
        col = c.column(scorer.attribute)
        labels, names = col.labels, col.values
        # multi-label: every row (an empty cell is a photo with none of the labels)
        rows = np.flatnonzero(labels >= -1) if scorer.multi_label else np.flatnonzero(labels >= 0)
        cats: list[str | None] = [names[int(v)] if v >= 0 else "" for v in labels[rows]]
        paths_all = c.paths
        root = Path(str(c.attrs.get("image_root", "")))
        feats = c.features(rows)
        hashes_all = c.content_hash
    paths = [paths_all[i] for i in rows]
    require_finite(path, feats, rows, paths)
    files: list[Path | None] = [root / p if (root / p).is_file() else None for p in paths]
    return feats, cats, paths, files, [hashes_all[i] for i in rows]


def _from_images(scorer: Scorer, cfg: EvaluateConfig) -> Rows:
    from .core import runtime
    from .core.hashing import hash_file
    from .data.catalog import discover
    from .data.loader import make_loader

    cat = discover(cfg.data, labelled=True)
    column = scorer.attribute if scorer.attribute not in (None, cat.label_column or "label") else None
    if column is not None and column not in cat.attribute_names:
        raise InputError(f"{cfg.data} has no column {column!r}; its columns: {cat.label_column}, {cat.attribute_names}")
    k = cat.attribute_names.index(column) if column is not None else -1

    def truth(item: Any) -> str | None:
        value = item.label if k < 0 else (item.attributes[k] or None)
        return value or ("" if scorer.multi_label else None)

    items = [i for i in cat.items if scorer.multi_label or truth(i) is not None]
    if not items:
        raise InputError(f"{cfg.data} has no labelled photos; evaluate needs images/<class>/*.jpg or path,label")
    dev = runtime.resolve_device(cfg.device)
    engine, precision = scorer.fingerprint.inference_choice(dev, cfg.engine)
    prep = scorer.fingerprint.preprocessing
    loader = make_loader(
        [i.path for i in items], prep, device=dev, batch_size=cfg.batch_size, workers=cfg.workers
    )  # fmt: skip
    feats = np.zeros((len(items), 0), np.float32)
    ok = np.zeros(len(items), bool)
    for batch, f in _embedded(scorer, loader, dev, engine, precision):
        good = batch.index.numpy()[batch.ok.numpy()]
        if len(good):
            if feats.shape[1] == 0:
                feats = np.zeros((len(items), f.shape[1]), np.float32)
            feats[good] = f
            ok[good] = True
    keep = np.flatnonzero(ok)
    hashes: list[str] | None = None
    if scorer.fitted is not None:
        hashes = []
        for i in keep:
            try:
                hashes.append(hash_file(items[i].path))
            except OSError:
                hashes.append("")
    return (
        feats[keep],
        [truth(items[i]) for i in keep],
        [items[i].rel for i in keep],
        [items[i].path for i in keep],
        hashes,
    )


def _embedded(scorer: Scorer, loader: Any, dev: torch.device, engine: str, precision: str) -> Any:
    """(batch, features) of each batch; for an ONNX model the "features" are log-probabilities
    (its head is the identity), so every model is scored by the same code."""
    if scorer.session is None:
        from .data.loader import embed_batches
        from .models.engine import make_embedder

        crop = scorer.fingerprint.preprocessing.crop
        embed = make_embedder(scorer.backbone(), crop, engine=engine, device=dev, precision=precision)
        yield from embed_batches(embed, loader, device=dev)
        return
    for batch in loader:
        logp = np.zeros((0, len(scorer.class_names)), np.float32)
        if batch.pixels.numel():
            (probs,) = scorer.session.run([scorer.output], {"pixels": batch.pixels.cpu().numpy()})
            p = np.clip(probs.astype(np.float64), 1e-30, 1 - 1e-7)
            # multi-label: log-odds, whose sigmoid is p; else log p, whose softmax is p
            logp = (np.log(p / (1 - p)) if scorer.multi_label else np.log(p)).astype(np.float32)
        yield batch, logp


@dataclass
class EvaluateSummary:
    path: Path
    metrics: dict[str, Any]
    excluded: int
    warnings: list[str] = field(default_factory=list)

    def line(self) -> str:
        m = self.metrics
        if "micro_f1" in m:  # a multi-label attribute
            return (
                f"{self.path / 'report.html'}: micro-F1 {m['micro_f1']:.3f}, macro-F1 {m['macro_f1']:.3f}, mean AP "
                f"{m['macro_average_precision']:.3f} on {m['n']} photos ({len(m['per_label'])} labels)"
            ) + "".join(f"\nwarning: {w}" for w in self.warnings)
        extra = f"; {self.excluded} photos of other categories left out" if self.excluded else ""
        if m.get("tree"):
            t, r = m["tree"], m["tree"]["rollup"]
            levels = ", ".join(f"{lv['accuracy']:.3f}" for lv in t["levels"])
            right = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
            extra += (
                f"; tree: accuracy per level {levels}, roll-up at {t['min_confidence']:g}: "
                f"{r['coverage']:.1%} answered, {right} right"
            )
        return (
            f"{self.path / 'report.html'}: accuracy {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f}, "
            f"ECE {m['ece']:.3f} on {m['n']} photos ({len(m['per_class'])} classes){extra}"
        ) + "".join(f"\nwarning: {w}" for w in self.warnings)


def _seen_warning(scorer: Scorer, data: Path, hashes: list[str] | None, n: int) -> tuple[int | None, str | None]:
    """How many evaluated photos the head was fitted on (None: unknown), and the warning."""
    if scorer.fitted is not None and hashes is not None:
        seen = sum(h in scorer.fitted for h in hashes)
    elif scorer.fitted_on and data.resolve() == Path(scorer.fitted_on).resolve():
        seen = n  # a head written before split.json recorded its photos: the same cache is all seen
    else:
        return None, None
    if not seen:
        return 0, None
    share = f"all {n}" if seen == n else f"{seen} of {n}"
    return seen, (
        f"{share} evaluated photos were used to fit {scorer.path} (it knows their content hashes): "
        "these numbers are not a test of new photos; evaluate on photos kept out of the training folder"
    )


def evaluate(cfg: EvaluateConfig) -> EvaluateSummary:
    scorer = load_scorer(cfg.model, cfg.attribute)
    data = Path(cfg.data)
    if not data.exists():
        raise InputError(f"{data} does not exist")
    is_cache = data.is_file() and data.suffix.lower() in (".h5", ".hdf5")
    feats, cats, paths, files, hashes = _from_cache(scorer, data) if is_cache else _from_images(scorer, cfg)
    if scorer.multi_label:
        return _evaluate_multi_label(cfg, scorer, data, is_cache, feats, cats, hashes)
    y_all = _truth_index(scorer, cats)
    keep = np.flatnonzero(y_all >= 0)
    if len(keep) == 0:
        raise InputError(
            f"none of the categories in {data} are classes of {scorer.path} ({', '.join(scorer.class_names[:8])}); "
            "evaluate on photos of the categories the model was trained on"
        )
    proba = softmax(scorer.logits(feats[keep]).astype(np.float64))
    seen, warning = _seen_warning(scorer, data, [hashes[i] for i in keep] if hashes else None, len(keep))
    warnings = [warning] if warning else []
    threshold = cfg.unknown_threshold if cfg.unknown_threshold is not None else scorer.unknown_threshold
    scored = Scored(proba, y_all[keep], scorer.class_names, [paths[i] for i in keep], [files[i] for i in keep])
    meta = {
        "model": str(scorer.path.resolve()),
        "model_kind": scorer.kind,
        "data": str(data.resolve()),
        "data_kind": "cache" if is_cache else "images",
        "backbone": scorer.fingerprint.backbone,
        "label_map": scorer.label_map.source if scorer.label_map else None,
        "excluded_other_categories": int(len(cats) - len(keep)),
        "photos_the_head_was_fitted_on": seen,
    }
    out = Path(cfg.out)
    tree = TreeIndex.build(scorer.tree, scorer.class_names) if scorer.tree else None
    metrics = write_report(
        out, scored, meta, unknown_threshold=threshold, worst=cfg.worst, warnings=warnings, raw_csv=cfg.raw_csv,
        tree=tree, min_confidence=cfg.min_confidence,
    )  # fmt: skip
    save_resolved(cfg, out / "config.json")
    return EvaluateSummary(out, metrics, int(len(cats) - len(keep)), warnings)


def _evaluate_multi_label(
    cfg: EvaluateConfig,
    scorer: Scorer,
    data: Path,
    is_cache: bool,
    feats: np.ndarray,
    cells: list[str | None],
    hashes: list[str] | None,
) -> EvaluateSummary:
    """A multi-label attribute: each label at the head's threshold (probe/multilabel.py)."""
    from .artifacts.multilabel_report import write_multilabel_report
    from .data.attributes import split_cell
    from .probe.multilabel import multilabel_metrics, sigmoid

    index = {n: j for j, n in enumerate(scorer.class_names)}
    Y = np.zeros((len(cells), len(index)), np.uint8)
    for r, cell in enumerate(cells):
        for lab in split_cell(cell or ""):
            target: str | None = lab
            if scorer.label_map is not None:
                try:
                    target = scorer.label_map.target(lab)
                except InputError:
                    target = None  # a label the head does not know: not scored
            if target in index:
                Y[r, index[target]] = 1
    P = sigmoid(scorer.logits(feats))
    assert scorer.thresholds is not None
    metrics = multilabel_metrics(Y, P, np.asarray(scorer.thresholds, np.float32), scorer.class_names)
    seen, warning = _seen_warning(scorer, data, hashes, len(cells))
    warnings = [warning] if warning else []
    meta = {
        "model": str(scorer.path.resolve()),
        "model_kind": scorer.kind,
        "attribute": scorer.attribute,
        "data": str(data.resolve()),
        "data_kind": "cache" if is_cache else "images",
        "backbone": scorer.fingerprint.backbone,
        "photos_the_head_was_fitted_on": seen,
    }
    out = Path(cfg.out)
    metrics = write_multilabel_report(out, metrics, meta, warnings=warnings, raw_csv=cfg.raw_csv)
    save_resolved(cfg, out / "config.json")
    return EvaluateSummary(out, metrics, 0, warnings)
