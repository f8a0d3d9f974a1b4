"""ONNX export and ONNX Runtime sessions (the optional ``onnx`` extra: onnx + onnxruntime).

The graph is ``pixels uint8 [N, 3, S, S] -> (probabilities [N, C], features [N, D])``: the
uint8->float conversion, normalisation, backbone, head and softmax are all inside, with a
dynamic batch dimension. Class names, preprocessing and backbone identity are also written into
the file's ``metadata_props``, so the ``.onnx`` alone still says what it is.

The exporter and the session are :mod:`pipeline.models.engine`'s (the backbone engine writes
graphs the same way). The parity check in :mod:`pipeline.artifacts.model_dir` is what proves a
given export right.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import ArtifactError, InputError
from ..models.engine import INPUT, OPSET, GraphExportError, export_graph, ort_session
from ..models.heads import Classifier, ExportGraph

OUTPUTS = ("probabilities", "features")


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError:
        raise InputError(
            f"ONNX support needs the optional '{module}' package; "
            "install it from the clone with `pip install '.[onnx]'`"
        ) from None


def export_onnx(
    model: Classifier, path: Path, crop: int, metadata: dict[str, str], attribute_outputs: list[str] | None = None
) -> dict[str, Any]:
    """Write ``path``; return the outputs' description for the manifest. ``attribute_outputs``:
    the names of the further attributes' probability outputs, after the two of every model."""
    onnx = _require("onnx")
    _require("onnxruntime")
    extra = list(attribute_outputs or [])
    try:
        export_graph(ExportGraph(model).eval(), crop, path, (*OUTPUTS, *extra))
    except GraphExportError as e:
        raise ArtifactError(f"{e}; export it with --format native instead") from None
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))
    n_classes = int(model.head.n_classes)  # type: ignore[arg-type]
    return {
        OUTPUTS[0]: {"dtype": "float32", "shape": ["N", n_classes], "note": "softmax, in class_names order"},
        OUTPUTS[1]: {"dtype": "float32", "shape": ["N", model.net.feature_dim], "note": "backbone features"},
        **{
            name: {
                "dtype": "float32",
                "shape": ["N", int(head.n_classes)],  # type: ignore[arg-type]
                "note": "per-label sigmoid (multi-label)" if multi else "softmax, in the attribute's class_names order",
            }
            for name, head, multi in zip(extra, model.attributes, model.multi_label, strict=True)
        },
        "opset": OPSET,
    }


def check_graph(path: Path, manifest: dict[str, Any]) -> None:
    """Refuse a graph whose interface is not the one ``manifest`` describes: ``pixels`` uint8
    ``[N, 3, crop, crop]`` in, ``probabilities`` ``[N, classes]`` and ``features`` ``[N, D]``
    out. A ``model.onnx`` swapped for another (its sha256 re-recorded by hand) would otherwise
    crash ``predict`` mid-run, or label photos with the wrong class names. Metadata only."""
    crop = int(manifest["preprocessing"]["crop"])
    n_classes = len(manifest["class_names"])
    dim = int(manifest["backbone"].get("feature_dim") or 0) or None
    inputs, outputs = _graph_interface(path)
    fix = "re-export it with `headstart export`"
    problems = []
    if list(inputs) != [INPUT]:
        problems.append(f"its inputs are {', '.join(inputs) or 'none'}, not just '{INPUT}'")
    elif not _fits(inputs[INPUT], "uint8", [None, 3, crop, crop]):
        problems.append(f"input '{INPUT}' is {_show(inputs[INPUT])}, not uint8 [N, 3, {crop}, {crop}]")
    expected = [
        (OUTPUTS[0], n_classes, f"{n_classes} classes, as class_names lists"),
        (OUTPUTS[1], dim, f"{dim} features"),
        *((a["output"], len(a["class_names"]), f"the {a['name']!r} classes") for a in manifest.get("attributes") or []),
    ]
    for name, width, what in expected:
        if name not in outputs:
            problems.append(f"it has no output '{name}' (its outputs: {', '.join(outputs) or 'none'})")
        elif not _fits(outputs[name], "float", [None, width]):
            problems.append(f"output '{name}' is {_show(outputs[name])}, not float [N, {width or 'D'}] ({what})")
    if problems:
        raise ArtifactError(f"{path} does not match its manifest.json: {'; '.join(problems)}; {fix}")


Interface = tuple[str, list[int | None]]  # element type ("uint8", "float"), dims (None: symbolic)


def _graph_interface(path: Path) -> tuple[dict[str, Interface], dict[str, Interface]]:
    """Inputs and outputs of the graph at ``path``: from its protobuf with ``onnx`` (the
    ``[onnx]`` extra), else from an onnxruntime session (which a slim serving install has)."""
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
    except Exception:  # no onnx package, or protobuf's DecodeError: onnxruntime says what is wrong
        return _session_interface(path)
    weights = {t.name for t in graph.initializer}  # old exporters list weights among the inputs

    def proto(values: Any) -> dict[str, Interface]:
        out = {}
        for v in values:
            t = v.type.tensor_type
            elem = onnx.TensorProto.DataType.Name(t.elem_type).lower() if t.elem_type else "?"
            dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
            out[v.name] = (elem, dims)
        return out

    return proto(v for v in graph.input if v.name not in weights), proto(graph.output)


def _session_interface(path: Path) -> tuple[dict[str, Interface], dict[str, Interface]]:
    sess = onnx_session(path)  # an ArtifactError for a file that is no graph

    def ort(args: Any) -> dict[str, Interface]:  # type "tensor(uint8)", dims int or a name
        return {
            a.name: (a.type.removeprefix("tensor(").rstrip(")"), [d if isinstance(d, int) else None for d in a.shape])
            for a in args
        }

    return ort(sess.get_inputs()), ort(sess.get_outputs())


def _fits(got: Interface, elem: str, dims: list[int | None]) -> bool:
    """Same element type and rank, and every dimension that both fix is equal (a symbolic one
    in the graph, or None in ``dims``, fits anything)."""
    if got[0] != elem or len(got[1]) != len(dims):
        return False
    return all(g is None or w is None or g == w for g, w in zip(got[1], dims, strict=True))


def _show(i: Interface) -> str:
    return f"{i[0]} [{', '.join('?' if d is None else str(d) for d in i[1])}]"


def onnx_session(path: Path, device: torch.device | None = None, threads: int | None = None) -> Any:
    """An onnxruntime session on CPU (or CUDA when onnxruntime-gpu is installed and asked for)."""
    ort = _require("onnxruntime")
    providers = ["CPUExecutionProvider"]
    if device is not None and device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        return ort_session(path, threads=threads, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for invalid graphs
        raise ArtifactError(f"{path} cannot be loaded by onnxruntime ({str(e).splitlines()[0]}); re-export") from None
