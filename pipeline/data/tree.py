"""A category tree over a head's classes: ``[parents]`` in ``classes.toml`` (leaf -> parent, any
depth), checked once and recorded as ``tree`` in ``head.json`` and ``manifest.json``::

    [parents]
    lipstick = "lips"
    lip_gloss = "lips"
    lips = "makeup"
    "粉底" = "face"

The head's classes are the leaves: the head is trained on them as without a tree, and a parent's
probability is the sum of its leaves' (:mod:`pipeline.probe.hierarchy`). So a parent can never
be a class itself (it would be counted twice), a name that is neither a class nor the parent of
one is a typo, and a chain that comes back on itself has no top. A class the table does not
mention is a top-level node of its own.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..errors import ArtifactError, InputError

PATH_SEPARATOR = " > "  # how a path reads in CSV and in the report: "makeup > lips > lipstick"


@dataclass(frozen=True)
class Tree:
    parents: dict[str, str]  # node -> its parent (a node without an entry is top-level)

    @classmethod
    def parse(cls, table: Any, where: str) -> Tree:
        """``[parents]`` as TOML gives it: names -> names, no cycle. Raises ``InputError``."""
        example = 'lipstick = "lips"'
        if not isinstance(table, dict) or not table:
            raise InputError(f"{where}: [parents] must be a table of class = parent, e.g. {example}")
        for node, parent in table.items():
            if not isinstance(parent, str) or not parent.strip():
                raise InputError(f"{where}: [parents] {node} = {parent!r}; a parent is a name, e.g. {example}")
            if PATH_SEPARATOR.strip() in node or PATH_SEPARATOR.strip() in parent:
                raise InputError(f"{where}: [parents] names may not contain '>' (it separates a path's levels)")
        tree = cls(dict(table))
        for node in table:
            tree._path_or_cycle(node, where)
        return tree

    def _path_or_cycle(self, node: str, where: str) -> list[str]:
        path = [node]
        while path[-1] in self.parents:
            up = self.parents[path[-1]]
            if up in path:
                loop = [*path[path.index(up) :], up]
                raise InputError(
                    f"{where}: [parents] has a cycle: {' -> '.join(loop)}; a category cannot be its own ancestor"
                )
            path.append(up)
        return path

    def check_classes(self, classes: Iterable[str], where: str) -> None:
        """Every name is a class (a leaf) or the parent of one, and no class is a parent."""
        known = list(classes)
        inner = set(self.parents.values())
        as_parent = sorted(inner & set(known))
        if as_parent:
            raise InputError(
                f"{where}: [parents] makes {', '.join(map(repr, as_parent))} a parent, but "
                f"{'it is a class' if len(as_parent) == 1 else 'they are classes'} the head predicts; a parent's "
                "probability is the sum of its leaves', so give the parent its own name (e.g. lips_all)"
            )
        unknown = sorted(n for n in self.parents if n not in inner and n not in set(known))
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            raise InputError(
                f"{where}: [parents] names {', '.join(map(repr, unknown))}, which "
                f"{'is not a class' if len(unknown) == 1 else 'are not classes'} nor the parent of one"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; the classes are: {', '.join(known[:30])}{', ...' if len(known) > 30 else ''}"
            )

    def restrict(self, classes: Iterable[str]) -> Tree:
        """The part of the tree above ``classes`` (a head's classes: the ones with photos)."""
        keep: dict[str, str] = {}
        for c in classes:
            path = self._path_or_cycle(c, "tree")
            keep.update(itertools.pairwise(path))
        return Tree(keep)

    def path(self, node: str) -> list[str]:
        """Top-level node first, ``node`` last."""
        return self._path_or_cycle(node, "tree")[::-1]

    def record(self) -> dict[str, Any]:
        return {"parents": dict(self.parents)}

    @classmethod
    def from_record(cls, record: Any, class_names: list[str], *, what: str, fix: str) -> Tree | None:
        """The ``tree`` of a head.json or manifest.json (None: written without one), checked
        against the artifact's classes; every problem is an ``ArtifactError`` naming the field."""
        if record is None:
            return None
        parents = record.get("parents") if isinstance(record, dict) else None
        plain = isinstance(parents, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in parents.items())
        if not plain:
            raise ArtifactError(f"{what} 'tree' is not an object with 'parents' (name -> parent name); {fix}")
        assert isinstance(parents, dict)
        try:
            tree = cls.parse(parents, what) if parents else cls({})
            tree.check_classes(class_names, what)
        except InputError as e:
            raise ArtifactError(f"{e}; {fix}") from None
        return tree
