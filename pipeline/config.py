"""Configuration: one frozen dataclass per command; defaults < TOML file < command-line flags.

The dataclass fields are the one place where defaults are written. Each field's metadata holds
its help text and what values it takes (``choices``, ``min``/``max``, ``path``); the click
options in :mod:`pipeline.cli` and ``configs/default.toml`` (:func:`default_toml`) are derived
from them. ``headstart --config FILE cmd`` (or ``headstart cmd --config FILE``) loads FILE, one
table per command (e.g. ``[fit-head]``), into click's ``default_map``, so explicit flags always
win; unknown tables and keys are errors (:func:`load_default_map`). Each stage writes the
configuration it actually used next to its output (``config.json``), the way timm writes
``args.yaml``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError

DEFAULT_BACKBONE = "efficientnet_lite0"
ARTIFACTS = Path("artifacts")
PRECISIONS = ("auto", "fp32", "bf16")
CLASS_WEIGHTS = ("balanced",)
DEVICE_HELP = "auto, cpu, cuda, cuda:N."
PROGRESS_HELP = "Show progress bars."
BATCH_HELP = "Default: 256 on GPU, 16 on CPU."
PRECISION_HELP = (
    "Compute precision; auto = fp32 with --engine onnxruntime, else bf16 on CUDA and on CPUs with AMX/avx512_bf16."
)
ENGINES = ("auto", "torch", "onnxruntime")
# Why these defaults: README "Backbones" and models/hub.py (a ViT's cost grows with its tokens).
IMAGE_SIZE_HELP = (
    "Input size in px, the same as --backbone NAME@SIZE (timm/, hf/, open_clip/ and imported backbones). "
    "Default: ViTs (DINOv2, ViT, SigLIP) at most 224 (DINOv2's native 518 costs ~8.6x), CNNs their recipe's "
    "size, open_clip towers their fixed size."
)
ENGINE_HELP = "Backbone runtime; auto = onnxruntime on the CPU when installed (fp32), else PyTorch."
BOMB_HELP = "Refuse larger images (decompression bombs)."
RAW_CSV_HELP = (
    "Write CSV cells as they are; by default a cell starting with = + - @ gets a leading ' (formula injection)."
)


def _opt(default: Any, help: str = "", **meta: Any) -> Any:
    """A field with its single default, its help text and (``meta``) the values it takes:
    ``choices``, ``min``/``max`` (``min_open``/``max_open``: the bound itself excluded), ``path``
    (an input: "file" or "any") or ``output`` (what the command writes there: "file" or "dir",
    checked by :func:`check_outputs`)."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class ExtractConfig:
    images: str = field(
        metadata={"help": "Folder of class folders, folder of unlabelled images, or CSV manifest.", "path": "any"}
    )
    out: str = _opt(str(ARTIFACTS / "features.h5"), "HDF5 feature cache to create or update.", output="file")
    backbone: str = _opt(DEFAULT_BACKBONE, "See `headstart backbones`.")
    image_size: int | None = _opt(None, IMAGE_SIZE_HELP, min=8, max=4096)  # in the name: BASE@SIZE:POOL
    weights_file: str | None = _opt(None, "Backbone weights file (torchvision .pth).", path="file")
    device: str = _opt("auto", DEVICE_HELP)
    precision: str = _opt("auto", PRECISION_HELP, choices=PRECISIONS)  # part of the cache fingerprint
    engine: str = _opt("auto", ENGINE_HELP, choices=ENGINES)  # not in the fingerprint: features agree
    dtype: str = _opt("float16", "Storage type of the features.", choices=("float16", "float32"))
    batch_size: int | None = _opt(None, BATCH_HELP, min=1)  # None = chosen from the hardware
    workers: int | None = _opt(None, "Decode processes. Default: from the CPU count.", min=0)
    draft: bool = _opt(True, "JPEG DCT-domain downscaling of large photos.")
    letterbox: bool = _opt(False, "Pad to a square on white instead of centre-cropping.")
    decode: str = _opt(
        "cpu",
        "gpu: batched nvjpeg JPEG decoding and resizing on the GPU (CPU fallback per file).",
        choices=("cpu", "gpu"),
    )
    max_pixels: int | None = _opt(None, BOMB_HELP, min=1)
    rebuild: bool = _opt(False, "Discard the existing cache and start over.")
    rehash: bool = _opt(
        False, "Read and hash every file, instead of trusting an unchanged size, mtime and inode (the stat cache)."
    )
    strict: bool = _opt(False, "Exit with an error if any file was skipped.")
    progress: bool = _opt(True, PROGRESS_HELP)


