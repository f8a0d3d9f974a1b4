"""Inference engines for the frozen backbone: onnxruntime on the CPU, PyTorch elsewhere.

Why not eager PyTorch everywhere: on the CPU its speed depends on the CPU model far more than
onnxruntime's does. Lite0 features, batch 32, 2 threads (docs/benchmarks.md has the runs): on an
AMD EPYC with AVX2 only, PyTorch fp32 30.5 img/s, onnxruntime fp32 115 (3.8x), OpenVINO 68; on a
CPU with avx512_bf16, PyTorch fp32 35.5, PyTorch bf16 96, onnxruntime fp32 244. onnxruntime is
the fastest everywhere measured, in fp32, so it also removes bf16's CPU-to-CPU drift.

``--engine auto`` (the default) picks onnxruntime on the CPU when it is installed (the ``onnx``
extra) and the precision is fp32 or auto, else PyTorch; on CUDA always PyTorch. The engine is
not part of the features' fingerprint: fp32 onnxruntime and fp32 PyTorch features agree within
1e-4 (tests/test_engine.py), so a cache may be extended by either.

The ONNX graph of a backbone is exported once and kept in the user's cache directory
(``$HEADSTART_CACHE_DIR``, else ``$XDG_CACHE_HOME/headstart``, else ``~/.cache/headstart``),
under a name derived from what determines the graph: the sha256 of the network's tensors, the
crop size, the opset, torch's version. A sidecar
records the graph's sha256; a graph that does not match it, or that onnxruntime cannot load, is
rebuilt, never used. Writes are atomic, so a killed export leaves no partial graph behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ENGINES
from ..core import runtime
from ..core.atomic import atomic_file
from ..core.hashing import sha256_file
from ..errors import BackboneError, InputError

OPSET = 17  # onnxruntime >= 1.14 runs it; old enough for most deployment runtimes
INPUT = "pixels"  # uint8 [N, 3, crop, crop]: the input of every graph headstart writes
GRAPH_VERSION = 1  # bump when the exported graph changes for the same inputs

Embed = Callable[[torch.Tensor], np.ndarray]  # uint8 NCHW on the device -> float32 (N, D)


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(engine: str, precision: str, device: torch.device) -> tuple[str, str]:
    """(engine, precision) to run with. ``precision`` may be auto, fp32 or bf16."""
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "onnxruntime":
        if device.type != "cpu":
            raise InputError(f"--engine onnxruntime runs on the CPU here, not on {device}; use --engine torch")
        if not onnxruntime_available():
            raise InputError("--engine onnxruntime needs onnxruntime: install the extra, `pip install '.[onnx]'`")
        if precision == "bf16":
            raise InputError("--engine onnxruntime computes in fp32; use --precision fp32 or auto")
        return "onnxruntime", "fp32"
    if engine == "auto" and device.type == "cpu" and precision in ("auto", "fp32") and onnxruntime_available():
        return "onnxruntime", "fp32"
    return "torch", runtime.resolve_precision(precision, device)


def cache_dir() -> Path:
    if os.environ.get("HEADSTART_CACHE_DIR"):
        return Path(os.environ["HEADSTART_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "headstart"


def make_embedder(net: nn.Module, crop: int, *, engine: str, device: torch.device, precision: str) -> Embed:
    """A function from a batch of uint8 pixels to features, for a resolved (engine, precision).
    ``net`` is a ``models.network.FeatureNet``; ``crop`` the side of its input."""
    frozen = net.for_inference()  # type: ignore[operator]
    if engine == "onnxruntime":
        try:
            session = _session(frozen, network_identity(frozen), crop)
        except GraphExportError as e:
            # Same features within 1e-4 either way (the engine is not in the fingerprint): run
            # it in PyTorch and say so, rather than stop a run over a speed-up.
            print(f"note: {e}; running the backbone in PyTorch instead (--engine torch)", file=sys.stderr)
            return make_embedder(net, crop, engine="torch", device=device, precision="fp32")

        def run_onnx(x: torch.Tensor) -> np.ndarray:
            return np.asarray(session.run(["features"], {INPUT: x.cpu().numpy()})[0], np.float32)

        return run_onnx
    frozen = frozen.to(device)
    if runtime.CHANNELS_LAST:
        frozen = frozen.to(memory_format=torch.channels_last)

    def run_torch(x: torch.Tensor) -> np.ndarray:
        if runtime.CHANNELS_LAST:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), runtime.autocast(device, precision):
            return np.asarray(frozen(x).float().cpu().numpy())

    return run_torch


def network_identity(net: nn.Module) -> str:
    """sha256 of the network's parameters and buffers: the graph cache's key can never name
    other weights than the ones exported (a fine-tuned model, a --weights-file, a registry
    change), and hashing ~20 MB of tensors costs tens of milliseconds."""
    h = hashlib.sha256()
    for name, t in sorted(net.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def graph_path(identity: str, crop: int) -> Path:
    key = json.dumps(
        {"identity": identity, "crop": crop, "opset": OPSET, "torch": torch.__version__, "graph": GRAPH_VERSION},
        sort_keys=True,
    )
    return cache_dir() / "engines" / f"backbone-{hashlib.sha256(key.encode()).hexdigest()[:24]}.onnx"


def _session(frozen: nn.Module, identity: str, crop: int) -> Any:
    path = graph_path(identity, crop)
    sidecar = path.with_suffix(".json")
    if not _intact(path, sidecar):
        _export(frozen, crop, path, sidecar)
    try:
        return ort_session(path, threads=torch.get_num_threads())
    except Exception:  # onnxruntime's own types: a graph it cannot load although its sha256 matched
        _export(frozen, crop, path, sidecar)
        return ort_session(path, threads=torch.get_num_threads())


def ort_session(path: Path, *, threads: int | None = None, providers: Sequence[str] = ("CPUExecutionProvider",)) -> Any:
    """An onnxruntime session for the graph at ``path``. Built from the bytes, not the path: the
    graph cannot pull in "external data" files from beside (or above) its folder, and the bytes
    checked are the bytes run."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(path.read_bytes(), sess_options=opts, providers=list(providers))


