"""Stage: head directory or fine-tune directory -> model directory. ``export(cfg) -> path``.

This module turns what ``fit-head`` or ``finetune`` wrote into a
:class:`~pipeline.artifacts.model_dir.ModelSource` (the network rebuilt from the recorded
fingerprint, the head's tensors, class names, provenance); writing the model directory - the
staging, the parity check, the manifest - belongs to :mod:`pipeline.artifacts.model_dir`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from .artifacts.finetune_dir import read_finetune_dir
from .artifacts.head_dir import AttributeSpec, read_attribute_heads, read_head
from .artifacts.model_dir import PARITY_IMAGES, RUNTIMES, ModelSource, build_classifier, write_model
from .config import ExportConfig
from .core.hashing import sha256_file
from .errors import ArtifactError, HeadstartError, InputError
from .models.fingerprint import Fingerprint
from .models.heads import Classifier, build_head

__all__ = ["export", "source_from_finetune", "source_from_head"]


def export(cfg: ExportConfig) -> Path:
    if cfg.format not in RUNTIMES:
        raise InputError(f"unknown export format {cfg.format!r}; choose one of: {', '.join(RUNTIMES)}")
    if (Path(cfg.head) / "finetune.json").is_file():  # FT_DIR from `headstart finetune`
        src = source_from_finetune(cfg.head)
    else:
        src = source_from_head(cfg.head, cfg.weights_file)
    return write_model(src, cfg.out, fmt=cfg.format, tolerance=cfg.parity_tolerance, config=cfg)


def source_from_head(head_dir: str | Path, weights_file: str | None = None) -> ModelSource:
    head_dir = Path(head_dir)
    meta, spec_h = read_head(head_dir)
    fp = Fingerprint.from_record(meta["fingerprint"], source=str(head_dir / "head.json"))
    attributes = read_attribute_heads(head_dir, meta)
    for a in attributes:  # every head of the directory was fitted on the same cache's features
        if Fingerprint.from_record(a.meta["fingerprint"]).diff(fp):
            raise ArtifactError(
                f"{head_dir}: the {a.name!r} head was fitted on another backbone's features; re-run fit-head"
            )
    net = fp.load_backbone(weights_file, made=f"the head in {head_dir}").net
    model = Classifier(
        net,
        build_head(spec_h.kind, spec_h.torch_tensors()),
        [build_head(a.spec.kind, a.spec.torch_tensors()) for a in attributes],
        [a.multi_label for a in attributes],
    ).eval()
    metrics = meta.get("metrics", {})
    return ModelSource(
        classifier=model,
        fingerprint=fp,
        class_names=list(meta["class_names"]),
        head={
            "kind": spec_h.kind,
            "estimator": meta.get("kind"),
            "attribute": meta.get("attribute"),
            "C": meta.get("C"),
            # So evaluate/predict know the head's class ids, label map (merges and renames of
            # folder names), temperature (already folded into the tensors) and the recorded
            # --unknown-threshold. None for heads of the first release, which had none of them.
            **{k: meta.get(k) for k in ("class_ids", "label_map", "temperature", "unknown_threshold")},
        },
        provenance={
            "source": "head",
            "head_dir": str(head_dir.resolve()),
            "head_json_sha256": sha256_file(head_dir / "head.json"),
            "head_metrics": {k: metrics.get(k) for k in ("accuracy", "macro_f1", "n", "split")},
            "cache": meta.get("cache"),
        },
        sample_images=_cache_images(meta.get("cache")),
        # the tree rides at the top of the manifest; the graph keeps leaf probabilities and predict rolls up
        extra={"tree": meta["tree"]} if meta.get("tree") else {},
        attributes=[_attribute_entry(a) for a in attributes],
    )


def _attribute_entry(a: AttributeSpec) -> dict[str, Any]:
    """A further attribute's manifest entry (model_dir.ModelSource.attributes)."""
    m = a.meta
    return {
        "name": a.name,
        "class_names": list(m["class_names"]),
        "class_ids": m.get("class_ids"),
        "multi_label": a.multi_label,
        **({"thresholds": m.get("thresholds")} if a.multi_label else {}),
        "head": {"kind": a.spec.kind, "estimator": m.get("kind"), "C": m.get("C"), "temperature": m.get("temperature")},
        **({"tree": m["tree"]} if m.get("tree") else {}),
        "label_map": m.get("label_map"),
    }


def source_from_finetune(ft_dir: str | Path) -> ModelSource:
    """A fine-tuned network: ``finetune.json`` carries the keys :func:`build_classifier` reads
    (backbone, preprocessing, head kind, class names) and what it kept of the head (class ids,
    label map, unknown threshold, category tree), ``model.pt`` the whole network as tensors; no
    original weights file is needed."""
    ft_dir = Path(ft_dir)
    meta, state = read_finetune_dir(ft_dir)
    metrics, prov = meta.get("metrics", {}), meta.get("provenance", {})
    return ModelSource(
        classifier=build_classifier(meta, state),
        fingerprint=Fingerprint.from_manifest(meta),
        class_names=list(meta["class_names"]),
        head={
            "kind": meta["head"]["kind"],
            "estimator": "finetuned",
            "init": meta["head"].get("init"),
            # carried from head.json by finetune (None in fine-tunes written before it did)
            **{k: meta["head"].get(k) for k in ("class_ids", "label_map", "unknown_threshold")},
        },
        provenance={
            "source": "finetune",
            "finetune_dir": str(ft_dir.resolve()),
            "finetune_json_sha256": sha256_file(ft_dir / "finetune.json"),
            "head_metrics": {k: metrics.get(k) for k in ("accuracy", "macro_f1", "n", "split")},
            "start_metrics": {k: meta.get("start_metrics", {}).get(k) for k in ("accuracy", "loss", "init")},
            "head_dir": prov.get("head_dir"),
            "cache": prov.get("cache"),
        },
        sample_images=_cache_images(prov.get("cache")),
        extra={"tree": meta["tree"]} if meta.get("tree") else {},  # the head's tree, as source_from_head
    )


def _cache_images(cache_path: str | None) -> list[Path]:
    """Up to PARITY_IMAGES images the head was trained on, spread over the cache (may be none:
    a head can travel without its photos)."""
    if not cache_path or not Path(cache_path).is_file():
        return []
    from .cache.store import Cache

    with contextlib.suppress(HeadstartError, OSError), Cache(cache_path) as c:
        root = Path(str(c.attrs.get("image_root", "")))
        paths = c.paths
        step = max(1, len(paths) // PARITY_IMAGES)
        return [root / p for p in paths[::step][:PARITY_IMAGES]]
    return []