@dataclass(frozen=True)
class FitHeadConfig:
    cache: str = field(metadata={"help": "Feature cache from extract.", "path": "file"})
    out: str = _opt(str(ARTIFACTS / "head"), "Head directory to write.", output="dir")
    head: str = _opt(
        "logreg", "Head kind, e.g. logreg (swept C), mlp, centroid; `headstart fit-head --help` lists them."
    )
    c: float | None = _opt(
        None, "Inverse regularisation strength; default: swept on the validation split.", min=0, min_open=True
    )
    val_fraction: float = _opt(0.2, "Stratified validation share.", min=0, max=1, min_open=True, max_open=True)
    class_weight: str | None = _opt(None, "Re-weight classes (imbalanced catalogs).", choices=CLASS_WEIGHTS)
    seed: int = _opt(0, "Seed of the validation split.", min=0)
    max_iter: int = _opt(1000, "L-BFGS iterations.", min=1, max=1_000_000)
    # Issue 4 (heads, label maps, honest splits, calibration); see pipeline/fit_head/ for each.
    device: str = _opt("auto", "cuda: torch L-BFGS on the GPU; cpu: scikit-learn.")
    # one label map per attribute (its `attribute = "..."` key; default: the label column)
    classes: tuple[str, ...] = _opt(
        (), "Label map TOML: merge/rename/drop, stable ids; once per attribute.", path="file"
    )
    attribute: tuple[str, ...] = _opt((), "Manifest column(s) to fit a head for; default: every one.")
    target_precision: float | None = _opt(
        None, "Multi-label thresholds: per label, the most recall whose validation precision is still at least "
        "this (a label far above it gets a lower threshold); default: max F1.",
        min=0, max=1, min_open=True,
    )  # fmt: skip
    near_duplicate_threshold: float | None = _opt(  # why 0.97: splits.py
        0.97, "Photos with feature cosine above this stay on one side of the split (1 = off).", min=0, max=1
    )
    calibrate: bool = _opt(True, "Temperature scaling on the validation split.")
    unknown_threshold: float | None = _opt(None, "Recorded in the head: below it, evaluate says unknown.", min=0, max=1)
    hidden: int = _opt(512, "MLP hidden width.", min=1, max=65536)
    max_memory_gb: float | None = _opt(None, "Above: stream features from the cache (logreg).", min=0)  # None: RAM/2
    text_prior: float | None = _opt(  # probe/zeroshot.py: the method, why, and why 0.1
        None, "Keep the logreg head near the zero-shot head from class prompts (CLIP/SigLIP); try 0.1.",
        min=0, min_open=True,
    )  # fmt: skip

    def __post_init__(self) -> None:
        # One path, as the Python API and configs before per-attribute maps give it.
        for name in ("classes", "attribute"):
            value = getattr(self, name)
            if isinstance(value, str):
                object.__setattr__(self, name, (value,))
            elif value is None:
                object.__setattr__(self, name, ())
            else:
                object.__setattr__(self, name, tuple(value))


