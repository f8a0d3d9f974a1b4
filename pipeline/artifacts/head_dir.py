"""The head directory (``headstart fit-head``): written by :func:`write_head`, read back checked.

``HEAD_DIR/`` holds:

* ``head.joblib`` - the fitted scikit-learn estimator (pickle: trust only your own);
* ``head.npz`` - the same head as plain tensors (its ``torch_state()``, plus its torch kind as
  the string entry ``kind``), which export and evaluate use (no unpickling);
* ``head.json`` - schema version, kind and torch kind, fingerprint, class names and ids, the
  label map and category tree (``tree``), chosen C and the validation curve, temperature, metrics, split facts, and the
  sha256 of the two files above;
* ``split.json`` - which rows (by content hash) were validation, and the near-duplicate groups,
  so fine-tuning can be compared with the linear probe on identical photos; and every photo the
  final head was fitted on (``fit_content_hash``), so evaluate can say when it is shown them;
* ``config.json`` - the configuration used.

:func:`write_head` writes all of it into a staging directory beside the target and renames it
into place, so a crash or a kill during a refit leaves the previous head whole; the staging
folders a ``kill -9`` leaves behind are removed by the next write of the same head.

Everything that reads a head goes through :func:`read_head` (plain tensors, ``allow_pickle=False``)
or :func:`load_head_estimator` (the joblib pickle). Both verify the sha256 recorded in
``head.json`` first, so a swapped or truncated file is refused before a byte of it is parsed.
That protects against accidents, not attackers: whoever can rewrite ``head.joblib`` can rewrite
``head.json`` too, and joblib is pickle - loading it runs code. Never load a head or a cache
from a source you do not trust (README, "Security").

The tensors become a torch module through :func:`pipeline.models.heads.build_head`; which
fit-head kind exports as which torch kind is :mod:`pipeline.probe.kinds`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import re
import shutil
import sys
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.atomic import replace_dir, stage_dir
from ..core.hashing import sha256_file
from ..data.tree import Tree
from ..errors import ArtifactError, BackboneError, InputError
from ..models.fingerprint import Fingerprint
from ..models.heads import build_head
from ..probe.kinds import KINDS

HEAD_SCHEMA_VERSION = 1  # what this headstart writes and the newest it reads
HEAD_FILES = ("head.joblib", "head.npz", "head.json", "split.json", "config.json", "attributes")
ATTRIBUTES_DIR = "attributes"  # one head directory (without config.json) per further attribute


# --------------------------------------------------------------------------- checksums


def checked_files(root: Path, recorded: Any, *, what: str, fix: str) -> dict[str, str]:
    """A ``files`` entry (name -> sha256) that is an object of plain file names inside ``root``
    and hex digests. A name such as ``/etc/passwd`` or ``../x`` would have headstart hash (and
    vouch for) a file outside the artifact's folder, so it is refused, not followed."""
    if not isinstance(recorded, Mapping):
        raise ArtifactError(f"{what} 'files' is {type(recorded).__name__}, not an object of file -> sha256; {fix}")
    for name, digest in recorded.items():
        plain = isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
        if not plain:
            raise ArtifactError(
                f"{what} 'files' names {name!r}, which is not a file in {root}: only plain file names in the "
                f"artifact's own folder are checked and loaded; {fix}"
            )
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ArtifactError(
                f"{what} 'files' gives {name} the sha256 {str(digest)[:80]!r}, not 64 hex digits; {fix}"
            )
    return dict(recorded)


def verify_files(root: Path, recorded: Any, needed: tuple[str, ...], *, what: str, fix: str) -> None:
    """Refuse ``needed`` files that are missing or whose sha256 differs from ``recorded``; also
    check every other recorded file that is present (a partly swapped directory is suspect).
    ``recorded`` is checked first (:func:`checked_files`)."""
    recorded = checked_files(root, recorded, what=what, fix=fix)
    for name in needed:
        if name not in recorded:
            raise ArtifactError(f"{root / name} has no sha256 in {what}; {fix}")
        if not (root / name).is_file():
            raise ArtifactError(f"{root / name} is missing; {fix}")
    for name, want in recorded.items():
        path = root / name
        if (name in needed or path.is_file()) and sha256_file(path) != want:
            raise ArtifactError(
                f"{path} does not match the sha256 recorded in {what} (tampered with or truncated); {fix}"
            )


