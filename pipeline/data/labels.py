"""Label maps: how the categories in a cache (folder names) become a head's classes, so that
categories can be merged, renamed, dropped and added without re-extracting a single photo.

A label map is a small TOML file (``fit-head --classes classes.toml``)::

    # Categories in the cache that no head should learn.
    drop = ["misc", "samples"]

    # The manifest column this map is for (default: the label column, e.g. ``category``), and
    # whether its cells are ;-separated label sets (also so when any cell holds a ';'). Top-level
    # keys, before the tables. One file per attribute: ``fit-head --classes a.toml --classes b.toml``.
    # attribute = "finish"
    # multi_label = true

    # Output classes and their ids. An id belongs to one class for ever: a new class gets a new
    # id, a retired class's id is never reused - so "class 3" means the same in every version.
    [classes]
    lipstick = 0
    foundation = 1
    perfume = 3        # 2 was "palette", retired

    # Cache category -> output class. Several categories onto one class = a merge.
    [rename]
    lip_liner = "lipstick"
    "粉底" = "foundation"

    # Zero-shot prompts per output class (``fit-head --head zeroshot``, ``--text-prior``): a
    # class without an entry gets DEFAULT_TEMPLATE with its name ("lip_liner" -> "lip liner").
    [prompts]
    lipstick = ["a product photo of a lipstick", "a close-up photo of a lipstick"]

    # A category tree over the output classes (class -> parent, any depth): predict also answers
    # with the deepest node it is sure of ("lips" when it cannot tell lipstick from lip gloss).
    # A file with only [parents] keeps the cache's categories as the classes. See data/tree.py.
    [parents]
    lipstick = "lips"
    lips = "makeup"

Every labelled category in the cache must be accounted for (a class, a rename source or
dropped): a new folder that nobody mentioned is an error, not a silent new class id; so is a
``drop`` entry that names no category of the photos (a typo would drop nothing). The head's
outputs are the classes that have photos, in id order; ``head.json`` records the class ids and
the whole map (text and sha256), and ``evaluate`` reads it from there.

Without a label map, the classes are the cache's categories that have photos, sorted, and the
ids are their positions - the behaviour before label maps existed.
"""

from __future__ import annotations

import difflib
import hashlib
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .tree import Tree

IDENTITY = "(none: cache categories as they are)"
DEFAULT_TEMPLATE = "a product photo of a {name}"  # the zero-shot prompt of a class with no [prompts] entry


def default_prompts(name: str) -> list[str]:
    return [DEFAULT_TEMPLATE.format(name=name.replace("_", " "))]