@dataclass(frozen=True)
class FinetuneConfig:
    images: str = field(metadata={"help": "Photos to fine-tune on (as for extract).", "path": "any"})
    # HEAD_DIR from fit-head: LP-FT start, class names, preprocessing, validation split
    head: str = field(metadata={"help": "HEAD_DIR from fit-head (the LP-FT start).", "path": "any"})
    out: str = _opt(str(ARTIFACTS / "finetune"), "FT_DIR to write.", output="dir")
    epochs: int = _opt(10, "Epochs at most (early stopping may end sooner).", min=1)
    batch_size: int | None = _opt(None, "Per process. Default: 64 on GPU, 32 on CPU.", min=1)
    accum_steps: int = _opt(1, "Gradient accumulation.", min=1)
    lr: float = _opt(
        1e-4, "Learning rate of the head and top group; each group down: times --layer-decay.", min=0, min_open=True
    )
    layer_decay: float = _opt(
        0.5, "LR factor per group down.", min=0, max=1, min_open=True
    )  # group at depth d: lr * layer_decay**d
    stages: int = _opt(4, "Backbone layer groups (for unfreezing and learning rates).", min=1)
    unfreeze_every: float = _opt(1.0, "Epochs between unfreezing the next group down; 0 = all at once.", min=0)
    warmup: float = _opt(0.1, "Share of the optimizer steps for learning-rate warm-up.", min=0, max=1)
    weight_decay: float = _opt(0.05, "AdamW weight decay.", min=0)
    label_smoothing: float = _opt(
        0.0, "Label smoothing of the cross-entropy loss, in [0, 1).", min=0, max=1, max_open=True
    )
    class_weight: str | None = _opt(None, "Re-weight classes (imbalanced catalogs).", choices=CLASS_WEIGHTS)
    augment: str = _opt(
        "auto", "Augmentation preset; none of them changes colour.", choices=("auto", "product", "letterbox", "none")
    )
    init: str = _opt("lp", "Start head.", choices=("lp", "random"))  # lp: the fitted head (LP-FT)
    patience: int = _opt(3, "Epochs without better validation log-loss before stopping; 0 = never.", min=0)
    clip_grad: float | None = _opt(1.0, "Clip the gradient norm to this; 0 = off.", min=0)
    checkpoint_every: int = _opt(50, "Optimizer steps between resume checkpoints (and every epoch).", min=1)
    resume: bool = _opt(False, "Continue an interrupted fine-tune from FT_DIR/checkpoint/last.pt.")
    seed: int = _opt(0, "Seed of shuffling, augmentation and a random head.", min=0)
    device: str = _opt("auto", DEVICE_HELP)
    precision: str = _opt("auto", PRECISION_HELP, choices=PRECISIONS)
    workers: int | None = _opt(None, "Decode processes.", min=0)
    weights_file: str | None = _opt(None, "Backbone weights file.", path="file")
    max_pixels: int | None = _opt(None, BOMB_HELP, min=1)
    progress: bool = _opt(True, PROGRESS_HELP)


@dataclass(frozen=True)
class ExportConfig:
    head: str = field(metadata={"help": "HEAD_DIR from fit-head or FT_DIR from finetune.", "path": "any"})
    out: str = _opt(str(ARTIFACTS / "model"), "Model directory to write.", output="dir")
    weights_file: str | None = _opt(None, "Backbone weights file, if not found automatically.", path="file")
    format: str = _opt(
        "native",
        "native: model.pt for headstart/PyTorch; onnx: model.onnx for onnxruntime "
        "(needs onnx: pip install '.[onnx]' in the clone).",
        choices=("native", "onnx"),
    )
    parity_tolerance: float = _opt(
        1e-3, "Fail if exported and PyTorch probabilities differ by more on sample images.", min=0
    )


@dataclass(frozen=True)
class PredictConfig:
    model: str = field(metadata={"help": "Model directory from export.", "path": "any"})
    inputs: tuple[str, ...] = field(metadata={"help": "Image files, folders, glob patterns, lists of paths, or -."})
    out: str = _opt(str(ARTIFACTS / "predictions.csv"), "CSV or .jsonl file to write; - for stdout.", output="file")
    format: str | None = _opt(
        None, "Output format. Default: jsonl if --out ends in .jsonl/.ndjson, else csv.", choices=("csv", "jsonl")
    )
    top_k: int = _opt(3, "Labels per photo.", min=1, max=1000)
    unknown_threshold: float | None = _opt(
        None, "Label a photo 'unknown' when its best probability is below this.", min=0, max=1
    )
    min_confidence: float = _opt(
        0.5, "With a category tree: answer the deepest node whose probability is at least this.", min=0, max=1
    )
    embeddings: str | None = _opt(None, "Also write the features, one row per input (.npy or .h5).", output="file")
    raw_csv: bool = _opt(False, RAW_CSV_HELP)
    device: str = _opt("auto", DEVICE_HELP)
    precision: str = _opt(
        "auto", "auto = the precision the head was trained on, when this machine runs it fast.", choices=PRECISIONS
    )
    engine: str = _opt("auto", ENGINE_HELP + " (ONNX models always run in onnxruntime.)", choices=ENGINES)
    batch_size: int | None = _opt(None, BATCH_HELP, min=1)
    workers: int | None = _opt(None, "Decode processes.", min=0)
    progress: bool = _opt(True, PROGRESS_HELP)


