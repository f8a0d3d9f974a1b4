"""Backbones from timm, Hugging Face transformers and open_clip, behind the one registry.

A library backbone is named ``FAMILY/ID`` (``timm/vit_small_patch14_dinov2.lvd142m``,
``hf/facebook/dinov2-small``, ``open_clip/ViT-B-16:openai``) or by the name it was imported
under (``headstart backbones import DIR --as NAME``, :mod:`.imported`). Each family builds the
network through its own library's factory and reads the preprocessing the library prescribes.

**The canonical name carries the image size and the pooling**, ``BASE@SIZE:POOL``
(``dinov2s@224:cls+mean``). That name is what the feature fingerprint records, so features
computed at another size or with another pooling never mix with these, and the fingerprint
module needs no new field. ``--backbone dinov2s`` means the family's default size
(:data:`DEFAULT_SIZES`) and pooling; ``--backbone dinov2s@336:cls`` (or ``--image-size 336``)
overrides them.

**No network, ever.** Weights are read from a folder on disk: an imported one, or the snapshot
a library's own download left in the Hugging Face cache (looked up with
``local_files_only=True``). A model whose weights are not on disk fails at once with the
command to run; ``HF_HUB_OFFLINE`` is set before any of these libraries is imported, so no code
path of theirs can wait on a network that is not there.

The libraries are optional extras, imported only when such a backbone is used (importing timm
alone takes seconds).
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from ..data.preprocessing import Preprocessing
from ..errors import BackboneError

FAMILIES = {"timm": "timm", "hf": "transformers", "open_clip": "open_clip"}  # family -> import name
EXTRAS = {"timm": "timm", "hf": "hf", "open_clip": "open_clip"}
MODULES = {"timm": "timm_family", "hf": "hf_family", "open_clip": "openclip_family"}
# family -> the files that build its architecture, copied into an exported model's backbone/
CONFIG_FILES = {
    "timm": ("config.json",),
    "hf": ("config.json", "preprocessor_config.json"),
    "open_clip": ("open_clip_config.json",),
}
POOLINGS = ("cls", "mean", "cls+mean")  # + "default": the library's own pooled output
# Product photos rarely need more than 224 px, and a ViT's cost grows with the square of its
# token count: DINOv2's native 518 px is ~8.6x the compute of 224 px. So a ViT-style model whose
# library recipe is above this size defaults to it (``@SIZE`` overrides); CNNs keep theirs.
VIT_DEFAULT_MAX = 224
# What each family's default size is, in words (``headstart backbones``, README "Backbones").
# Image-text models keep theirs: their text tower was aligned with features at that size.
DEFAULT_SIZES = {
    "timm": f"ViTs at most {VIT_DEFAULT_MAX} px, CNNs their own",
    "hf": f"ViTs at most {VIT_DEFAULT_MAX} px, CNNs and CLIP/SigLIP their own",
    "open_clip": "the tower's own (fixed)",
}


@dataclass(frozen=True)
class Name:
    base: str  # "timm/test_vit", "hf/org/repo", "open_clip/ViT-B-16:openai", or an imported name
    size: int | None  # None: the family's default
    pool: str | None  # None: the family's default

    def canonical(self, size: int, pool: str) -> str:
        return f"{self.base}@{size}:{pool}"


def parse_name(name: str) -> Name:
    """``BASE[@SIZE][:POOL]`` or ``BASE[@:POOL]``. The options start at the last ``@`` (neither
    a timm name, a Hugging Face repository id nor an open_clip ``arch:tag`` contains one)."""
    base, at, opts = name.rpartition("@")
    if not at:
        return Name(name, None, None)
    size_text, _, pool = opts.partition(":")
    size: int | None = None
    if size_text:
        if not size_text.isdigit() or not 8 <= int(size_text) <= 4096:
            raise BackboneError(f"{name!r}: the image size after '@' must be a number of pixels, e.g. {base}@224")
        size = int(size_text)
    if pool and pool not in (*POOLINGS, "default"):
        raise BackboneError(f"{name!r}: unknown pooling {pool!r}; choose one of {', '.join((*POOLINGS, 'default'))}")
    return Name(base, size, pool or None)


def family_of(base: str) -> str | None:
    head, slash, _ = base.partition("/")
    return head if slash and head in FAMILIES else None


def offline() -> None:
    """Before any hub-backed library is imported: they read these once, at import time."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def require(family: str) -> ModuleType:
    """The library of ``family``, imported now; a missing one is an Error naming the extra."""
    offline()
    try:
        return importlib.import_module(FAMILIES[family])
    except ImportError as e:
        raise BackboneError(
            f"{family} backbones need the {FAMILIES[family]} library ({e}); install the extra: "
            f"pip install 'headstart[{EXTRAS[family]}]' (or pip install '.[{EXTRAS[family]}]' in a checkout)"
        ) from None


def family_module(family: str) -> ModuleType:
    require(family)
    try:
        return importlib.import_module(f"{__package__}.{MODULES[family]}")
    except ModuleNotFoundError as e:
        if e.name != f"{__package__}.{MODULES[family]}":
            raise
        raise BackboneError(f"{family} backbones are not supported by this headstart yet") from None