@dataclass(frozen=True)
class LabelMap:
    classes: dict[str, int]  # output class -> stable id
    rename: dict[str, str] = field(default_factory=dict)  # cache category -> output class
    drop: frozenset[str] = frozenset()
    source: str = IDENTITY  # path of the file
    text: str = ""  # the file's text, recorded in head.json
    prompts: dict[str, tuple[str, ...]] = field(default_factory=dict)  # output class -> zero-shot prompts
    tree: Tree | None = None  # [parents]; with no [classes] (classes == {}) the categories stay as they are
    attribute: str | None = None  # the column it applies to (None: the label column; data/attributes.py)
    multi_label: bool = False  # the column holds ;-separated labels even where no cell shows a ';'

    # ------------------------------------------------------------------ reading

    @classmethod
    def load(cls, path: str | Path) -> LabelMap:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"label map {path} does not exist; see README 'Categories that change'") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise InputError(f"label map {path} is not valid TOML: {e}") from None
        return cls.from_dict(data, source=str(path), text=text)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "", text: str = "") -> LabelMap:
        where = f"label map {source}" if source else "label map"
        unknown = set(data) - {"classes", "rename", "drop", "prompts", "parents", "attribute", "multi_label"}
        if unknown:
            raise InputError(
                f"{where}: unknown key(s) {sorted(unknown)}; "
                'use [classes], [rename], [prompts], [parents], drop = [...], attribute = "..." and multi_label = true'
            )
        attribute = data.get("attribute")
        if attribute is not None and (not isinstance(attribute, str) or not attribute.strip()):
            raise InputError(
                f'{where}: attribute = {attribute!r}; it names a manifest column, e.g. attribute = "finish"'
            )
        multi = data.get("multi_label", False)
        if not isinstance(multi, bool):
            raise InputError(f"{where}: multi_label = {multi!r}; write multi_label = true or false")
        if multi and "parents" in data:
            raise InputError(f"{where}: [parents] is for single-label attributes; a multi-label one has no tree")
        tree = Tree.parse(data["parents"], where) if "parents" in data else None
        if set(data) <= {"parents", "attribute", "multi_label"}:  # the column's categories as they are
            return cls({}, source=source, text=text, tree=tree, attribute=attribute, multi_label=multi)
        classes = data.get("classes")
        if not isinstance(classes, dict) or not classes:
            raise InputError(
                f'{where} needs a [classes] table of output classes and ids, e.g. lipstick = 0, "口红" = 1'
            )
        for name, cid in classes.items():
            if not isinstance(cid, int) or isinstance(cid, bool) or cid < 0:
                raise InputError(f"{where}: class {name!r} has id {cid!r}; ids are whole numbers >= 0")
        seen: dict[int, str] = {}
        for name, cid in classes.items():
            if cid in seen:
                raise InputError(f"{where}: classes {seen[cid]!r} and {name!r} both have id {cid}; give each its own")
            seen[cid] = name
        rename = data.get("rename", {})
        if not isinstance(rename, dict):
            raise InputError(f"{where}: [rename] must be a table of category = class")
        for src, dst in rename.items():
            if dst not in classes:
                raise InputError(
                    f"{where}: [rename] maps {src!r} to {dst!r}, which is not under [classes]; "
                    f"add {dst!r} = <new id> to [classes] or fix the name"
                )
        drop = data.get("drop", [])
        if not isinstance(drop, list) or not all(isinstance(d, str) for d in drop):
            raise InputError(f'{where}: drop must be a list of category names, e.g. drop = ["misc"]')
        both = set(drop) & (set(rename) | set(classes))
        if both:
            raise InputError(f"{where}: {sorted(both)} are both dropped and used; remove them from one place")
        prompts = _prompts(data.get("prompts", {}), classes, where)
        if tree is not None:
            tree.check_classes(classes, where)
        return cls(dict(classes), dict(rename), frozenset(drop), source, text, prompts, tree, attribute, multi)

    def head_tree(self, class_names: list[str], categories: list[str]) -> Tree | None:
        """The tree over a head's ``class_names`` (None: no [parents]); names are checked against
        the map's classes, or the cache's ``categories`` for a map with only [parents]."""
        if self.tree is None:
            return None
        self.tree.check_classes(self.classes or categories, f"label map {self.source}")
        return self.tree.restrict(class_names)

    def prompts_for(self, name: str) -> list[str]:
        """The zero-shot prompts of output class ``name``: its [prompts] entry or the default."""
        return list(self.prompts.get(name, ())) or default_prompts(name)

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> LabelMap | None:
        """The label map a head was trained with, from its ``head.json`` (None: no map)."""
        if not record or not record.get("text"):
            return None
        return cls.from_dict(tomllib.loads(record["text"]), source=record.get("path", ""), text=record["text"])

    # ------------------------------------------------------------------ applying

    def target(self, category: str) -> str | None:
        """The output class of a cache category (None = dropped); raises for an unmapped one."""
        if not self.classes:  # only [parents]: categories are the classes
            return category
        if category in self.drop:
            return None
        if category in self.rename:
            return self.rename[category]
        if category in self.classes:
            return category
        raise InputError(
            f"category {category!r} is in the photos but not in label map {self.source}; "
            f"add it under [classes] with a new id (next free: {max(self.classes.values()) + 1}), "
            "map it to a class under [rename], or list it in drop"
        )

    def record(self) -> dict[str, Any]:
        return {
            "path": self.source,
            "sha256": hashlib.sha256(self.text.encode()).hexdigest() if self.text else None,
            "text": self.text,
        }


def _prompts(table: Any, classes: dict[str, int], where: str) -> dict[str, tuple[str, ...]]:
    """``[prompts]``: output class -> a non-empty list of non-empty strings. A class that is not
    under [classes] is refused (a typo would silently fall back to the default prompt)."""
    example = 'lipstick = ["a product photo of a lipstick"]'
    if not isinstance(table, dict):
        raise InputError(f"{where}: [prompts] must be a table of class = [prompts], e.g. {example}")
    out = {}
    for name, value in table.items():
        if name not in classes:
            close = difflib.get_close_matches(name, list(classes), n=1)
            raise InputError(
                f"{where}: [prompts] names {name!r}, which is not under [classes]"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + "; prompts are per output class"
            )
        if isinstance(value, str):
            raise InputError(f"{where}: [prompts] {name} is one string; write a list: {name} = [{value!r}]")
        if not isinstance(value, list) or not value or not all(isinstance(p, str) and p.strip() for p in value):
            raise InputError(f"{where}: [prompts] {name} must be a non-empty list of non-empty strings, e.g. {example}")
        out[name] = tuple(value)
    return out