def read_json(path: Path, *, what: str, fix: str) -> dict[str, Any]:
    """A JSON object, or an ``ArtifactError`` that says which file is wrong (never a traceback)."""
    if not path.is_file():
        raise ArtifactError(f"{path.parent} is not {what} (no {path.name}); {fix}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); {fix}") from None
    except RecursionError:  # json nests by recursion: 100,000 "[" exhaust the stack, not memory
        raise ArtifactError(f"{path} is nested too deeply to be {what} manifest; {fix}") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{path} is not {what} manifest (not a JSON object); {fix}")
    return data


# --------------------------------------------------------------------------- writing


@dataclass
class AttributeHead:
    """A further attribute's fitted head, written under ``attributes/`` of the main head."""

    name: str
    estimator: Any
    kind: str
    meta: Mapping[str, Any]
    split: Mapping[str, Any]


def attribute_dir_names(names: list[str]) -> list[str]:
    """The folder of each attribute head under ``attributes/``: its name when that is a plain
    file name, else ``attribute-<i>`` (a column may be called anything, e.g. "size (ml)")."""
    plain = [n if re.fullmatch(r"[\w][\w.-]*", n) and n.lower() not in {"con", "nul"} else "" for n in names]
    return [p or f"attribute-{i}" for i, p in enumerate(plain)]


def write_head(
    out: str | Path,
    estimator: Any,
    *,
    kind: str,
    meta: Mapping[str, Any],
    split: Mapping[str, Any],
    write_config: Callable[[Path], object] | None = None,
    attributes: list[AttributeHead] | None = None,
) -> Path:
    """Write a fitted head of fit-head kind ``kind`` (a :data:`~pipeline.probe.kinds.KINDS` key)
    as ``out/``: ``meta`` becomes head.json (after ``schema_version``, ``kind`` and
    ``torch_kind``; ``files`` is added), ``split`` becomes split.json, and ``write_config(path)``
    writes config.json; each of ``attributes`` becomes ``out/attributes/<name>/`` with the same
    files but config.json (listed, with its folder, in head.json's ``attributes``). Staged beside
    ``out`` and renamed into place: ``out`` is the old head or the new one, never a mixture.
    Entries of an existing head directory that a head does not consist of (notes, a report)
    are carried over."""
    given = Path(out)
    out = given.absolute()  # "--out ." has no name to stage beside
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "head.json").is_file())):
        raise InputError(f"{given} exists and is not a headstart head directory; choose another --out")
    attributes = attributes or []
    folders = [f"{ATTRIBUTES_DIR}/{d}" for d in attribute_dir_names([a.name for a in attributes])]
    meta = dict(meta)
    if attributes:
        meta["attributes"] = [
            {"name": a.name, "dir": folder, "multi_label": bool(a.meta.get("multi_label"))}
            for a, folder in zip(attributes, folders, strict=True)
        ]
    stage = stage_dir(out)
    try:
        _write_head_files(stage, estimator, kind, meta, split)
        for a, folder in zip(attributes, folders, strict=True):
            sub = stage / folder
            sub.mkdir(parents=True)
            _write_head_files(sub, a.estimator, a.kind, {**a.meta, "attribute": a.name}, a.split)
        if write_config is not None:
            write_config(stage / "config.json")
        replace_dir(stage, out, owned=HEAD_FILES)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return given


