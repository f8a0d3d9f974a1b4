"""Hugging Face transformers backbones: ``hf/<repo-id>`` from the Hugging Face cache, or a folder
``save_pretrained`` (or ``snapshot_download``) wrote: ``config.json`` with a ``model_type``,
``model.safetensors`` and ``preprocessor_config.json``.

The network is ``AutoModel.from_config`` at random init; the weights are loaded by
``AutoModel.from_pretrained(folder, local_files_only=True)``, the library's own loader, because
checkpoint key names change between transformers versions and only it knows the renames. The
sha256 recorded is still that of the folder's weights file. Preprocessing is the ``AutoImageProcessor``'s ``size``,
``crop_size``, ``crop_pct``, ``resample``, ``image_mean`` and ``image_std``.

Pooling: the model's ``last_hidden_state``: ``cls`` (token 0), ``mean`` of the patch tokens
(after the class token and any register tokens) or ``cls+mean``; for a CNN (ConvNeXt) its
``pooler_output`` (the normalised global average, ``mean``). An image-text model (CLIP,
SigLIP) gives its projected image embedding (``default``), the space its text tower shares.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.preprocessing import Preprocessing
from ..errors import BackboneError
from . import hub
from .backbones import BackboneSpec

WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes, as the image processors record them


class HFBody(nn.Module):
    def __init__(
        self, model: nn.Module, pool: str, prefix_tokens: int, image_text: bool, folder: Path, *, resized: bool = False
    ) -> None:
        super().__init__()
        # an image-text tower at another size than its own: its position embedding is resampled
        # (transformers' interpolate_pos_encoding); at its own size the library's plain path runs
        self.resized = resized
        self.folder = str(folder)  # where the weights load from (load_original_state_dict)
        if image_text:
            # The image features never run the text tower (the zero-shot head builds its own,
            # models/text.py): without it, fine-tuning's layer groups are the vision tower's
            # blocks, not text layers that get no gradient, and model.pt does not carry SigLIP-B's
            # ~110 M text parameters. get_image_features reads vision_model (+ visual_projection).
            for name, _ in list(model.named_children()):
                if name.startswith("text"):
                    setattr(model, name, None)
        self.model = model
        self.pool = pool
        self.prefix_tokens = prefix_tokens
        self.image_text = image_text

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.image_text:
            kw = {"interpolate_pos_encoding": True} if self.resized else {}
            out = self.model.get_image_features(pixel_values=x, **kw)  # type: ignore[operator]
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        kw = {"interpolate_pos_encoding": True} if self.prefix_tokens else {}  # any @SIZE (ViT needs asking)
        out = self.model(pixel_values=x, **kw)
        h = out.last_hidden_state
        if h.ndim == 4 or self.pool == "default":
            return out.pooler_output  # type: ignore[no-any-return]
        parts = []
        if self.pool.startswith("cls"):
            parts.append(h[:, 0])
        if self.pool.endswith("mean"):
            parts.append(h[:, self.prefix_tokens :].mean(1))
        return torch.cat(parts, 1)

    def load_original_state_dict(self, state: dict[str, torch.Tensor], head: nn.Module | None) -> None:
        """Through transformers' own loader, not ``state``: checkpoints keep the key names of the
        transformers that wrote them and ``from_pretrained`` renames them (5.x stores DINOv2's
        ``attention.attention.query`` and loads it as ``attention.q_proj``), drops the
        ``base_model_prefix`` of a classification checkpoint and its classifier."""
        from transformers import AutoModel
        from transformers.utils import logging

        logging.disable_progress_bar()  # extract has its own progress bar
        try:
            loaded = AutoModel.from_pretrained(str(self.folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise RuntimeError(str(e)) from None
        own = self.model.state_dict().keys()  # an image-text model's text tower is gone (__init__)
        self.model.load_state_dict({k: v for k, v in loaded.state_dict().items() if k in own}, strict=True)


def _processor(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / "preprocessor_config.json").read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise BackboneError(f"{folder} has no preprocessor_config.json (the image processor's settings)") from None
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot read {folder / 'preprocessor_config.json'}: {e}") from None


def preprocessing(folder: Path, size: int | None, *, vit: bool) -> tuple[Preprocessing, int]:
    """The image processor's recipe as a :class:`Preprocessing`, at ``size`` (default: its crop,
    at most ``hub.VIT_DEFAULT_MAX`` for a ViT), keeping its resize-to-crop ratio.

    Three recipes, as ``transformers`` applies them (the PIL backend):

    * short side to ``shortest_edge``, centre crop ``crop_size`` (BitImageProcessor: DINOv2, CLIP);
    * ``crop_pct`` (ConvNextImageProcessor): short side to ``shortest_edge / crop_pct``, centre
      crop; at 384 px and above it resizes to a square with no crop, i.e. squashes;
    * a fixed ``height x width`` (ViTImageProcessor, SiglipImageProcessor; DeiT's then crops):
      the photo is squashed to that square whatever its aspect ratio (``squash``).

    A square is all headstart resizes to, so a ``height != width`` is an Error; so is a processor
    that resizes the short side and then does not crop (its output shape follows each photo)."""
    p = _processor(folder)
    what = f"the image processor in {folder}"
    s = p.get("size") or {}
    s = {"shortest_edge": s} if isinstance(s, int) else dict(s)
    crop_size = p.get("crop_size")
    if isinstance(crop_size, dict):
        crop_size = crop_size.get("height")
    do_crop = bool(p.get("do_center_crop", True))
    squash = False
    if "crop_pct" in p and "shortest_edge" in s:  # ConvNextImageProcessor
        edge = int(s["shortest_edge"])
        resize, crop = (math.floor(edge / p["crop_pct"]), edge) if edge < 384 else (edge, edge)
        squash = edge >= 384
    elif "shortest_edge" in s:
        resize = int(s["shortest_edge"])
        if not (do_crop and crop_size):
            raise BackboneError(
                f"{what} resizes the short side to {resize} px and does not crop, so its output shape follows each "
                "photo; headstart needs a square: set do_center_crop and crop_size in preprocessor_config.json"
            )
        crop = int(crop_size)
    elif "height" in s:
        height, width = int(s["height"]), int(s.get("width", s["height"]))
        if height != width:
            raise BackboneError(f"{what} resizes to {height} x {width}; headstart resizes to a square only")
        # a fixed square whatever the photo's shape: ViTImageProcessor and SiglipImageProcessor
        # (no crop), DeiTImageProcessor (squash to 256, then centre-crop 224)
        squash = True
        resize = height
        crop = int(crop_size) if do_crop and crop_size and int(crop_size) < height else height
    else:
        raise BackboneError(f"{what} has a size headstart does not read: {p.get('size')!r}")
    chosen = size or (min(crop, hub.VIT_DEFAULT_MAX) if vit else crop)
    interpolation = _RESAMPLE.get(int(p.get("resample", 3)), f"PIL code {p.get('resample')}")
    mean, std = p.get("image_mean", (0.5,) * 3), p.get("image_std", (0.5,) * 3)
    exact = resize if chosen == crop else round(chosen * resize / crop)  # no float floor at the native size
    prep = hub.centre_crop_prep(chosen, crop / resize, mean, std, interpolation, what=what, resize=exact)
    return dataclasses.replace(prep, squash=squash), chosen


def _build(folder: Path) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
        return AutoModel.from_config(config).eval()  # type: ignore[no-any-return]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise BackboneError(f"transformers cannot build the model in {folder}: {str(e).splitlines()[0]}") from None


def _shape(model: nn.Module) -> tuple[bool, int, bool]:
    """(image-text model, prefix tokens of a token model (0 for a CNN), ViT-like)."""
    config: Any = model.config
    if hasattr(model, "get_image_features") and getattr(config, "vision_config", None) is not None:
        return True, 0, True
    if getattr(config, "model_type", "") in ("convnext", "convnextv2", "resnet", "regnet", "efficientnet", "bit"):
        return False, 0, False
    return False, 1 + int(getattr(config, "num_register_tokens", 0) or 0), True


def _spec(name: hub.Name, folder: Path, weights: Any, source: str, how_to_get: str) -> BackboneSpec:
    model = _build(folder)
    image_text, prefix, vit = _shape(model)
    own = "default" if image_text else ("cls" if prefix else "mean")
    pool = name.pool or own
    if pool not in ("default", own) and not prefix:
        raise BackboneError(f"pooling {pool!r} needs a token model (a ViT); the model in {folder} pools :{own}")
    # An image-text model keeps its own size by default: its text tower was aligned with image
    # features at that size (zero-shot); other ViTs default to at most hub.VIT_DEFAULT_MAX.
    prep, size = preprocessing(folder, name.size, vit=vit and not image_text)
    vision: Any = getattr(model.config, "vision_config", None)
    resized = image_text and size != int(getattr(vision, "image_size", size))
    first = HFBody(model, pool, prefix, image_text, folder, resized=resized).eval()
    with torch.no_grad():
        dim = int(first(torch.zeros(1, 3, size, size)).shape[1])
    stash = [first]

    def build() -> tuple[nn.Module, nn.Module | None]:
        return (
            stash.pop() if stash else HFBody(_build(folder), pool, prefix, image_text, folder, resized=resized)
        ), None

    config: Any = model.config
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    return BackboneSpec(
        name=name.canonical(size, pool),
        feature_dim=dim,
        preprocessing=prep,
        weights_name=f"transformers {config.model_type} {arch}",
        source=source,
        build=build,
        find_weights=weights,
        how_to_get=how_to_get,
        read_state=lambda path: {},  # transformers reads the folder itself (HFBody.load_original_state_dict)
    )


def inspect_folder(folder: Path, *, size: int | None, pool: str | None) -> dict[str, Any]:
    weights = hub.folder_weights(folder, WEIGHTS)
    spec = _spec(hub.Name(str(folder), size, pool), folder, lambda: weights, "", "")
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    arch = (cfg.get("architectures") or [cfg.get("model_type")])[0]
    return hub.import_record(spec, weights, str(arch))


def imported_spec(name: hub.Name, entry: dict[str, Any]) -> BackboneSpec:
    folder, find_weights, how_to_get = hub.imported_folder(name.base, entry, "config.json")
    name = hub.Name(name.base, name.size or entry.get("image_size"), name.pool or entry.get("pooling"))
    source = f"imported transformers {entry.get('architecture')} ({folder})"
    return _spec(name, folder, find_weights, source, how_to_get)


def library_spec(name: hub.Name) -> BackboneSpec:
    """``hf/<repo-id>``: a snapshot already in the Hugging Face cache (never downloaded here)."""
    repo_id = name.base.split("/", 1)[1]
    snap = hub.cached_snapshot(repo_id, ("config.json",))
    fetch = (
        f"download it once on a machine with internet (`hf download {repo_id}`, or "
        f"AutoModel.from_pretrained('{repo_id}')), or {hub.how_to_import(name.base)}"
    )
    if snap is None:
        raise BackboneError(f"{repo_id} is not in the Hugging Face cache on this machine; {fetch}")

    def find() -> Path | None:
        return hub.weights_in(snap, WEIGHTS)

    return _spec(name, snap, find, f"transformers (Hugging Face cache, {repo_id})", fetch)


CONFIG_FILES = hub.CONFIG_FILES["hf"]  # what _build and preprocessing() read


def config_files(name: hub.Name, entry: dict[str, Any] | None, prep: Any) -> dict[str, bytes]:
    """For an exported model's ``backbone/``: the architecture's and the image processor's
    settings, never the weights nor the tokenizer (a zero-shot head is a linear layer in
    model.pt; predict runs no text tower)."""
    if entry is not None:
        folder: Path | None = Path(entry["path"])
    else:
        folder = hub.cached_snapshot(name.base.split("/", 1)[1], ("config.json",))
    if folder is None:
        raise BackboneError(f"{name.base} is not in the Hugging Face cache on this machine; re-extract with it")
    return {f: (folder / f).read_bytes() for f in CONFIG_FILES}


def folder_spec(name: hub.Name, folder: Path) -> BackboneSpec:
    """From an exported model's ``backbone/``; the weights come with the model."""
    gone = "an exported model brings its own weights (model.pt)"
    return _spec(name, folder, lambda: None, f"exported model ({folder})", gone)