@dataclass(frozen=True)
class EvaluateConfig:
    model: str = field(metadata={"help": "An exported model directory or a head directory.", "path": "any"})
    data: str = field(
        metadata={"help": "A folder of class folders / CSV manifest, or a feature cache (.h5).", "path": "any"}
    )
    out: str = _opt(str(ARTIFACTS / "report"), "Report directory to write.", output="dir")
    unknown_threshold: float | None = _opt(None, "Report coverage/accuracy at it (default: the head's).", min=0, max=1)
    min_confidence: float = _opt(0.5, "With a category tree: the roll-up's threshold to report on.", min=0, max=1)
    attribute: str | None = _opt(None, "Score the head of this attribute (manifest column); default: the main one.")
    worst: int = _opt(24, "Mistakes shown as thumbnails.", min=0, max=10_000)
    raw_csv: bool = _opt(False, RAW_CSV_HELP)
    device: str = _opt("auto", DEVICE_HELP)
    engine: str = _opt("auto", ENGINE_HELP, choices=ENGINES)
    batch_size: int | None = _opt(None, BATCH_HELP, min=1)
    workers: int | None = _opt(None, "Decode processes.", min=0)
    progress: bool = _opt(True, PROGRESS_HELP)


@dataclass(frozen=True)
class SimilarConfig:
    image: str = field(metadata={"help": "The query photo.", "path": "any"})
    cache: str = field(metadata={"help": "Feature cache to search.", "path": "file"})
    k: int = _opt(10, "How many photos.", min=1, max=100_000)
    exclude_self: bool = _opt(False, "Leave out catalog photos with the same bytes as IMAGE (the query itself).")
    device: str = _opt("auto", DEVICE_HELP)


@dataclass(frozen=True)
class DemoConfig:
    out: str = _opt(str(ARTIFACTS / "demo"), "Where to write everything.", output="dir")
    backbone: str = _opt(DEFAULT_BACKBONE, "See `headstart backbones`.")
    image_size: int | None = _opt(None, IMAGE_SIZE_HELP, min=8, max=4096)
    progress: bool = _opt(True, PROGRESS_HELP)


@dataclass(frozen=True)
class AuditConfig:
    cache: str = field(metadata={"help": "Feature cache from extract.", "path": "file"})
    out: str = _opt(str(ARTIFACTS / "audit"), "Report directory to write.", output="dir")
    head: str | None = _opt(
        None,
        "HEAD_DIR from fit-head: cross-fit its kind, C and label map (default: what fit-head would fit).",
        path="any",
    )
    classes: str | None = _opt(None, "Label map TOML (as for fit-head; default: the head's).", path="file")
    attribute: str | None = _opt(None, "Audit this manifest column (single-label); default: the label column.")
    folds: int = _opt(5, "Cross-fitting folds: each photo is scored by a head fitted without it.", min=2, max=50)
    budget: int = _opt(50, "Unlabelled photos to suggest in label_next.csv.", min=0, max=1_000_000)
    # Why 0.96 (docs/benchmarks.md "Audit"): distinct photos of one class reach 0.952; above 0.96
    # are 78% of re-encoded, resized, cropped and brightened copies (all resized ones).
    duplicate_threshold: float = _opt(
        0.96, "Photos with feature cosine above this are near duplicates (duplicates.csv).", min=0, max=1
    )
    near_duplicate_threshold: float | None = _opt(
        0.97, "Near duplicates stay in one fold (1 = off; default: as fit-head).", min=0, max=1
    )
    outlier_threshold: float = _opt(  # robust z-score; why 5: probe/neighbours.py, docs/benchmarks.md
        5.0, "A photo further than this many robust deviations from every class is an outlier.", min=0
    )
    class_weight: str | None = _opt(None, "Re-weight classes (as for fit-head).", choices=CLASS_WEIGHTS)
    seed: int = _opt(0, "Seed of the folds and of fit-head's validation split.", min=0)
    device: str = _opt("auto", "cuda: torch L-BFGS on the GPU; cpu: scikit-learn.")
    apply: str | None = _opt(
        None,
        "CSV of accepted rows of label_issues.csv: write OUT/relabelled.csv (a manifest for extract).",
        path="file",
    )
    examples: int = _opt(24, "Thumbnails per section of report.html.", min=0, max=10_000)
    raw_csv: bool = _opt(False, RAW_CSV_HELP)
    progress: bool = _opt(True, PROGRESS_HELP)


