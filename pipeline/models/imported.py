"""The local registry of imported backbones: ``headstart backbones import PATH --as NAME``.

A small JSON file, ``backbones.json`` in headstart's cache directory (``$HEADSTART_CACHE_DIR``,
else ``$XDG_CACHE_HOME/headstart``, else ``~/.cache/headstart``), replaced atomically on every
change so a killed import leaves the old registry or the new one. Each entry records where the
folder is (it is used in place, not copied: a ViT-B checkpoint is 350 MB), the sha256 of its
weights file, the family and architecture, the default pooling and image size and the feature
width; docs/formats.md has the layout. From then on ``--backbone NAME`` works with no network.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from pathlib import Path
from typing import Any

from ..core.atomic import atomic_file
from ..core.hashing import sha256_file
from ..errors import BackboneError
from . import hub

FORMAT = "headstart-backbones"
VERSION = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def registry_path() -> Path:
    from .engine import cache_dir

    return cache_dir() / "backbones.json"


def read_registry() -> dict[str, dict[str, Any]]:
    path = registry_path()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot read the backbone registry {path}: {e}; delete it and import again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("backbones"), dict):
        raise BackboneError(f"{path} is not a headstart backbone registry; delete it and import again")
    return dict(data["backbones"])


def lookup(name: str) -> dict[str, Any] | None:
    return read_registry().get(name)


def _write(entries: dict[str, dict[str, Any]]) -> None:
    doc = {"format": FORMAT, "version": VERSION, "backbones": dict(sorted(entries.items()))}
    with atomic_file(registry_path()) as f:
        f.write((json.dumps(doc, indent=2, ensure_ascii=False) + "\n").encode())
    hub.forget()


def detect_family(folder: Path) -> str:
    """Which library wrote ``folder``: timm's ``save_for_hf`` (config.json with an
    ``architecture``), transformers (config.json with a ``model_type``) or open_clip
    (``open_clip_config.json``)."""
    if (folder / "open_clip_config.json").is_file():
        return "open_clip"
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise BackboneError(
            f"{folder} has no config.json (nor open_clip_config.json): import the model's whole folder, as "
            "huggingface_hub.snapshot_download or timm's save_for_hf writes it"
        )
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BackboneError(f"cannot read {cfg}: {e}") from None
    if isinstance(data, dict) and "architecture" in data:
        return "timm"
    if isinstance(data, dict) and "model_type" in data:
        return "hf"
    raise BackboneError(f"{cfg} names neither a timm 'architecture' nor a transformers 'model_type'")


def import_backbone(
    path: str | Path, name: str, *, family: str | None = None, size: int | None = None, pool: str | None = None
) -> dict[str, Any]:
    """Check that ``path`` builds and loads with its library, then record it under ``name``.

    The model is built and its weights loaded once here, so a folder that does not fit its
    config is refused now rather than at the first extract."""
    if not _NAME.match(name) or name in ("tiny",) or "/" in name:
        raise BackboneError(f"{name!r} is not a usable name: letters, digits, '.', '_' and '-', up to 64")
    from .backbones import _REGISTRY

    if name in _REGISTRY:
        raise BackboneError(f"{name!r} is a built-in backbone; import under another name")
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise BackboneError(f"{path} is not a folder; import the model's folder (config.json + weights)")
    family = family or detect_family(folder)
    if family not in hub.FAMILIES:
        raise BackboneError(f"unknown family {family!r}; choose one of {', '.join(hub.FAMILIES)}")
    module = hub.family_module(family)
    entry = module.inspect_folder(folder, size=size, pool=pool)  # family, architecture, size, pool, dim, weights
    weights = Path(entry["weights_file"])
    entry.update(
        family=family,
        path=str(folder),
        weights_sha256=sha256_file(weights),
        imported_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )
    entries = read_registry()
    entries[name] = entry
    _write(entries)
    return entry


def remove(name: str) -> None:
    entries = read_registry()
    if entries.pop(name, None) is None:
        raise BackboneError(f"no imported backbone {name!r}; `headstart backbones` lists them")
    _write(entries)


def listing(default: str) -> list[dict[str, Any]]:
    """Rows for ``headstart backbones``: the built-in backbones, the imported ones, the library
    models whose weights are in the Hugging Face cache, and one row per library family."""
    from .backbones import get_spec, names

    rows = []
    for name in names():
        spec = get_spec(name)
        rows.append(
            _row(
                name,
                spec.feature_dim,
                spec.preprocessing.crop,
                spec.weights_name,
                spec.available(),
                spec.source,
                default=name == default,
            )
        )
    for name, e in read_registry().items():
        ok = Path(e.get("weights_file", "")).is_file()
        rows.append(
            _row(
                name,
                e.get("feature_dim"),
                e.get("image_size"),
                f"{e.get('family')} {e.get('architecture')}",
                ok,
                f"imported {e.get('family')} {e.get('architecture')} ({e.get('path')}), pooling {e.get('pooling')}",
                kind="imported",
            )
        )
    for name, family, folder in cached_library_models():
        rows.append(_row(name, None, None, family, True, f"{family} (Hugging Face cache, {folder})", kind="cached"))
    for family, lib in hub.FAMILIES.items():
        have = hub.library_available(family)
        pattern = {"timm": "timm/MODEL", "hf": "hf/REPO-ID", "open_clip": "open_clip/ARCH:TAG"}[family]
        source = f"{lib} installed" if have else f"needs pip install 'headstart[{hub.EXTRAS[family]}]'"
        source += f"; weights from its cache or an import; default size: {hub.DEFAULT_SIZES[family]}"
        rows.append(_row(pattern, None, None, family, have, source, kind="family"))
    return rows


def _row(
    name: str, dim: Any, size: Any, weights: str, ok: bool, source: str, *, default: bool = False, kind: str = "builtin"
) -> dict[str, Any]:
    return {
        "name": name,
        "feature_dim": dim,
        "input": size,
        "weights": weights,
        "available": ok,
        "source": source,
        "default": default,
        "kind": kind,
    }


def cached_library_models() -> list[tuple[str, str, str]]:
    """(backbone name, family, snapshot folder) of the models in the Hugging Face cache, read
    from its folder layout (``models--ORG--NAME/snapshots/REV/``) with no network."""
    hub.offline()
    try:
        from huggingface_hub import constants
    except ImportError:
        return []
    out = []
    for repo in sorted(Path(constants.HF_HUB_CACHE).glob("models--*")):
        repo_id = repo.name[len("models--") :].replace("--", "/")
        for snap in sorted((repo / "snapshots").glob("*"))[:1]:
            if (snap / "open_clip_config.json").is_file():
                out.append((f"open_clip/hf-hub:{repo_id}", "open_clip", str(snap)))
            elif (snap / "config.json").is_file():
                try:
                    family = detect_family(snap)
                except BackboneError:
                    continue
                name = (
                    f"timm/{repo_id.split('/', 1)[1]}"
                    if family == "timm" and repo_id.startswith("timm/")
                    else (f"hf/{repo_id}")
                )
                if family == "timm" and not repo_id.startswith("timm/"):
                    continue
                out.append((name, family, str(snap)))
    return out