def _write_head_files(
    folder: Path, estimator: Any, kind: str, meta: Mapping[str, Any], split: Mapping[str, Any]
) -> None:
    import joblib

    # an estimator may say which module it exports as (a logistic head with a text prior acts on
    # unit features: "cosine"); otherwise its kind's
    torch_kind = str(getattr(estimator, "torch_kind", None) or KINDS[kind].torch_kind)
    joblib.dump(estimator, folder / "head.joblib")
    np.savez(folder / "head.npz", kind=torch_kind, **estimator.torch_state())
    (folder / "split.json").write_text(json.dumps(dict(split)) + "\n")
    head_json = {
        "schema_version": HEAD_SCHEMA_VERSION,
        "kind": kind,
        "torch_kind": torch_kind,
        **meta,
        "files": {name: sha256_file(folder / name) for name in ("head.joblib", "head.npz")},
    }
    (folder / "head.json").write_text(json.dumps(head_json, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- reading


@dataclass
class HeadSpec:
    """A head as plain tensors: enough to build its torch module (see the module docstring)."""

    kind: str
    tensors: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_classes(self) -> int:
        return int(build_head(self.kind, self.torch_tensors()).n_classes)  # type: ignore[arg-type]

    def torch_tensors(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in self.tensors.items()}


_HEAD_FIX = "re-run `headstart fit-head` to write a fresh head directory"


def read_head_meta(head_dir: Path) -> dict[str, Any]:
    meta = read_json(head_dir / "head.json", what="a head directory", fix="create one with `headstart fit-head`")
    version = meta.get("schema_version", 0)
    if not isinstance(version, int) or version > HEAD_SCHEMA_VERSION:
        raise ArtifactError(
            f"{head_dir} was written by a newer headstart (head schema v{version}, this one reads "
            f"v{HEAD_SCHEMA_VERSION}); upgrade headstart"
        )
    for key in ("class_names", "fingerprint", "files"):
        if key not in meta:
            raise ArtifactError(f"{head_dir / 'head.json'} lacks '{key}'; {_HEAD_FIX}")
    _check_head_meta(head_dir, meta)
    return meta


def checked_class_names(value: Any, *, what: str, fix: str) -> list[str]:
    """``class_names`` as written by fit-head: a list of distinct non-empty strings. A string
    would otherwise be iterated into classes ``a``, ``b``, ``c`` without a word."""
    if not isinstance(value, list):
        raise ArtifactError(f"{what} 'class_names' is {type(value).__name__}, not a list of names; {fix}")
    bad = [c for c in value if not isinstance(c, str) or not c]
    if bad or not value:
        raise ArtifactError(
            f"{what} 'class_names' must be non-empty strings"
            + (f", not {bad[0]!r}" if bad else ", and there must be at least one")
            + f"; {fix}"
        )
    if len(set(value)) != len(value):
        twice = sorted({c for c in value if value.count(c) > 1})
        raise ArtifactError(f"{what} 'class_names' lists {twice[0]!r} more than once; {fix}")
    return value


def _check_head_meta(head_dir: Path, meta: dict[str, Any]) -> None:
    """The one check of a ``head.json``'s fields, before anything is loaded: every reader
    (export, evaluate, finetune) then gets a sound record or one ``Error:`` naming the field."""
    what = str(head_dir / "head.json")
    names = checked_class_names(meta["class_names"], what=what, fix=_HEAD_FIX)
    try:
        Fingerprint.from_record(meta["fingerprint"], source=f"{what} 'fingerprint'")
    except BackboneError as e:
        raise ArtifactError(f"{str(e).rsplit('; ', 1)[0]}; {_HEAD_FIX}") from None
    checked_files(head_dir, meta["files"], what=what, fix=_HEAD_FIX)
    for key in ("kind", "torch_kind"):
        if key in meta and not isinstance(meta[key], str):
            raise ArtifactError(f"{what} '{key}' is {meta[key]!r}, not a name; {_HEAD_FIX}")
    ids = meta.get("class_ids")
    if ids is not None and not (isinstance(ids, list) and len(ids) == len(names) and all(type(i) is int for i in ids)):
        raise ArtifactError(f"{what} 'class_ids' is not one whole number per class name; {_HEAD_FIX}")
    Tree.from_record(meta.get("tree"), names, what=what, fix=_HEAD_FIX)  # absent in heads before the tree


def read_head(head_dir: str | Path) -> tuple[dict[str, Any], HeadSpec]:
    """``head.json`` and the head's tensors from ``head.npz``, both checked; nothing unpickled."""
    head_dir = Path(head_dir)
    meta = read_head_meta(head_dir)
    verify_files(head_dir, meta["files"], ("head.npz",), what="head.json", fix=_HEAD_FIX)
    try:
        with np.load(head_dir / "head.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{head_dir / 'head.npz'} cannot be read ({e}); {_HEAD_FIX}") from None
    kind_arr = arrays.pop("kind", None)
    kind = str(kind_arr) if kind_arr is not None else str(meta.get("torch_kind", "linear"))
    spec = HeadSpec(kind, arrays)
    n = spec.n_classes
    if n != len(meta["class_names"]):
        raise ArtifactError(
            f"{head_dir}: head.npz has {n} outputs but head.json lists {len(meta['class_names'])} classes; {_HEAD_FIX}"
        )
    return meta, spec


@dataclass
class AttributeSpec:
    """A further attribute's head as read back: its head.json and tensors."""

    name: str
    meta: dict[str, Any]
    spec: HeadSpec

    @property
    def multi_label(self) -> bool:
        return bool(self.meta.get("multi_label"))


def read_attribute_heads(head_dir: str | Path, meta: Mapping[str, Any]) -> list[AttributeSpec]:
    """The heads under ``attributes/`` that the main head.json ``meta`` lists (none for heads
    from before attributes), each checked as :func:`read_head` checks the main one."""
    head_dir = Path(head_dir)
    listed = meta.get("attributes") or []
    what = str(head_dir / "head.json")
    if not isinstance(listed, list):
        raise ArtifactError(f"{what} 'attributes' is not a list; {_HEAD_FIX}")
    out = []
    for entry in listed:
        named = isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
        if not (named and isinstance(entry.get("dir"), str)):
            raise ArtifactError(f"{what} 'attributes' holds {str(entry)[:80]!r}, not a name and a folder; {_HEAD_FIX}")
        folder = entry["dir"]
        parts = folder.split("/")
        if len(parts) != 2 or parts[0] != ATTRIBUTES_DIR or parts[1] in ("", ".", "..") or "\\" in folder:
            raise ArtifactError(
                f"{what} names attribute folder {folder!r}, not one under {ATTRIBUTES_DIR}/; {_HEAD_FIX}"
            )
        sub_meta, spec = read_head(head_dir / folder)
        if bool(sub_meta.get("multi_label")) and len(sub_meta.get("thresholds") or []) != len(sub_meta["class_names"]):
            raise ArtifactError(f"{head_dir / folder / 'head.json'} lacks one threshold per label; {_HEAD_FIX}")
        out.append(AttributeSpec(str(entry["name"]), sub_meta, spec))
    return out


def fitted_content_hashes(head_dir: str | Path) -> frozenset[str] | None:
    """Content hashes of every photo the head was fitted on (``split.json``: ``fit_content_hash``,
    the final head's train + validation rows); None for a head written before it was recorded
    or without a readable split.json."""
    path = Path(head_dir) / "split.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    hashes = data.get("fit_content_hash") if isinstance(data, dict) else None
    return frozenset(str(h) for h in hashes) if isinstance(hashes, list) else None


def load_head_estimator(head_dir: str | Path) -> Any:
    """The scikit-learn head from ``head.joblib``, after its sha256 matched ``head.json``.

    joblib is pickle: this runs code from the file. The checksum catches accidents (a truncated
    copy, a head from another run), not an attacker who rewrites both files. Trusted heads only.
    """
    import joblib

    head_dir = Path(head_dir)
    meta = read_head_meta(head_dir)
    verify_files(head_dir, meta["files"], ("head.joblib",), what="head.json", fix=_HEAD_FIX)
    with _modules_under_their_old_names():
        return joblib.load(head_dir / "head.joblib")


# A pickle names the module and class of each object it holds. Release 0.1.0 kept the
# estimators in ``pipeline.heads`` and called the MLP estimator ``MLPHead`` (now the torch
# module's name); its head.joblib files must keep loading. Old module -> (the module its classes
# live in now, {old class name: new name} for the renamed ones).
RENAMED_MODULES: dict[str, tuple[str, dict[str, str]]] = {
    "pipeline.heads": ("pipeline.probe.estimators", {"MLPHead": "MLPProbe"}),
}


def _old_module(old: str) -> types.ModuleType:
    """A stand-in for module ``old``: the new module's names, plus the renamed classes under
    their old names."""
    new_name, renamed = RENAMED_MODULES[old]
    new = importlib.import_module(new_name)
    mod = types.ModuleType(old, new.__doc__)
    mod.__dict__.update({k: v for k, v in vars(new).items() if not k.startswith("__")})
    mod.__dict__.update({o: getattr(new, n) for o, n in renamed.items()})
    return mod


@contextlib.contextmanager
def _modules_under_their_old_names() -> Iterator[None]:
    added = [old for old in RENAMED_MODULES if old not in sys.modules]
    for old in added:
        sys.modules[old] = _old_module(old)
    try:
        yield
    finally:
        for old in added:
            sys.modules.pop(old, None)
