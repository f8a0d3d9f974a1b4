"""``MODEL/backbone/``: the architecture of a library or imported backbone, inside the model.

``model.pt`` holds every weight, but a library backbone's *architecture* - timm's
``config.json``, transformers' ``config.json`` + ``preprocessor_config.json``, open_clip's
``open_clip_config.json`` - lived only on the exporting machine (an imported folder, the Hugging
Face cache, the library's built-in configs), so the model loaded nowhere else. Export copies
those few small files (never weights, never a tokenizer: a zero-shot head is a linear layer in
``model.pt``) into ``backbone/``, lists them in the manifest's ``files`` as
``backbone/NAME`` with their sha256, and records ``architecture: {family, folder}``.

Loading **always** builds the network from ``backbone/`` when the manifest has one, never from
this machine's registry, even where the name is registered: the name means whatever was
imported under it *here* (another folder, another config), and a library's built-in config can
change between its versions, while the files in the model are the ones its weights were
exported and parity-checked with.

The torchvision and EfficientNet-Lite backbones (and ``tiny``) are built from headstart's own
code and get no folder; ONNX models carry their graph and need none either.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core.hashing import sha256_file
from ..errors import ArtifactError
from ..models import hub
from ..models.fingerprint import Fingerprint
from .head_dir import checked_files, verify_files

FOLDER = "backbone"
_PREFIX = FOLDER + "/"


def write_architecture(fp: Fingerprint, stage: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Copy the architecture files of ``fp``'s backbone into ``stage/backbone/``. Returns the
    manifest entries (``{"architecture": ...}``, empty for a built-in backbone) and the
    ``files`` entries (``backbone/NAME -> sha256``)."""
    from ..models.backbones import names

    if fp.backbone in names():
        return {}, {}
    found = hub.architecture_files(fp.backbone, fp.preprocessing)
    if found is None:
        return {}, {}
    family, files = found
    folder = stage / FOLDER
    folder.mkdir()
    recorded = {}
    for name, data in files.items():
        (folder / name).write_bytes(data)
        recorded[_PREFIX + name] = sha256_file(folder / name)
    return {"architecture": {"family": family, "folder": FOLDER}}, recorded


def plain_files(recorded: Any) -> Any:
    """A manifest's ``files`` without the ``backbone/`` entries (checked by
    :func:`check_architecture`); anything but an object passes through to ``checked_files``,
    which says what is wrong with it."""
    if not isinstance(recorded, Mapping):
        return recorded
    return {k: v for k, v in recorded.items() if not (isinstance(k, str) and k.startswith(_PREFIX))}


def _inner(recorded: Any) -> dict[Any, Any]:
    """The ``backbone/`` entries of ``files``, named inside the folder (``config.json``). A
    name with more after the folder (``backbone/../x``, ``backbone/a/b``) keeps its slash,
    which ``checked_files`` refuses: one level, plain names only."""
    if not isinstance(recorded, Mapping):
        return {}
    return {k[len(_PREFIX) :]: v for k, v in recorded.items() if isinstance(k, str) and k.startswith(_PREFIX)}


def check_architecture(root: Path, manifest: dict[str, Any], *, what: str, fix: str) -> None:
    """The ``architecture`` entry and the ``backbone/`` names of ``files``, before anything is
    read: a known family, the folder ``backbone``, plain names with hex digests, the family's
    files all listed."""
    arch = manifest.get("architecture")
    inner = _inner(manifest["files"])
    if arch is None:
        if inner:
            raise ArtifactError(f"{what} lists files in {FOLDER}/ but has no 'architecture' entry; {fix}")
        return
    if not isinstance(arch, Mapping) or arch.get("family") not in hub.FAMILIES or arch.get("folder") != FOLDER:
        raise ArtifactError(
            f"{what} 'architecture' is {str(arch)[:120]!r}, not {{'family': one of {', '.join(hub.FAMILIES)}, "
            f"'folder': '{FOLDER}'}}; {fix}"
        )
    checked_files(root / FOLDER, inner, what=f"{what} ({FOLDER}/)", fix=fix)
    missing = [n for n in hub.CONFIG_FILES[arch["family"]] if n not in inner]
    if missing:
        raise ArtifactError(f"{what} 'files' lacks {', '.join(_PREFIX + n for n in missing)}; {fix}")


def verify_architecture(root: Path, manifest: dict[str, Any], *, what: str, fix: str) -> None:
    """Every file of ``backbone/`` present, a plain file (no symlink out of the model), listed
    in the manifest and matching its sha256; nothing else in the folder, so the library that
    reads it sees only what the manifest vouches for."""
    if manifest.get("architecture") is None:
        return
    folder = root / FOLDER
    inner = _inner(manifest["files"])
    if folder.is_symlink() or not folder.is_dir():
        raise ArtifactError(f"{folder} is missing or not a folder of the model's own; {fix}")
    for entry in sorted(folder.iterdir()):
        if entry.name not in inner:
            raise ArtifactError(f"{entry} is not listed in {what}; remove it or {fix}")
        if entry.is_symlink() or not entry.is_file():
            raise ArtifactError(f"{entry} is a link or not a plain file; the model's files must be its own; {fix}")
    verify_files(folder, inner, tuple(inner), what=what, fix=fix)


def architecture_spec(root: Path, manifest: dict[str, Any]) -> Any:
    """The backbone spec built from ``root/backbone/`` (checked by :func:`verify_architecture`),
    or None for a model without one: the registry then builds it, as for every model exported
    before this folder existed."""
    arch = manifest.get("architecture")
    if arch is None:
        return None
    return hub.build_from_folder(str(arch["family"]), root / FOLDER, str(manifest["backbone"]["name"]))
