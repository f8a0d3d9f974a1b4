"""Text towers of image-text backbones: prompts -> embeddings in the image features' space.

The zero-shot head (:mod:`pipeline.probe.zeroshot`) compares a photo's features with the
embeddings of its class prompts, so both must come from the same model and the same weights:

* **open_clip** (``open_clip/ARCH:TAG`` or an imported open_clip folder): the image features
  are ``model.visual`` (:mod:`.openclip_family`), i.e. ``encode_image``'s projected embedding;
  the text side is ``encode_text`` on ``open_clip.get_tokenizer``'s tokens (for CLIP its BPE
  vocabulary ships inside the package; SigLIP's tokenizer must be in the Hugging Face cache).
* **Hugging Face CLIP / SigLIP** (``hf/REPO-ID`` or an imported folder): the image features are
  ``get_image_features`` (:mod:`.hf_family`); the text side is ``get_text_features`` on the
  folder's own tokenizer (``AutoTokenizer``, ``local_files_only``), padded as the model was
  trained (SigLIP: to ``max_length``).

The weights are read from the same file the cache's fingerprint names, and its sha256 is
checked against the fingerprint, so a text tower never pairs with other weights' image
features. The logit scale is the model's own ``exp(logit_scale)``.

No other backbone has a text tower: :func:`text_tower` says which do.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.hashing import sha256_file
from ..errors import BackboneError
from . import hub
from .fingerprint import Fingerprint

WHICH = (
    "zero-shot needs an image-text backbone with a text tower: open_clip CLIP or SigLIP "
    "(open_clip/ARCH:TAG, or an open_clip folder imported with `headstart backbones import`) or a Hugging Face "
    "CLIP or SigLIP (hf/REPO-ID, or an imported transformers folder); re-extract with one of those"
)


@dataclass(frozen=True)
class TextTower:
    backbone: str
    logit_scale: float
    encode: Callable[[list[str]], np.ndarray]  # prompts -> [N, D] float32, not normalised
    tokenizer: str  # what tokenised, for head.json


def text_tower(fingerprint: Fingerprint, *, batch: int = 256) -> TextTower:
    """The text tower of the backbone the features in ``fingerprint`` came from, with the same
    weights (sha256 checked); a ``BackboneError`` naming the backbones that have one otherwise."""
    parsed = hub.parse_name(fingerprint.backbone)
    family = hub.family_of(parsed.base)
    entry: dict[str, Any] | None = None
    if family is None:
        from .imported import lookup

        entry = lookup(parsed.base)
        family = entry["family"] if entry else None
    if family not in ("open_clip", "hf"):
        raise BackboneError(f"{fingerprint.backbone} has no text tower; {WHICH}")
    hub.require(family)
    model, tokenize, weights, what = (_open_clip if family == "open_clip" else _hf)(parsed, entry)
    if weights is None or not weights.is_file():
        raise BackboneError(f"the weights of {fingerprint.backbone} are not on this machine; {WHICH}")
    sha = sha256_file(weights)
    if sha != fingerprint.weights_sha256:
        raise BackboneError(
            f"the {fingerprint.backbone} weights on this machine (sha256 {sha[:12]}) differ from the ones the "
            f"features were extracted with ({fingerprint.weights_sha256[:12]}); re-extract, or import the same folder"
        )
    model.eval()

    def encode(prompts: list[str]) -> np.ndarray:
        out = []
        with torch.no_grad():
            for i in range(0, len(prompts), batch):
                out.append(tokenize(prompts[i : i + batch]).float().numpy())
        emb = np.concatenate(out) if out else np.zeros((0, fingerprint.feature_dim), np.float32)
        if emb.shape[1] != fingerprint.feature_dim:
            raise BackboneError(
                f"{fingerprint.backbone}'s text embeddings are {emb.shape[1]}-d but its image features "
                f"{fingerprint.feature_dim}-d; the features are not the projected image embedding: re-extract"
            )
        return np.asarray(emb, np.float32)

    scale = float(model.logit_scale.detach().float().exp())  # type: ignore[union-attr,operator]
    return TextTower(fingerprint.backbone, scale, encode, what)


Tower = tuple[torch.nn.Module, Callable[[list[str]], torch.Tensor], Path | None, str]


def _open_clip(parsed: hub.Name, entry: dict[str, Any] | None) -> Tower:
    import open_clip

    from . import openclip_family as ocf

    snap = ocf.hub_folder(parsed) if entry is None else None
    weights: Path | None
    kw: dict[str, Any]
    if entry is not None:
        model_name, kw = f"local-dir:{entry['path']}", {}
        weights = Path(entry["weights_file"])
    elif snap is not None:  # open_clip/hf-hub:REPO-ID, cached in open_clip's hub layout
        model_name, kw = f"local-dir:{snap}", {}
        weights = hub.weights_in(snap, ocf.WEIGHTS)
    else:
        arch, _, tag = parsed.base.split("/", 1)[1].partition(":")
        cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
        hub_id = str(cfg.get("hf_hub", "")).strip("/")
        snap = hub.cached_snapshot(hub_id, ocf.WEIGHTS) if hub_id else None
        weights = hub.weights_in(snap, ocf.WEIGHTS) if snap is not None else None
        model_name, kw = arch, {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}
    model: Any = ocf.create(model_name, **kw)
    if weights is not None and weights.is_file():
        try:
            model.load_state_dict(hub.read_safetensors(weights), strict=True)
        except (RuntimeError, KeyError) as e:
            raise BackboneError(f"weights file {weights} does not fit {model_name}: {str(e).splitlines()[0]}") from None
    try:
        tokenizer = open_clip.get_tokenizer(model_name)
    except (OSError, ValueError, RuntimeError) as e:
        # SigLIP's tokenizer is a Hugging Face one that open_clip fetches on first use, apart
        # from the weights: a machine that only downloaded the weights does not have it. For a
        # local-dir open_clip reads it from the folder itself.
        if model_name.startswith("local-dir:"):
            fix = (
                f"copy the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) into "
                f"{model_name[len('local-dir:') :]}: open_clip reads a folder's tokenizer from the folder itself"
            )
        else:
            fix = (
                f'fetch it once on a machine with internet (python -c "import open_clip; '
                f"open_clip.get_tokenizer('{model_name}')\") and copy the Hugging Face cache"
            )
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise BackboneError(f"open_clip cannot load the tokenizer of {model_name} offline ({first}); {fix}") from None
    if not hasattr(model, "encode_text"):
        raise BackboneError(f"{model_name} has no text tower; {WHICH}")

    def run(prompts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(prompts))  # type: ignore[no-any-return]

    return model, run, weights, f"open_clip.get_tokenizer({model_name!r}): {type(tokenizer).__name__}"


def _hf(parsed: hub.Name, entry: dict[str, Any] | None) -> Tower:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    from . import hf_family

    if entry is not None:
        folder: Path | None = Path(entry["path"])
    else:
        folder = hub.cached_snapshot(parsed.base.split("/", 1)[1], ("config.json",))
    if folder is None or not (folder / "config.json").is_file():
        raise BackboneError(f"the folder of {parsed.base} is not on this machine; {WHICH}")
    logging.disable_progress_bar()
    try:
        model: Any = AutoModel.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as e:
        raise BackboneError(f"transformers cannot load {folder}: {str(e).splitlines()[0]}") from None
    if not hasattr(model, "get_text_features"):
        raise BackboneError(f"{parsed.base} ({type(model).__name__}) has no text tower; {WHICH}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise BackboneError(
            f"{folder} has no usable tokenizer ({str(e).splitlines()[0]}); copy the model's whole folder "
            "(tokenizer files included) and import it again"
        ) from None
    # SigLIP was trained on text padded to max_length (64) and pools the last token; CLIP pools
    # its end-of-text token, so padding to the longest prompt gives the same embedding.
    siglip = "siglip" in str(model.config.model_type)
    length = int(getattr(getattr(model.config, "text_config", None), "max_position_embeddings", 77))

    def run(prompts: list[str]) -> torch.Tensor:
        tok = tokenizer(
            prompts,
            padding="max_length" if siglip else True,
            truncation=True,
            max_length=length,
            return_tensors="pt",
        )
        kw = {"attention_mask": tok["attention_mask"]} if not siglip and "attention_mask" in tok else {}
        out = model.get_text_features(input_ids=tok["input_ids"], **kw)
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return model, run, hub.weights_in(folder, hf_family.WEIGHTS), f"AutoTokenizer: {type(tokenizer).__name__}"
