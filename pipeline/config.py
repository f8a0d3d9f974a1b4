"""Configuration: one frozen dataclass per stage; defaults < TOML file < command-line flags.

``headstart --config FILE cmd`` loads FILE (one table per command, e.g. ``[fit-head]``) into
click's ``default_map``, so explicit flags always win. Each stage writes the configuration it
actually used next to its output (``config.json``), the way timm writes ``args.yaml``.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

DEFAULT_BACKBONE = "efficientnet_lite0"
ARTIFACTS = Path("artifacts")


@dataclass(frozen=True)
class ExtractConfig:
    images: str
    out: str = str(ARTIFACTS / "features.h5")
    backbone: str = DEFAULT_BACKBONE
    weights_file: str | None = None
    device: str = "auto"
    precision: str = "auto"  # auto | fp32 | bf16 (part of the fingerprint)
    dtype: str = "float16"  # storage type of /features
    batch_size: int | None = None  # None = chosen from the hardware
    workers: int | None = None
    draft: bool = True
    letterbox: bool = False
    decode: str = "cpu"  # cpu (PIL in DataLoader workers) | gpu (nvjpeg, batched, CPU fallback per file)
    max_pixels: int | None = None
    rebuild: bool = False
    strict: bool = False
    progress: bool = True


@dataclass(frozen=True)
class FitHeadConfig:
    cache: str
    out: str = str(ARTIFACTS / "head")
    head: str = "logreg"
    c: float | None = None  # None = sweep C on the validation split
    val_fraction: float = 0.2
    class_weight: str | None = None  # None | "balanced"
    seed: int = 0
    max_iter: int = 1000
    # Issue 4 (heads, label maps, honest splits, calibration); see fit_head.py for each.
    device: str = "auto"  # auto | cpu | cuda | cuda:N - cuda* = torch L-BFGS on the GPU
    classes: str | None = None  # label map TOML: merge / rename / drop with stable class ids
    near_duplicate_threshold: float | None = 0.97  # feature cosine; None or 1 = off (why 0.97: splits.py)
    calibrate: bool = True  # temperature scaling on the validation split
    unknown_threshold: float | None = None  # recorded in head.json for evaluate / predict
    hidden: int = 512  # MLP head width
    max_memory_gb: float | None = None  # above: stream features from the cache (None = half the RAM)


@dataclass(frozen=True)
class FinetuneConfig:
    images: str
    head: str  # HEAD_DIR from fit-head: LP-FT start, class names, preprocessing, validation split
    out: str = str(ARTIFACTS / "finetune")
    epochs: int = 10
    batch_size: int | None = None  # per process; None = 64 on GPU, 32 on CPU
    accum_steps: int = 1  # gradient accumulation (small GPUs)
    lr: float = 1e-4  # head and top group; lower groups get lr * layer_decay**depth
    layer_decay: float = 0.5
    stages: int = 4  # backbone layer groups for unfreezing and learning rates
    unfreeze_every: float = 1.0  # epochs between unfreezing the next group down; 0 = all at once
    warmup: float = 0.1  # fraction of the optimizer steps
    weight_decay: float = 0.05
    label_smoothing: float = 0.0
    class_weight: str | None = None  # None | "balanced"
    augment: str = "auto"  # auto | product | letterbox | none (never changes colour)
    init: str = "lp"  # lp: start from the fitted head (LP-FT) | random: a fresh head
    patience: int = 3  # epochs without better validation log-loss before stopping; 0 = never
    clip_grad: float | None = 1.0
    checkpoint_every: int = 50  # optimizer steps between resume checkpoints (and every epoch)
    resume: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    workers: int | None = None
    weights_file: str | None = None
    max_pixels: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class ExportConfig:
    head: str
    out: str = str(ARTIFACTS / "model")
    weights_file: str | None = None
    format: str = "native"  # native (model.pt) | onnx (model.onnx, needs the `onnx` extra)
    parity_tolerance: float = 1e-3  # max |p_exported - p_pytorch| on sample images


@dataclass(frozen=True)
class PredictConfig:
    model: str
    inputs: tuple[str, ...]
    out: str = str(ARTIFACTS / "predictions.csv")
    format: str | None = None  # csv | jsonl; None = from the --out extension
    top_k: int = 3
    unknown_threshold: float | None = None  # top-1 probability below it -> label "unknown"
    embeddings: str | None = None  # .npy or .h5 file for the features, one row per input
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    progress: bool = True


@dataclass(frozen=True)
class EvaluateConfig:
    model: str  # an exported model directory or a head directory
    data: str  # a folder of class folders / CSV manifest, or a feature cache (.h5)
    out: str = str(ARTIFACTS / "report")
    unknown_threshold: float | None = None  # None = the head's, if it recorded one
    worst: int = 24  # mistakes shown as thumbnails
    device: str = "auto"
    batch_size: int | None = None
    workers: int | None = None
    progress: bool = True


def to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def save_resolved(cfg: Any, path: str | Path, **extra: Any) -> Path:
    """Write the configuration a stage actually used (plus resolved choices) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"stage": type(cfg).__name__.removesuffix("Config").lower(), **to_dict(cfg), **extra}
    path.write_text(json.dumps(body, indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8")
    return path


def load_default_map(path: str | Path) -> dict[str, dict[str, Any]]:
    """TOML file -> click ``default_map``: ``{command: {param_name: value}}``.

    Keys may be written with dashes or underscores (``top-k`` or ``top_k``)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"config file {path} is not valid TOML: {e}") from None
    out: dict[str, dict[str, Any]] = {}
    for command, table in data.items():
        if not isinstance(table, dict):
            raise InputError(f"config file {path}: '{command}' must be a table like [{command}]")
        out[command.replace("_", "-")] = {k.replace("-", "_"): v for k, v in table.items()}
    return out
