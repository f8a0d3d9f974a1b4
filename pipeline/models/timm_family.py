"""timm backbones: ``timm/<model>`` from timm's own download, or a folder timm's ``save_for_hf``
(or the Hugging Face hub) wrote: ``config.json`` naming the ``architecture`` + ``model_args`` +
``pretrained_cfg``, and ``model.safetensors``.

The network is ``timm.create_model`` of that architecture at random init, then the weights file
is read with safetensors and passed through the model module's own ``checkpoint_filter_fn``
(what ``timm.create_model(pretrained=True)`` does: it resamples a ViT's position embedding to
another image size). The preprocessing is ``timm.data.resolve_model_data_config``'s: resize the
short side to ``floor(size / crop_pct)`` (or, with ``crop_mode='squash'``, both sides), centre-crop
``size``, its interpolation, mean and std.

Pooling: the model's own pooled output (``forward_head(pre_logits=True)``; ``cls`` for a ViT
with ``global_pool='token'``, ``mean`` for a CNN's global average) or, for token models,
``cls``, ``mean`` (of the patch tokens, after the final norm) or ``cls+mean`` (both
concatenated, DINOv2's linear-probe recipe).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackboneError
from . import hub
from .backbones import BackboneSpec

WEIGHTS = ("model.safetensors", "pytorch_model.bin")


class TimmBody(nn.Module):
    """A timm model with its classifier removed, pooled as asked."""

    def __init__(self, model: nn.Module, pool: str, own_pool: str) -> None:
        super().__init__()
        self.model = model
        self.pool = pool
        self.own = pool in ("default", own_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.model.forward_features(x)  # type: ignore[operator]
        if self.own:
            return self.model.forward_head(f, pre_logits=True)  # type: ignore[operator,no-any-return]
        parts = []
        if self.pool.startswith("cls"):
            parts.append(f[:, 0])
        if self.pool.endswith("mean"):
            parts.append(f[:, int(self.model.num_prefix_tokens) :].mean(1))  # type: ignore[arg-type]
        return torch.cat(parts, 1)

    def load_original_state_dict(self, state: dict[str, torch.Tensor], head: nn.Module | None) -> None:
        prefix = str(getattr(self.model, "pretrained_cfg", {}).get("classifier") or "head")
        head_state = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        body_state = {k: v for k, v in state.items() if not k.startswith(prefix + ".")}
        # timm's own loading path: resamples a ViT's position embedding to this image size.
        filt = getattr(sys.modules[type(self.model).__module__], "checkpoint_filter_fn", None)
        if filt is not None:
            body_state = filt(body_state, self.model)
        self.model.load_state_dict(body_state, strict=True)
        if head is not None and head_state:
            head.load_state_dict(head_state)


def _own_pool(model: nn.Module) -> str:
    """The model's own pooling, named: a ViT keeps a string, CNNs a pooling module (ConvNeXt's
    lives in its head)."""
    gp: Any = getattr(model, "global_pool", None)
    if gp is None and isinstance(getattr(model, "head", None), nn.Module):
        gp = getattr(model.head, "global_pool", None)
    gp = getattr(gp, "pool_type", gp) if isinstance(gp, nn.Module) else gp
    gp = str(gp or "")
    return {"token": "cls", "avg": "mean", "fast": "mean", "avgmax": "default"}.get(gp, "default")


def _token_model(model: nn.Module) -> bool:
    return hasattr(model, "pos_embed") and hasattr(model, "num_prefix_tokens")


class _Recipe:
    """What builds one timm backbone: architecture, constructor arguments, pretrained config."""

    def __init__(self, arch: str, model_args: dict[str, Any], pretrained_cfg: dict[str, Any], what: str) -> None:
        self.arch, self.model_args, self.pretrained_cfg, self.what = arch, dict(model_args), dict(pretrained_cfg), what

    def create(self, size: int | None) -> nn.Module:
        import timm

        args = dict(self.model_args)
        if size is not None:
            args["img_size"] = size
        try:
            return timm.create_model(self.arch, pretrained=False, pretrained_cfg=self.pretrained_cfg, **args)
        except (RuntimeError, ValueError, KeyError, TypeError, AssertionError) as e:
            raise BackboneError(f"timm cannot build {self.what} ({self.arch}): {e}") from None

    def resolve(self, size: int | None, pool: str | None) -> tuple[nn.Module, int, str, Any]:
        """(model at the chosen size, size, pooling, timm's data config)."""
        import timm.data

        model = self.create(None)
        native = int(timm.data.resolve_model_data_config(model)["input_size"][-1])
        vit = _token_model(model)
        chosen = size or (min(native, hub.VIT_DEFAULT_MAX) if vit else native)
        if vit:  # a ViT's position embedding is sized at construction (the class default may differ)
            model = self.create(chosen)
        own = _own_pool(model)
        pool = pool or own
        if pool not in ("default", own) and not vit:
            raise BackboneError(
                f"pooling {pool!r} needs a token model (a ViT); {self.what} pools its own way: use :{own}"
            )
        if pool.startswith("cls") and pool != own and int(getattr(model, "num_prefix_tokens", 0)) < 1:
            raise BackboneError(f"{self.what} has no class token; use :mean")
        return model, chosen, pool, timm.data.resolve_model_data_config(model)


def _parts(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The model with its classifier reset, and a copy of that classifier (None if it has none)."""
    head = None
    if int(getattr(model, "num_classes", 0) or 0) > 0:
        head = copy.deepcopy(model.get_classifier())  # type: ignore[operator]
        model.reset_classifier(0)  # type: ignore[operator]
    return model, head


def _spec(name: hub.Name, recipe: _Recipe, weights: Any, source: str, how_to_get: str) -> BackboneSpec:
    model, size, pool, data = recipe.resolve(name.size, name.pool)
    prep = hub.centre_crop_prep(
        size, float(data.get("crop_pct", 1.0)), data["mean"], data["std"], data["interpolation"], what=recipe.what
    )
    mode = data.get("crop_mode") or "center"
    if mode not in ("center", "squash"):
        raise BackboneError(f"{recipe.what} asks for crop_mode {mode!r}; headstart reads 'center' and 'squash'")
    # squash: both edges to floor(size / crop_pct), then the centre crop (transforms_imagenet_eval)
    prep = dataclasses.replace(prep, squash=mode == "squash")
    body0, head0 = _parts(model)
    first = TimmBody(body0, pool, _own_pool(body0)).eval()
    with torch.no_grad():
        dim = int(first(torch.zeros(1, 3, size, size)).shape[1])
    stash = [(first, head0)]  # the model built to measure its width serves the first build()

    def build() -> tuple[nn.Module, nn.Module | None]:
        if stash:
            return stash.pop()
        again, head = _parts(recipe.create(size if _token_model(model) else None))
        return TimmBody(again, pool, _own_pool(again)), head

    tag = recipe.pretrained_cfg.get("tag")
    return BackboneSpec(
        name=name.canonical(size, pool),
        feature_dim=dim,
        preprocessing=prep,
        weights_name=f"timm {recipe.arch}" + (f".{tag}" if tag else ""),
        source=source,
        build=build,
        find_weights=weights,
        how_to_get=how_to_get,
        read_state=hub.read_safetensors,
    )


def _folder_recipe(folder: Path) -> _Recipe:
    try:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        arch = str(cfg["architecture"])
    except (OSError, ValueError, KeyError) as e:
        raise BackboneError(f"{folder / 'config.json'} is not a timm config ({e})") from None
    pretrained = dict(cfg.get("pretrained_cfg") or {})
    args = dict(cfg.get("model_args") or {})
    args.setdefault("num_classes", int(cfg.get("num_classes", pretrained.get("num_classes", 0)) or 0))
    if "global_pool" in cfg:
        args.setdefault("global_pool", cfg["global_pool"])
    return _Recipe(arch, args, pretrained, f"timm model {arch} in {folder}")


def inspect_folder(folder: Path, *, size: int | None, pool: str | None) -> dict[str, Any]:
    """For ``backbones import``: build the model and load its weights once, as a check."""
    weights = hub.folder_weights(folder, WEIGHTS)
    recipe = _folder_recipe(folder)
    spec = _spec(hub.Name(str(folder), size, pool), recipe, lambda: weights, "", "")
    return hub.import_record(spec, weights, recipe.arch)


def imported_spec(name: hub.Name, entry: dict[str, Any]) -> BackboneSpec:
    name = hub.Name(name.base, name.size or entry.get("image_size"), name.pool or entry.get("pooling"))
    folder, find_weights, how_to_get = hub.imported_folder(name.base, entry, "config.json")
    source = f"imported timm {entry.get('architecture')} ({folder})"
    return _spec(name, _folder_recipe(folder), find_weights, source, how_to_get)


def library_spec(name: hub.Name) -> BackboneSpec:
    """``timm/<model>[.<tag>]``: the architecture from timm's registry, the weights from the
    snapshot timm's own download left in the Hugging Face cache."""
    import timm

    model_name = name.base.split("/", 1)[1]
    arch = model_name.split(".", 1)[0]
    if not timm.is_model(arch):
        raise BackboneError(f'timm has no model {arch!r}; `python -c "import timm; print(timm.list_models())"`')
    cfg = timm.models.get_pretrained_cfg(model_name)
    pretrained = cfg.to_dict() if cfg is not None else {}
    hub_id = pretrained.get("hf_hub_id") or f"timm/{model_name}"
    fetch = (
        f"download it once on a machine with internet (python -c \"import timm; timm.create_model('{model_name}', "
        f'pretrained=True)", which fills the Hugging Face cache), or {hub.how_to_import(name.base)}'
    )

    def find() -> Path | None:
        snap = hub.cached_snapshot(hub_id, WEIGHTS)
        return hub.weights_in(snap, WEIGHTS) if snap is not None else None

    if find() is None:  # before building: a random-init ViT-g takes a minute to say the same
        raise BackboneError(f"weights for {name.base} are not on this machine; {fetch}")
    return _spec(name, _library_recipe(name)[0], find, f"timm (Hugging Face cache, {hub_id})", fetch)


def _library_recipe(name: hub.Name) -> tuple[_Recipe, Path | None]:
    """The recipe of ``timm/<model>``, and the cached snapshot folder whose config.json it read
    (None: timm's built-in config)."""
    import timm

    model_name = name.base.split("/", 1)[1]
    cfg = timm.models.get_pretrained_cfg(model_name)
    pretrained = cfg.to_dict() if cfg is not None else {}
    hub_id = pretrained.get("hf_hub_id") or f"timm/{model_name}"
    snap = hub.cached_snapshot(hub_id, ("config.json",))
    if snap is not None and (snap / "config.json").is_file():
        return _folder_recipe(snap), snap  # the downloaded config wins over timm's built-in one
    arch = model_name.split(".", 1)[0]
    return _Recipe(arch, {"num_classes": int(pretrained.get("num_classes", 1000) or 0)}, pretrained, name.base), None


def config_files(name: hub.Name, entry: dict[str, Any] | None, prep: Any) -> dict[str, bytes]:
    """For an exported model's ``backbone/``: the config.json the network was built from (the
    imported folder's, the cached snapshot's), or one written from timm's built-in config in
    ``save_for_hf``'s layout (architecture, model_args, pretrained_cfg)."""
    if entry is not None:
        return {"config.json": (Path(entry["path"]) / "config.json").read_bytes()}
    recipe, snap = _library_recipe(name)
    if snap is not None:
        return {"config.json": (snap / "config.json").read_bytes()}
    doc = {"architecture": recipe.arch, "model_args": recipe.model_args, "pretrained_cfg": recipe.pretrained_cfg}
    return {"config.json": (json.dumps(doc, indent=2, default=list) + "\n").encode()}


def folder_spec(name: hub.Name, folder: Path) -> BackboneSpec:
    """From an exported model's ``backbone/config.json``; the weights come with the model."""
    gone = "an exported model brings its own weights (model.pt)"
    return _spec(name, _folder_recipe(folder), lambda: None, f"exported model ({folder})", gone)