@dataclass(frozen=True)
class Mapped:
    """Labels after the label map: ``y`` indexes ``class_names`` (-1 = unlabelled or dropped)."""

    y: np.ndarray
    class_names: list[str]
    class_ids: list[int]
    absent: list[str]  # classes of the map without photos (left out of this head)


def apply_label_map(label_map: LabelMap | None, category_names: list[str], labels: np.ndarray) -> Mapped:
    """Map a cache's labels (indices into ``category_names``, -1 unlabelled; an attribute's -2,
    identical files that disagree, is unlabelled too) to output classes."""
    labels = np.asarray(labels, dtype=np.int64)
    labels = np.where(labels < -1, -1, labels)
    present = sorted({int(v) for v in np.unique(labels) if v >= 0})
    if label_map is None or not label_map.classes:
        names = [category_names[i] for i in present]
        lut = np.full(len(category_names) + 1, -1, np.int64)
        for new, old in enumerate(present):
            lut[old] = new
        return Mapped(lut[labels], names, list(range(len(names))), [])
    _check_drop(label_map, category_names)
    targets = {i: label_map.target(category_names[i]) for i in present}
    names, ids, absent = _output_classes(label_map, targets.values())
    index = {n: j for j, n in enumerate(names)}
    lut = np.full(len(category_names) + 1, -1, np.int64)  # lut[-1] = -1 keeps unlabelled rows
    for i, t in targets.items():
        if t is not None:
            lut[i] = index[t]
    return Mapped(lut[labels], names, ids, absent)


def _check_drop(label_map: LabelMap, category_names: list[str]) -> None:
    """Every ``drop`` entry names one of ``category_names``: a typo would drop nothing."""
    unknown = sorted(label_map.drop - set(category_names))
    if unknown:
        close = difflib.get_close_matches(unknown[0], category_names, n=1)
        raise InputError(
            f"label map {label_map.source}: drop lists {', '.join(map(repr, unknown))}, which "
            f"{'is not a category' if len(unknown) == 1 else 'are not categories'} of these photos"
            + (f" (did you mean {close[0]!r}?)" if close else "")
            + f"; the categories are: {', '.join(category_names[:20])}{', ...' if len(category_names) > 20 else ''}"
        )


def _output_classes(label_map: LabelMap, targets: Iterable[str | None]) -> tuple[list[str], list[int], list[str]]:
    """(the output classes the targets use, in id order; their ids; the map's classes unused)."""
    used = {t for t in targets if t is not None}
    names = sorted(used, key=lambda n: label_map.classes[n])
    absent = sorted(set(label_map.classes) - used, key=lambda n: label_map.classes[n])
    return names, [label_map.classes[n] for n in names], absent


@dataclass(frozen=True)
class MappedMulti:
    """A multi-label column after the label map: ``Y[row, j]`` is 1 when the row carries
    ``class_names[j]`` (an empty cell: a row of zeros, a photo with none of the labels)."""

    Y: np.ndarray  # uint8 [N, L]
    class_names: list[str]
    class_ids: list[int]
    absent: list[str]
    known: np.ndarray  # bool [N]: False where identical files disagreed (cache.h5io.CONFLICT)


def apply_multi_label(label_map: LabelMap | None, values: list[str], cells: np.ndarray) -> MappedMulti:
    """Map a multi-label column (``cells``: per row an index into ``values``, the distinct
    cells, -1 empty) to output labels: each ``;``-separated label goes through the map as a
    category does in :func:`apply_label_map` (renamed, merged, dropped, refused if unmapped)."""
    from .attributes import split_cell  # attributes.py builds on this module

    cells = np.asarray(cells, dtype=np.int64)
    known = cells >= -1
    cells = np.where(known, cells, -1)
    parts = [split_cell(v) for v in values]
    present = sorted({lab for i in np.unique(cells) if i >= 0 for lab in parts[int(i)]})
    if label_map is None or not label_map.classes:
        names, ids = present, list(range(len(present)))
        target: dict[str, str | None] = {n: n for n in present}
        absent: list[str] = []
    else:
        _check_drop(label_map, present)
        target = {n: label_map.target(n) for n in present}
        names, ids, absent = _output_classes(label_map, target.values())
    index = {n: j for j, n in enumerate(names)}
    per_value = np.zeros((len(values) + 1, len(names)), np.uint8)  # the last row: the empty cell
    for v, labs in enumerate(parts):
        for lab in labs:
            t = target.get(lab)
            if t is not None:
                per_value[v, index[t]] = 1
    return MappedMulti(per_value[cells], names, ids, absent, known)
