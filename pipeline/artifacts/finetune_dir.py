"""The fine-tune directory (``headstart finetune``): written by the fine-tune stage, read by
export. This module owns both sides and the one schema version.

``FT_DIR/`` holds ``model.pt`` (the best epoch's whole network, tensors only), ``finetune.json``
(the keys a model manifest has - backbone, preprocessing, precision, class names, head kind -
plus metrics, history, training facts, provenance and the sha256 of ``model.pt``) and
``config.json``. While training it also holds ``checkpoint/`` (resume state), removed when done.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..core.atomic import atomic_file
from ..core.hashing import sha256_file
from ..core.torchio import atomic_torch_save
from ..data.tree import Tree
from ..errors import ArtifactError
from ..models.fingerprint import Fingerprint
from .head_dir import checked_class_names, read_json, verify_files

FT_FORMAT = "headstart-finetune"
FT_SCHEMA_VERSION = 1
_FIX = "re-run `headstart finetune`"


def write_finetune_dir(
    out: Path,
    state: dict[str, torch.Tensor],
    fingerprint: Fingerprint,
    class_names: list[str],
    head: dict[str, Any],
    record: dict[str, Any],
) -> None:
    """``model.pt`` then ``finetune.json``, each atomically; ``finetune.json`` last, so a kill
    in between leaves no finetune.json that names a model.pt it does not match.

    ``fingerprint`` is the pretrained start's (its ``precision`` the one training ran in);
    ``record`` holds the descriptive keys (metrics, history, training, provenance, the head's
    ``tree`` ...); ``head`` carries the head's ``class_ids``, ``label_map`` and
    ``unknown_threshold`` next to its kind."""
    atomic_torch_save(state, out / "model.pt")
    doc = {
        "format": FT_FORMAT,
        "schema_version": FT_SCHEMA_VERSION,
        # The keys build_classifier reads, as in a model manifest. weights_sha256 is the
        # pretrained start's, not these weights'.
        "backbone": fingerprint.manifest_backbone(),
        "preprocessing": fingerprint.preprocessing.to_dict(),
        "precision": fingerprint.precision,
        "class_names": class_names,
        "head": head,
        **record,
        "files": {"model.pt": sha256_file(out / "model.pt")},
    }
    with atomic_file(out / "finetune.json") as f:
        f.write((json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))


def read_finetune_meta(ft_dir: Path) -> dict[str, Any]:
    """``finetune.json``, its format and schema version checked, and the class names, class ids
    and category tree it carries from the head (fine-tunes written before they were carried
    have no ids and no tree: still read)."""
    what = str(ft_dir / "finetune.json")
    meta = read_json(ft_dir / "finetune.json", what="a fine-tune directory", fix=_FIX)
    version = meta.get("schema_version")
    if meta.get("format") != FT_FORMAT or not isinstance(version, int) or version > FT_SCHEMA_VERSION:
        raise ArtifactError(f"{what} is not a fine-tune this headstart reads; {_FIX}")
    names = checked_class_names(meta.get("class_names"), what=what, fix=_FIX)
    head = meta.get("head")
    if not isinstance(head, dict) or not isinstance(head.get("kind"), str):
        raise ArtifactError(f"{what} 'head' is not an object with a 'kind'; {_FIX}")
    ids = head.get("class_ids")
    if ids is not None and not (isinstance(ids, list) and len(ids) == len(names) and all(type(i) is int for i in ids)):
        raise ArtifactError(f"{what} 'head.class_ids' is not one whole number per class name; {_FIX}")
    Tree.from_record(meta.get("tree"), names, what=what, fix=_FIX)
    return meta


def read_finetune_dir(ft_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(``finetune.json``, the state dict of ``model.pt``): checksum first, tensors only."""
    meta = read_finetune_meta(ft_dir)
    verify_files(ft_dir, meta.get("files", {}), ("model.pt",), what="finetune.json", fix=_FIX)
    try:
        state = torch.load(ft_dir / "model.pt", map_location="cpu", weights_only=True)
    except Exception as e:
        raise ArtifactError(f"{ft_dir / 'model.pt'} cannot be read ({type(e).__name__}); {_FIX}") from None
    return meta, state
