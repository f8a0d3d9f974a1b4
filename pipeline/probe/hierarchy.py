"""Roll-up over a category tree (:class:`pipeline.data.tree.Tree`): leaf probabilities -> every
node's probability (a parent's is the sum of its leaves'), the deepest node a photo clears
``min_confidence`` at, and accuracy at each level of the tree. Numpy only.

Levels: level 1 is the top-level nodes; at level d a leaf counts as its ancestor d steps from the
top, or as itself when it is shallower. Each level is therefore a partition of the classes, and
its prediction is the group with the most probability - the Bayes answer at that level, which can
be right where the leaf's argmax is not (two likely lipsticks outweigh one likely eyeliner).
The deepest level is the leaves: its accuracy is the head's plain accuracy.

The roll-up walks down from the most probable top-level node into its most probable child while
that child still clears ``min_confidence``. Above 0.5 at most one node per level can clear it,
so the walk finds the deepest node over the threshold; a photo whose top-level node is below it
gets no node (``None``), which counts against coverage, not accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..data.tree import PATH_SEPARATOR, Tree


@dataclass(frozen=True)
class TreeIndex:
    class_names: list[str]
    nodes: list[str]  # every node, leaves included
    member: np.ndarray  # (n_classes, n_nodes) 1 where the node is on the class's path
    children: dict[int, list[int]]  # node -> its children; -1 -> the top-level nodes
    paths: list[list[int]]  # per class: node indices, top-level first

    @classmethod
    def build(cls, tree: Tree, class_names: list[str]) -> TreeIndex:
        named = [tree.path(c) for c in class_names]
        nodes = sorted({n for p in named for n in p})
        pos = {n: i for i, n in enumerate(nodes)}
        member = np.zeros((len(class_names), len(nodes)), np.float64)
        children: dict[int, list[int]] = {}
        for c, path in enumerate(named):
            member[c, [pos[n] for n in path]] = 1
            for up, down in zip([None, *path[:-1]], path, strict=True):
                kids = children.setdefault(-1 if up is None else pos[up], [])
                if pos[down] not in kids:
                    kids.append(pos[down])
        return cls(list(class_names), nodes, member, children, [[pos[n] for n in p] for p in named])

    @property
    def depth(self) -> int:
        return max(len(p) for p in self.paths)

    def node_probabilities(self, proba: np.ndarray) -> np.ndarray:
        """(N, n_classes) leaf probabilities -> (N, n_nodes)."""
        return np.asarray(proba, np.float64) @ self.member

    def rollup(self, node_proba: np.ndarray, min_confidence: float) -> tuple[int, list[int]]:
        """One photo's deepest confident node (-1: none) and the path to it (node indices)."""
        path: list[int] = []
        here = -1
        while here in self.children:
            kids = self.children[here]
            best = kids[int(np.argmax(node_proba[kids]))]
            if node_proba[best] < min_confidence:
                break
            path.append(best)
            here = best
        return (path[-1] if path else -1), path

    def describe(self, proba: np.ndarray, min_confidence: float) -> dict[str, Any]:
        """What predict writes for one photo: ``node``, ``node_probability``, ``node_path``
        [(node, probability), ...] top-level first (empty when no node clears the threshold)."""
        q = self.node_probabilities(proba[None])[0]
        node, path = self.rollup(q, min_confidence)
        return {
            "node": self.nodes[node] if node >= 0 else None,
            "node_probability": float(q[node]) if node >= 0 else None,
            "node_path": [(self.nodes[i], float(q[i])) for i in path],
        }

    def level_groups(self, level: int) -> np.ndarray:
        """Per class: the node it counts as at ``level`` (0 = top-level)."""
        return np.array([p[min(level, len(p) - 1)] for p in self.paths], np.int64)


def path_text(path: list[tuple[str, float]]) -> str:
    return PATH_SEPARATOR.join(n for n, _ in path)


def tree_metrics(index: TreeIndex, proba: np.ndarray, y: np.ndarray, min_confidence: float) -> dict[str, Any]:
    """Accuracy per level and the roll-up's accuracy and coverage at ``min_confidence``; and the
    same on the photos whose leaf is unsure (top leaf probability below the threshold), where
    the roll-up earns its keep."""
    proba, y = np.asarray(proba, np.float64), np.asarray(y, np.int64)
    q = index.node_probabilities(proba)
    levels = []
    for d in range(index.depth):
        g = index.level_groups(d)
        groups = np.unique(g)
        pred = groups[np.argmax(q[:, groups], axis=1)]
        levels.append({"level": d + 1, "n_nodes": len(groups), "accuracy": float((pred == g[y]).mean())})
    walks = [index.rollup(q[i], min_confidence) for i in range(len(y))]
    nodes = np.array([n for n, _ in walks], np.int64)
    covered = nodes >= 0
    on_path = np.array([n >= 0 and n in index.paths[t] for n, t in zip(nodes, y, strict=True)], bool)
    unsure = proba.max(1) < min_confidence
    at_leaf = np.array([n >= 0 and n == index.paths[t][-1] for n, t in zip(nodes, y, strict=True)], bool)
    return {
        "min_confidence": min_confidence,
        "depth": index.depth,
        "levels": levels,
        "leaf_accuracy": float((proba.argmax(1) == y).mean()),
        "rollup": {
            "coverage": float(covered.mean()),
            "accuracy": float(on_path[covered].mean()) if covered.any() else None,
            "at_leaf": float(at_leaf.mean()),  # share answered with a leaf
            "mean_depth": float(np.mean([len(p) for _, p in walks if p])) if covered.any() else None,
        },
        "unsure": {
            "n": int(unsure.sum()),
            "leaf_accuracy": float((proba.argmax(1) == y)[unsure].mean()) if unsure.any() else None,
            "rollup_coverage": float(covered[unsure].mean()) if unsure.any() else None,
            "rollup_accuracy": float(on_path[unsure & covered].mean()) if (unsure & covered).any() else None,
        },
    }