# The commands that read a table of a --config file, in the order of the pipeline.
COMMANDS: dict[str, type] = {
    "extract": ExtractConfig,
    "fit-head": FitHeadConfig,
    "finetune": FinetuneConfig,
    "export": ExportConfig,
    "predict": PredictConfig,
    "evaluate": EvaluateConfig,
    "similar": SimilarConfig,
    "audit": AuditConfig,
    "demo": DemoConfig,
}


def check_outputs(cls: type, values: dict[str, Any]) -> None:
    """The one output-path check of every command: each field with ``output`` metadata
    (``--out``, ``--embeddings``) must be a path where that kind can be written
    (:func:`pipeline.core.paths.check_output`); ``-`` (stdout) and None are skipped."""
    from .core.paths import check_output

    for f in dataclasses.fields(cls):
        kind = f.metadata.get("output")
        value = values.get(f.name)
        if kind is None or value is None or value == "-":
            continue
        example = Path(f.default).name if isinstance(f.default, str) else ""  # features.h5, predictions.csv
        check_output(value, kind, option="--" + f.name.replace("_", "-"), example=example)


def has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING


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


def _key(name: str) -> str:
    return name.replace("_", "-")


def _unknown(what: str, name: str, where: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(name, valid, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"unknown {what} {name}{where}{hint}; valid {what}s: {', '.join(valid)}"


def load_default_map(path: str | Path) -> dict[str, dict[str, Any]]:
    """TOML file -> click ``default_map``: ``{command: {param_name: value}}``.

    Keys may be written with dashes or underscores (``top-k`` or ``top_k``); a table or key that
    no command has is an :class:`InputError` naming it and the valid ones."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"config file {path} is not valid TOML: {e}") from None
    tables = [f"[{c}]" for c in COMMANDS]
    out: dict[str, dict[str, Any]] = {}
    for command, table in data.items():
        name = _key(command)
        if not isinstance(table, dict):
            raise InputError(
                f"config file {path}: key {command} is outside a table; put it in one of {', '.join(tables)}"
            )
        if name not in COMMANDS:
            raise InputError(f"config file {path}: {_unknown('table', f'[{name}]', '', tables)}")
        keys = [_key(f.name) for f in dataclasses.fields(COMMANDS[name])]
        for k in table:
            if _key(k) not in keys:
                raise InputError(f"config file {path}: {_unknown('key', _key(k), f' in [{name}]', keys)}")
        many = {f.name for f in dataclasses.fields(COMMANDS[name]) if isinstance(f.default, tuple)}
        out[name] = {
            (k2 := k.replace("-", "_")): ([v] if k2 in many and isinstance(v, str) else v) for k, v in table.items()
        }
    return out


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    return json.dumps(list(v) if isinstance(v, tuple) else v) if isinstance(v, str | tuple) else repr(v)


def default_toml() -> str:
    """The text of ``configs/default.toml``: every field of every command with its default.

    Fields without a default value (None) are written as comments; positional arguments
    (IMAGES, CACHE, ...) may be given as keys too but have no default and are left out."""
    lines = [
        "# Defaults for every command, one table per command; generated from pipeline/config.py",
        "# (pipeline.config.default_toml(); tests/test_config.py checks that they agree). Use with:",
        "#   headstart --config configs/default.toml <command> ...",
        "#   headstart <command> --config configs/default.toml ...",
        "# Flags given on the command line win over these values. Commented-out keys have no fixed",
        "# default (see the note after them). Any other table or key is an error, except a command's",
        '# arguments (e.g. images = "photos/" in [extract]).',
    ]
    for command, cls in COMMANDS.items():
        lines += ["", f"[{command}]"]
        for f in dataclasses.fields(cls):
            if not has_default(f):
                continue
            choices = f.metadata.get("choices")
            note = f.metadata["help"] + (f" One of: {' | '.join(choices)}." if choices else "")
            unset = f.default is None or f.default == ()
            key = f"# {_key(f.name)} =" if unset else f"{_key(f.name)} = {_toml_value(f.default)}"
            lines.append(f"{key:<38} # {note}")
    return "\n".join(lines) + "\n"
