"""Stage: exported model + images -> predictions. Python API :class:`Predictor`, CLI ``predict(cfg)``.

>>> p = Predictor.load("artifacts/model")             # doctest: +SKIP
>>> p.predict(["photo.jpg", pil_image])[0]["label"]  # doctest: +SKIP

Images go through the same DataLoader pipeline as ``extract`` (decode workers, uint8 batches,
pinned memory, the GPU when there is one), so serving and training see identical pixels. A native
model runs in PyTorch; an ONNX model in onnxruntime. A file that cannot be decoded becomes a row
with its error instead of stopping the run.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts.model_dir import LoadedModel, load_model
from .config import PredictConfig, save_resolved
from .core import runtime
from .core.csvcells import safe_cell
from .data.images import IMAGE_EXTENSIONS
from .data.loader import Batch, Source, embed_batches, make_loader
from .errors import InputError
from .models import engine as engines

UNKNOWN = "unknown"
LIST_EXTENSIONS = frozenset({".txt", ".lst", ".csv"})
OUTPUT_FORMATS = ("csv", "jsonl")


@dataclass
class BatchResult:
    index: np.ndarray  # positions in the source list, every item of the batch
    ok: np.ndarray  # bool mask over index
    probabilities: np.ndarray  # (n_ok, C) float32
    features: np.ndarray  # (n_ok, D) float32
    errors: list[str]  # "" where ok


@dataclass
class Predictor:
    loaded: LoadedModel
    device: torch.device
    precision: str
    session: Any = None  # onnxruntime.InferenceSession for ONNX models
    engine: str = "torch"  # how a native model's backbone runs (models.engine)
    _embed: Any = None  # built on first use: exporting or loading an engine costs seconds, once

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str = "auto", precision: str = "auto", engine: str = "auto"
    ) -> Predictor:
        loaded = load_model(path)
        dev = runtime.resolve_device(device)
        if loaded.runtime == "onnx":
            from .artifacts.onnx import onnx_session

            if precision not in ("auto", "fp32"):
                raise InputError(f"an ONNX model runs in fp32 only, not {precision}; use --precision fp32 or auto")
            return cls(loaded, dev, "fp32", onnx_session(loaded.weights_path, dev))
        if precision == "auto":
            # The precision the head's features were extracted in, when this machine has it fast,
            # so predictions match the head's view of the training photos.
            engine, precision = loaded.fingerprint.inference_choice(dev, engine)
        else:
            engine, precision = engines.resolve(engine, precision, dev)
        assert loaded.model is not None
        loaded.model.to(dev)
        return cls(loaded, dev, precision, engine=engine)

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    @property
    def feature_dim(self) -> int:
        return int(self.loaded.manifest["backbone"]["feature_dim"])

    def iter_batches(
        self, sources: Sequence[Source], *, batch_size: int | None = None, workers: int | None = None
    ) -> Iterator[BatchResult]:
        """Probabilities and features batch by batch, in input order."""
        loader = make_loader(
            sources, self.loaded.preprocessing, device=self.device, batch_size=batch_size, workers=workers
        )
        if self.session is not None:
            for batch in loader:
                yield self._onnx_batch(batch)
            return
        model = self.loaded.model
        assert model is not None
        if self._embed is None:
            crop = self.loaded.preprocessing.crop
            self._embed = engines.make_embedder(
                model.net, crop, engine=self.engine, device=self.device, precision=self.precision
            )
        for batch, feats in embed_batches(self._embed, loader, device=self.device):
            probs = np.zeros((0, len(self.class_names)), np.float32)
            if len(feats):
                with torch.inference_mode():
                    probs = model.head(torch.from_numpy(feats).to(self.device)).softmax(1).cpu().numpy()
            yield BatchResult(batch.index.numpy(), batch.ok.numpy(), probs, feats, batch.errors)

    def _onnx_batch(self, batch: Batch) -> BatchResult:
        probs = np.zeros((0, len(self.class_names)), np.float32)
        feats = np.zeros((0, self.feature_dim), np.float32)
        if batch.pixels.numel():
            probs, feats = self.session.run(["probabilities", "features"], {"pixels": batch.pixels.numpy()})
        return BatchResult(batch.index.numpy(), batch.ok.numpy(), probs, feats, batch.errors)

    def predict_proba(
        self,
        sources: Sequence[Source],
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, list[str]]:
        """Probabilities ``(N, C)`` (NaN rows where a file could not be decoded) and errors."""
        probs = np.full((len(sources), len(self.class_names)), np.nan, dtype=np.float32)
        errors = [""] * len(sources)
        with tqdm(total=len(sources), desc="predict", unit="img", disable=not progress) as bar:
            for r in self.iter_batches(sources, batch_size=batch_size, workers=workers):
                probs[r.index[r.ok]] = r.probabilities
                for j in np.flatnonzero(~r.ok):
                    errors[int(r.index[j])] = r.errors[j]
                bar.update(len(r.index))
        return probs, errors

    @property
    def unknown_threshold(self) -> float | None:
        """The threshold chosen at fit-head time, if any (``fit-head --unknown-threshold``)."""
        t = self.loaded.manifest["head"].get("unknown_threshold")
        return float(t) if isinstance(t, int | float) else None

    def predict(
        self, sources: Sequence[Source], *, top_k: int = 3, unknown_threshold: float | None = None, **kw: Any
    ) -> list[dict[str, Any]]:
        """One dict per input: ``label``, ``probability``, ``top_k`` [(label, p), ...], ``error``.

        A photo whose best probability is below ``unknown_threshold`` (default: the model's own,
        if fit-head set one; 0 turns it off) gets the label ``"unknown"``; ``top_k`` still lists
        the classes."""
        threshold = self.unknown_threshold if unknown_threshold is None else unknown_threshold
        probs, errors = self.predict_proba(sources, **kw)
        return [self._row(p, e, top_k, threshold) for p, e in zip(probs, errors, strict=True)]

    def _row(self, p: np.ndarray, err: str, top_k: int, threshold: float | None) -> dict[str, Any]:
        if err:
            return {"label": None, "probability": None, "top_k": [], "error": err}
        names = self.class_names
        order = np.argsort(-p, kind="stable")[: max(1, min(top_k, len(names)))]
        top = [(names[i], float(p[i])) for i in order]
        label = UNKNOWN if threshold is not None and top[0][1] < threshold else top[0][0]
        return {"label": label, "probability": top[0][1], "top_k": top, "error": ""}


# --------------------------------------------------------------------------- inputs


def expand_inputs(inputs: Sequence[str], stdin: IO[str] | None = None) -> list[Path]:
    """Files as given; folders searched recursively for images (sorted); glob patterns; list
    files (``.txt``/``.lst``: one path a line; ``.csv``: a ``path`` column, else the first)
    with paths relative to the list; ``-``: paths on stdin, as given (relative ones stay relative,
    like a folder's). Only regular files are read: a FIFO in a folder is passed over, and one
    named or listed is an error (reading it would block for ever).

    Listed files that do not exist are kept: they become rows with their error."""
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if raw == "-":
            paths.extend(_read_list(stdin or sys.stdin, Path(), csv_file=False))  # as typed, like folders
        elif p.is_dir():
            paths.extend(_images_under(p))
        elif p.is_file() and p.suffix.lower() in LIST_EXTENSIONS:
            with open(p, encoding="utf-8-sig", newline="") as f:
                paths.extend(_read_list(f, p.parent, csv_file=p.suffix.lower() == ".csv"))
        elif p.is_file() or (p.is_symlink() and not p.exists()):
            paths.append(p)  # a dangling link becomes a row with its error
        elif p.exists():
            raise InputError(f"{p} is not a regular file (a FIFO, socket or device); give image files or folders")
        elif glob.has_magic(raw):
            matches = sorted(glob.glob(raw, recursive=True))
            if not matches:
                raise InputError(f"no files match {raw!r}")
            for m in map(Path, matches):
                paths.extend(_images_under(m) if m.is_dir() else [m] if m.is_file() else [])
        else:
            raise InputError(f"{p} does not exist")
    if not paths:
        raise InputError(f"no images found in {', '.join(inputs)}")
    special = [q for q in paths if q.exists() and not q.is_file()]
    if special:
        raise InputError(
            f"{special[0]} is not a regular file (a folder, FIFO, socket or device)"
            + (f", nor {len(special) - 1} more" if len(special) > 1 else "")
            + "; list image files only"
        )
    return paths


def _images_under(folder: Path) -> list[Path]:
    """Regular image files under ``folder``: a FIFO named x.jpg would block the reader for ever."""
    return sorted(
        q
        for q in folder.rglob("*")
        if q.suffix.lower() in IMAGE_EXTENSIONS and not q.name.startswith(".") and q.is_file()
    )


def _read_list(f: IO[str], base: Path, *, csv_file: bool) -> list[Path]:
    if not csv_file:
        lines = (line.strip() for line in f)
        return [base / line for line in lines if line and not line.startswith("#")]
    rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    col, body = (header.index("path"), rows[1:]) if "path" in header else (0, rows)
    return [base / r[col].strip() for r in body if len(r) > col and r[col].strip()]


# --------------------------------------------------------------------------- outputs


def output_format(cfg: PredictConfig) -> str:
    fmt = cfg.format or ("jsonl" if Path(cfg.out).suffix.lower() in (".jsonl", ".ndjson") else "csv")
    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {fmt!r}; choose one of: {', '.join(OUTPUT_FORMATS)}")
    return fmt


class _RowWriter:
    """CSV (path, label, best_guess, probability, label_2, probability_2, ..., error) or JSON
    Lines. ``label`` is the answer (``unknown`` below the threshold), ``best_guess`` the top
    class whatever the threshold, ``probability`` its probability. CSV text cells are guarded
    against formula injection unless ``raw`` (:mod:`pipeline.core.csvcells`)."""

    def __init__(self, f: IO[str], fmt: str, k: int, raw: bool = False) -> None:
        self.f, self.fmt, self.k, self.raw = f, fmt, k, raw
        if fmt == "csv":
            self.csv = csv.writer(f)
            header = ["path", "label", "best_guess", "probability"]
            for r in range(2, k + 1):
                header += [f"label_{r}", f"probability_{r}"]
            self.csv.writerow([*header, "error"])

    def write(self, path: Path, row: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            body = {
                "path": str(path),
                "label": row["label"],
                "best_guess": row["top_k"][0][0] if row["top_k"] else None,
                "probability": row["probability"],
                "top_k": [{"label": n, "probability": p} for n, p in row["top_k"]],
                "error": row["error"] or None,
            }
            self.f.write(json.dumps(body, ensure_ascii=False) + "\n")
            return
        prob, cell = row["probability"], lambda text: safe_cell(text, self.raw)
        best = row["top_k"][0][0] if row["top_k"] else ""
        line: list[Any] = [cell(str(path)), cell(row["label"] or ""), cell(best), "" if prob is None else f"{prob:.6f}"]
        for r in range(1, self.k):
            name, p = row["top_k"][r] if r < len(row["top_k"]) else ("", None)
            line += [cell(name), "" if p is None else f"{p:.6f}"]
        self.csv.writerow([*line, cell(row["error"])])


class _EmbeddingWriter:
    """Features, one float32 row per input in input order (NaN where a file failed), written
    batch by batch to ``.npy`` (memory-mapped) or ``.h5`` (``/embeddings``, ``/paths``,
    ``/error``), so a million photos never sit in memory at once."""

    def __init__(self, path: Path, paths: list[Path], dim: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.h5 = path, None
        shape = (len(paths), dim)
        if path.suffix.lower() == ".npy":
            self.arr: Any = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)
            self.arr[:] = np.nan
        elif path.suffix.lower() in (".h5", ".hdf5"):
            import h5py

            self.h5 = h5py.File(path, "w")
            self.arr = self.h5.create_dataset(
                "embeddings", shape=shape, dtype="f4", fillvalue=np.nan, chunks=(min(len(paths), 1024), dim)
            )
            self.h5.create_dataset("paths", data=[str(p) for p in paths], dtype=h5py.string_dtype("utf-8"))
            self.errors = self.h5.create_dataset("error", shape=(len(paths),), dtype=h5py.string_dtype("utf-8"))
        else:
            raise InputError(f"--embeddings must end in .npy or .h5, not {path.name!r}")

    def write(self, r: BatchResult) -> None:
        rows = r.index[r.ok]
        if len(rows):
            # Batches arrive in order, so each batch's good rows form a sorted selection.
            self.arr[rows] = r.features
        if self.h5 is not None:
            for j in np.flatnonzero(~r.ok):
                self.errors[int(r.index[j])] = r.errors[j]

    def close(self) -> None:
        if self.h5 is not None:
            self.h5.close()
        else:
            self.arr.flush()


@dataclass
class PredictSummary:
    out: str
    n: int
    failed: int
    unknown: int
    embeddings: str | None

    def line(self) -> str:
        s = f"{self.out}: {self.n} predictions"
        if self.failed:
            s += f", {self.failed} file{'s' if self.failed != 1 else ''} could not be read"
        if self.unknown:
            s += f", {self.unknown} below the unknown threshold"
        if self.embeddings:
            s += f"; embeddings in {self.embeddings}"
        return s


def predict(cfg: PredictConfig, stdin: IO[str] | None = None) -> tuple[Path, PredictSummary]:
    """Classify ``cfg.inputs``, streaming rows to ``cfg.out`` (``-`` = stdout) as batches finish."""
    fmt = output_format(cfg)
    if cfg.unknown_threshold is not None and not 0.0 <= cfg.unknown_threshold <= 1.0:
        raise InputError(f"--unknown-threshold must be a probability between 0 and 1, not {cfg.unknown_threshold}")
    predictor = Predictor.load(cfg.model, cfg.device, cfg.precision, cfg.engine)
    paths = expand_inputs(cfg.inputs, stdin)
    k = max(1, min(cfg.top_k, len(predictor.class_names)))
    threshold = predictor.unknown_threshold if cfg.unknown_threshold is None else cfg.unknown_threshold
    emb = _EmbeddingWriter(Path(cfg.embeddings), paths, predictor.feature_dim) if cfg.embeddings else None
    to_stdout = cfg.out == "-"
    out = Path(cfg.out)
    if not to_stdout:
        out.parent.mkdir(parents=True, exist_ok=True)
    failed = unknown = 0
    with (
        contextlib.nullcontext(sys.stdout) if to_stdout else open(out, "w", newline="", encoding="utf-8") as f,
        tqdm(total=len(paths), desc="predict", unit="img", disable=not cfg.progress) as bar,
    ):
        writer = _RowWriter(f, fmt, k, raw=cfg.raw_csv)
        try:
            for r in predictor.iter_batches(paths, batch_size=cfg.batch_size, workers=cfg.workers):
                probs = iter(r.probabilities)
                for j, i in enumerate(r.index):
                    row = predictor._row(next(probs) if r.ok[j] else np.empty(0), r.errors[j], k, threshold)
                    failed += bool(row["error"])
                    unknown += row["label"] == UNKNOWN
                    writer.write(paths[int(i)], row)
                if emb is not None:
                    emb.write(r)
                bar.update(len(r.index))
        finally:
            if emb is not None:
                emb.close()
    if not to_stdout:
        save_resolved(cfg, out.with_name(out.name + ".config.json"), output_format=fmt, precision=predictor.precision)
    return out, PredictSummary(cfg.out, len(paths), failed, unknown, cfg.embeddings)


__all__ = ["BatchResult", "PredictSummary", "Predictor", "expand_inputs", "predict"]
