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


@dataclass(frozen=True)
class ExportConfig:
    head: str
    out: str = str(ARTIFACTS / "model")
    weights_file: str | None = None


@dataclass(frozen=True)
class PredictConfig:
    model: str
    inputs: tuple[str, ...]
    out: str = str(ARTIFACTS / "predictions.csv")
    top_k: int = 3
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
