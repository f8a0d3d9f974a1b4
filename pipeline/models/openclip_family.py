"""open_clip image towers: ``open_clip/<arch>:<tag>`` from the Hugging Face cache, or a folder in
open_clip's own hub layout (what ``open_clip.push_to_hf_hub.save_for_hf`` writes and
``create_model('local-dir:...')`` reads): ``open_clip_config.json`` (``model_cfg`` +
``preprocess_cfg``) and ``open_clip_model.safetensors``.

The network is ``open_clip.create_model(..., load_weights=False)``; the body is its image tower
(``model.visual``), whose output is the projected image embedding, the space the text tower
shares (what a zero-shot head needs); its pooling is the tower's own (``default``). The
preprocessing is ``open_clip.get_model_preprocess_cfg``'s (size, mean, std, interpolation,
``resize_mode``: ``shortest`` crops the centre, ``squash`` resizes to the square), what
``open_clip.image_transform(is_train=False)`` builds. The tower runs at its own size (its
position embedding is fixed), so ``@SIZE`` must equal it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import BackboneError
from . import hub
from .backbones import BackboneSpec

WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin")


class OpenClipBody(nn.Module):
    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return self.visual(x)  # type: ignore[no-any-return]
        # nn.MultiheadAttention's inference fast path (aten::_native_multi_head_attention) has no
        # ONNX export; the plain path computes the same function.
        was = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            return self.visual(x)  # type: ignore[no-any-return]
        finally:
            torch.backends.mha.set_fastpath_enabled(was)

    def load_original_state_dict(self, state: dict[str, torch.Tensor], head: nn.Module | None) -> None:
        visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
        self.visual.load_state_dict(visual, strict=True)


def create(model_name: str, **kw: Any) -> nn.Module:
    """The whole CLIP model at random init (the zero-shot head needs its text tower too)."""
    import logging

    import open_clip

    # open_clip warns "No pretrained weights loaded ... initialized randomly": true of this
    # step, false of the backbone, whose weights are loaded right after (load_backbone).
    was = logging.root.manager.disable
    logging.disable(max(was, logging.WARNING))
    try:
        return open_clip.create_model(model_name, pretrained=None, load_weights=False, **kw).eval()  # type: ignore[no-any-return]
    except (RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
        raise BackboneError(f"open_clip cannot build {model_name}: {e}") from None
    finally:
        logging.disable(was)


def _spec(name: hub.Name, model_name: str, weights: Any, source: str, how_to_get: str, **kw: Any) -> BackboneSpec:
    import open_clip

    model = create(model_name, **kw)
    cfg = open_clip.get_model_preprocess_cfg(model)
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    if name.size not in (None, size):
        raise BackboneError(f"{model_name} runs at {size} px (its position embedding is fixed); drop @{name.size}")
    if name.pool not in (None, "default"):
        raise BackboneError("an open_clip image tower has its own pooling (its projected embedding); use :default")
    mode = cfg.get("resize_mode") or "shortest"
    if mode not in ("shortest", "squash"):
        raise BackboneError(f"{model_name} resizes with {mode!r}; headstart reads 'shortest' and 'squash'")
    prep = hub.centre_crop_prep(
        size, 1.0, cfg["mean"], cfg["std"], cfg.get("interpolation", "bicubic"), what=model_name
    )
    # squash (open_clip's SigLIP and CLIPA tags): the photo resized to size x size, no crop
    prep = dataclasses.replace(prep, squash=mode == "squash")
    visual: Any = model.visual
    stash = [OpenClipBody(visual).eval()]
    with torch.no_grad():
        dim = int(stash[0](torch.zeros(1, 3, size, size)).shape[1])

    def build() -> tuple[nn.Module, nn.Module | None]:
        return (stash.pop() if stash else OpenClipBody(create(model_name, **kw).visual)), None  # type: ignore[arg-type]

    return BackboneSpec(
        name=name.canonical(size, "default"),
        feature_dim=dim,
        preprocessing=prep,
        weights_name=f"open_clip {model_name}",
        source=source,
        build=build,
        find_weights=weights,
        how_to_get=how_to_get,
        read_state=hub.read_safetensors,
    )


def inspect_folder(folder: Path, *, size: int | None, pool: str | None) -> dict[str, Any]:
    weights = hub.folder_weights(folder, WEIGHTS)
    spec = _spec(hub.Name(str(folder), size, pool), f"local-dir:{folder}", lambda: weights, "", "")
    cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    arch = cfg.get("model_name") or cfg["model_cfg"].get("vision_cfg", {}).get("timm_model_name") or "CLIP"
    return hub.import_record(spec, weights, str(arch))


def imported_spec(name: hub.Name, entry: dict[str, Any]) -> BackboneSpec:
    folder, find_weights, how_to_get = hub.imported_folder(name.base, entry, "open_clip_config.json")
    return _spec(name, f"local-dir:{folder}", find_weights, f"imported open_clip ({folder})", how_to_get)


HF_HUB = "hf-hub"  # open_clip/hf-hub:REPO-ID: a repository in open_clip's hub layout


def hub_folder(name: hub.Name) -> Path | None:
    """The cached snapshot of ``open_clip/hf-hub:REPO-ID`` (what ``headstart backbones`` lists
    for an open_clip folder in the Hugging Face cache), None for ``ARCH:TAG`` names; an Error
    when it is not cached."""
    arch, _, repo_id = name.base.split("/", 1)[1].partition(":")
    if arch != HF_HUB:
        return None
    snap = hub.cached_snapshot(repo_id, ("open_clip_config.json",))
    if snap is None or not (snap / "open_clip_config.json").is_file():
        raise BackboneError(
            f"{repo_id} is not in the Hugging Face cache on this machine; download it once on a machine with "
            f"internet (`hf download {repo_id}`), or {hub.how_to_import(repo_id)}"
        )
    return snap


def library_spec(name: hub.Name) -> BackboneSpec:
    """``open_clip/<arch>:<tag>``: the architecture from open_clip's configs, the weights from
    the snapshot open_clip's own download left in the Hugging Face cache. ``open_clip/hf-hub:
    REPO-ID``: a cached repository in open_clip's hub layout, read as a ``local-dir``."""
    import open_clip

    snap = hub_folder(name)
    if snap is not None:
        weights = hub.weights_in(snap, WEIGHTS)
        how = f"{snap} holds no weights; download the repository again"
        if weights is None:
            raise BackboneError(f"weights for {name.base} are not on this machine; {how}")
        return _spec(name, f"local-dir:{snap}", lambda: weights, f"open_clip (Hugging Face cache, {snap})", how)
    arch, _, tag = name.base.split("/", 1)[1].partition(":")
    if arch not in open_clip.list_models():
        raise BackboneError(
            f'open_clip has no model {arch!r}; `python -c "import open_clip; print(open_clip.list_models())"`'
        )
    cfg = open_clip.get_pretrained_cfg(arch, tag) if tag else {}
    hub_id = str(cfg.get("hf_hub", "")).strip("/")
    fetch = (
        f'download it once on a machine with internet (python -c "import open_clip; '
        f"open_clip.create_model('{arch}', pretrained='{tag}'); open_clip.get_tokenizer('{arch}')\"; "
        f"the tokenizer is for zero-shot heads), or {hub.how_to_import(name.base)}"
    )
    if not hub_id:
        raise BackboneError(f"open_clip has no Hugging Face copy of {arch}:{tag}; {fetch}")

    def find() -> Path | None:
        snap = hub.cached_snapshot(hub_id, WEIGHTS)
        return hub.weights_in(snap, WEIGHTS) if snap is not None else None

    if find() is None:  # before building the model: that alone takes seconds for a ViT-B
        raise BackboneError(f"weights for {name.base} are not on this machine; {fetch}")

    # what the tag was trained with: OpenAI's weights use QuickGELU, and their mean/std
    prep = {k: cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in cfg}
    return _spec(
        name,
        arch,
        find,
        f"open_clip (Hugging Face cache, {hub_id})",
        fetch,
        force_quick_gelu=bool(cfg.get("quick_gelu", False)),
        force_preprocess_cfg=prep,
    )