def library_available(family: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(FAMILIES[family]) is not None


def read_safetensors(path: Path) -> dict[str, Any]:
    """A ``.safetensors`` file (tensors only, no pickle); ``.bin``/``.pth`` via weights_only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]


def cached_snapshot(repo_id: str, files: tuple[str, ...]) -> Path | None:
    """The folder of ``repo_id``'s snapshot in the Hugging Face cache if it holds one of
    ``files``, looked up on disk only (``try_to_load_from_cache`` never opens a connection)."""
    offline()
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    for f in files:
        hit = try_to_load_from_cache(repo_id, f)
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def weights_in(folder: Path, names: tuple[str, ...]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


# ----------------------------------------------------------------- imported folders (all families)


def folder_weights(folder: Path, names: tuple[str, ...]) -> Path:
    """The weights file of a folder being imported, or an Error naming what was looked for."""
    weights = weights_in(folder, names)
    if weights is None:
        raise BackboneError(f"{folder} holds no {' or '.join(names)}")
    return weights


def import_record(spec: Any, weights: Path, architecture: str) -> dict[str, Any]:
    """What ``backbones import`` records of a folder, once ``spec`` (built from it) has been
    built and its weights loaded as a check."""
    from .backbones import load_backbone

    load_backbone(spec)
    parsed = parse_name(spec.name)
    return {
        "architecture": architecture,
        "image_size": parsed.size,
        "pooling": parsed.pool,
        "feature_dim": spec.feature_dim,
        "weights_file": str(weights),
    }


def imported_folder(base: str, entry: dict[str, Any], config_file: str) -> tuple[Path, Any, str]:
    """An imported entry's folder, a ``find_weights`` for its weights file and what to do when
    they are gone; an Error if the folder itself is gone."""
    folder, weights = Path(entry["path"]), Path(entry["weights_file"])
    if not (folder / config_file).is_file():
        raise BackboneError(f"the folder imported as {base!r} is gone ({folder}); import it again")
    how_to_get = f"the folder imported as {base!r} lost its weights; import it again"
    return folder, lambda: weights if weights.is_file() else None, how_to_get


def centre_crop_prep(
    crop: int, crop_pct: float, mean: Any, std: Any, interpolation: str, *, what: str, resize: int | None = None
) -> Preprocessing:
    """Resize the short side to ``floor(crop / crop_pct)``, centre-crop ``crop``: the eval
    recipe of timm (``transforms_factory.transforms_imagenet_eval``) and open_clip."""
    import math

    if interpolation not in ("bilinear", "bicubic"):
        raise BackboneError(f"{what} asks for {interpolation!r} resizing; headstart resizes bilinear or bicubic only")
    return Preprocessing(
        resize=resize or math.floor(crop / crop_pct),
        crop=crop,
        mean=tuple(float(v) for v in mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in std),  # type: ignore[arg-type]
        interpolation=interpolation,
    )


# name -> spec: building one builds the model (to measure its width), so a process does it once
# per name. ``imported`` clears it whenever the local registry changes.
_SPECS: dict[str, Any] = {}


def forget() -> None:
    _SPECS.clear()


def resolve(name: str) -> Any:
    """The spec of a library or imported backbone name, or None when ``name`` is neither (the
    registry then lists the valid names)."""
    if name in _SPECS:
        return _SPECS[name]
    parsed = parse_name(name)
    family = family_of(parsed.base)
    if family is not None:
        spec = family_module(family).library_spec(parsed)
    else:
        from .imported import lookup

        entry = lookup(parsed.base)
        if entry is None:
            return None
        spec = family_module(entry["family"]).imported_spec(parsed, entry)
    _SPECS[name] = _SPECS[spec.name] = spec
    return spec


def how_to_import(base: str) -> str:
    return (
        f"copy the model's folder (config.json + model.safetensors, as the library downloads it) to this "
        f"machine and run `headstart backbones import DIR --as {base.rsplit('/', 1)[-1]}`"
    )


# --------------------------------------------------------------------------- exported models
# An exported model holds every weight in model.pt; what it cannot hold is the architecture's
# configuration, which otherwise comes from this machine's registry (an imported folder, the
# Hugging Face cache, the library's built-in configs). ``architecture_files`` gives those few
# small files (never weights) for ``MODEL/backbone/``; ``build_from_folder`` builds the network
# back from them on a machine that has neither the registry entry nor the cache.


def architecture_files(name: str, prep: Preprocessing) -> tuple[str, dict[str, bytes]] | None:
    """(family, file name -> bytes) that build the architecture of the library or imported
    backbone ``name``; None for any other name (the built-in backbones are built from code)."""
    parsed = parse_name(name)
    family = family_of(parsed.base)
    entry = None
    if family is None:
        from .imported import lookup

        entry = lookup(parsed.base)
        if entry is None:
            return None
        family = str(entry["family"])
    try:
        return family, family_module(family).config_files(parsed, entry, prep)
    except OSError as e:
        raise BackboneError(f"cannot read the configuration of {name} ({e}); {how_to_import(parsed.base)}") from None


def build_from_folder(family: str, folder: Path, canonical_name: str) -> Any:
    """The spec of ``canonical_name`` (``BASE@SIZE:POOL``) built from the configuration files in
    ``folder`` alone: no registry, no cache, no weights (``load_backbone(load_weights=False)``)."""
    if family not in FAMILIES:
        raise BackboneError(f"unknown backbone family {family!r}; choose one of {', '.join(FAMILIES)}")
    parsed = parse_name(canonical_name)
    if parsed.size is None or parsed.pool is None:
        raise BackboneError(f"{canonical_name!r} is not a canonical backbone name (BASE@SIZE:POOL)")
    return family_module(family).folder_spec(parsed, folder)
