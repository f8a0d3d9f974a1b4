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
from ..models.engine import OPSET, export_graph, ort_session
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


def export_onnx(model: Classifier, path: Path, crop: int, metadata: dict[str, str]) -> dict[str, Any]:
    """Write ``path``; return the outputs' description for the manifest."""
    onnx = _require("onnx")
    _require("onnxruntime")
    export_graph(ExportGraph(model).eval(), crop, path, OUTPUTS)
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
        "opset": OPSET,
    }


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