def config_files(name: hub.Name, entry: dict[str, Any] | None, prep: Any) -> dict[str, bytes]:
    """For an exported model's ``backbone/``: an ``open_clip_config.json`` (open_clip's own
    hub layout): the imported folder's, or for ``open_clip/ARCH:TAG`` the built-in ``model_cfg``
    with the tag's QuickGELU switch and the preprocessing the features were made with."""
    if entry is not None:
        return {"open_clip_config.json": (Path(entry["path"]) / "open_clip_config.json").read_bytes()}
    snap = hub_folder(name)
    if snap is not None:
        return {"open_clip_config.json": (snap / "open_clip_config.json").read_bytes()}
    import open_clip

    arch, _, tag = name.base.split("/", 1)[1].partition(":")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise BackboneError(f"open_clip has no model {arch!r}")
    if (open_clip.get_pretrained_cfg(arch, tag) if tag else {}).get("quick_gelu", False):
        model_cfg["quick_gelu"] = True  # what library_spec's force_quick_gelu does
    preprocess = {
        "size": prep.crop,
        "mean": list(prep.mean),
        "std": list(prep.std),
        "interpolation": prep.interpolation,
        "resize_mode": "squash" if prep.squash else "shortest",  # _spec refuses any other
    }
    doc = {"model_cfg": model_cfg, "preprocess_cfg": preprocess}
    return {"open_clip_config.json": (json.dumps(doc, indent=2) + "\n").encode()}


def folder_spec(name: hub.Name, folder: Path) -> BackboneSpec:
    """From an exported model's ``backbone/open_clip_config.json``; the weights come with the
    model (open_clip logs a warning when a ``local-dir`` has none: not worth a line in predict)."""
    import logging

    was = logging.root.manager.disable
    logging.disable(max(was, logging.WARNING))
    try:
        gone = "an exported model brings its own weights (model.pt)"
        return _spec(name, f"local-dir:{folder}", lambda: None, f"exported model ({folder})", gone)
    finally:
        logging.disable(was)
