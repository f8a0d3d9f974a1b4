"""A model's further attribute heads (``finish``, ``tags``) in its ``manifest.json``: the entries
export writes, the ONNX output each reads from, and the one check of them on loading. The
network holds them as ``attributes.<i>`` beside its main head (:class:`pipeline.models.heads.Classifier`)."""

from __future__ import annotations

from typing import Any

from ..errors import ArtifactError
from .head_dir import checked_class_names

REEXPORT = "re-export it with `headstart export`"


def attribute_entries(attributes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**a, "output": o} for a, o in zip(attributes, attribute_outputs(attributes), strict=True)]


def attribute_outputs(attributes: list[dict[str, Any]]) -> list[str]:
    """The ONNX output of each further attribute: ``probabilities_<name>`` when the name is an
    identifier (so ``session.run(["probabilities_finish"], ...)`` reads naturally), else
    ``probabilities_<i>``; the manifest's ``attributes`` maps outputs to names either way."""
    return [
        f"probabilities_{a['name']}" if str(a["name"]).isidentifier() else f"probabilities_{i}"
        for i, a in enumerate(attributes)
    ]


def check_attributes(attributes: Any, what: str) -> None:
    """Each further attribute: a name, its class names, a head kind, its ONNX output, and for a
    multi-label one a threshold per label in [0, 1]."""
    if attributes is None:
        return
    if not isinstance(attributes, list):
        raise ArtifactError(f"{what} 'attributes' is not a list; {REEXPORT}")
    for a in attributes:
        if not (isinstance(a, dict) and isinstance(a.get("name"), str) and isinstance(a.get("output"), str)):
            raise ArtifactError(f"{what} 'attributes' holds an entry without a name and an output; {REEXPORT}")
        where = f"{what} attribute {a['name']!r}"
        names = checked_class_names(a.get("class_names"), what=where, fix=REEXPORT)
        if not isinstance(a.get("head"), dict) or not isinstance(a["head"].get("kind"), str):
            raise ArtifactError(f"{where} has no head kind; {REEXPORT}")
        if a.get("multi_label"):
            t = a.get("thresholds")
            if not (isinstance(t, list) and len(t) == len(names)) or not all(
                isinstance(v, int | float) and 0 <= v <= 1 for v in t
            ):
                raise ArtifactError(f"{where} needs one threshold in [0, 1] per label; {REEXPORT}")