def export_graph(module: nn.Module, crop: int, path: Path, outputs: Sequence[str]) -> None:
    """``module`` (uint8 pixels ``[N, 3, crop, crop]`` -> ``outputs``) as an ONNX graph at
    ``path``, with a dynamic batch dimension. PyTorch's TorchScript-based exporter
    (``dynamo=False``): it needs no extra package, and EfficientNet-Lite (static SAME padding,
    ReLU6) and the torchvision CNNs trace cleanly."""
    example = torch.zeros(1, 3, crop, crop, dtype=torch.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[INPUT],
                output_names=list(outputs),
                dynamic_axes={name: {0: "N"} for name in (INPUT, *outputs)},
                opset_version=OPSET,
                dynamo=False,
            )
    except OSError:
        raise  # a full disk is the CLI's to report
    except Exception as e:  # the exporter's own types (an operator ONNX has no equivalent for, ...)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        why = f"{type(e).__name__}: {first}"
        raise GraphExportError(f"this network cannot be exported to ONNX opset {OPSET} ({why})") from e


class GraphExportError(BackboneError):
    """The network has an operation the ONNX exporter cannot express."""


def _intact(path: Path, sidecar: Path) -> bool:
    try:
        recorded = json.loads(sidecar.read_text())["sha256"]
        return path.is_file() and sha256_file(path) == recorded
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _export(frozen: nn.Module, crop: int, path: Path, sidecar: Path) -> None:
    """The frozen network as ``pixels uint8 [N,3,crop,crop] -> features float32 [N,D]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        export_graph(frozen.cpu().eval(), crop, tmp, ["features"])
        with atomic_file(path) as f:
            f.write(tmp.read_bytes())
    finally:
        tmp.unlink(missing_ok=True)
    with atomic_file(sidecar) as f:
        f.write(json.dumps({"sha256": sha256_file(path), "crop": crop, "opset": OPSET}).encode())
