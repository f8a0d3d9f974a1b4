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
import io
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .artifacts.model_dir import LoadedModel, load_model
from .artifacts.predictions import EmbeddingWriter, RowWriter
from .config import PredictConfig, save_resolved
from .core import runtime
from .core.atomic import atomic_file
from .data.inputs import expand_inputs
from .data.loader import Batch, Source, embed_batches, make_loader
from .errors import InputError
from .models import engine as engines
from .probe.hierarchy import TreeIndex

UNKNOWN = "unknown"
OUTPUT_FORMATS = ("csv", "jsonl")


@dataclass
class BatchResult:
    index: np.ndarray  # positions in the source list, every item of the batch
    ok: np.ndarray  # bool mask over index
    probabilities: np.ndarray  # (n_ok, C) float32
    features: np.ndarray  # (n_ok, D) float32
    errors: list[str]  # "" where ok
    attributes: list[np.ndarray] = field(default_factory=list)  # per further attribute: (n_ok, C_a) float32


@dataclass
class Predictor:
    loaded: LoadedModel
    device: torch.device
    precision: str
    session: Any = None  # onnxruntime.InferenceSession for ONNX models
    engine: str = "torch"  # how a native model's backbone runs (models.engine)
    _embed: Any = None  # built on first use: exporting or loading an engine costs seconds, once
    _tree: Any = None  # the manifest's category tree as a TreeIndex (False: the model has none)

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
    def tree(self) -> TreeIndex | None:
        """The category tree the model was exported with (``classes.toml`` [parents]), or None."""
        if self._tree is None:
            tree = self.loaded.tree
            self._tree = TreeIndex.build(tree, self.class_names) if tree else False
        return self._tree or None

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
            attrs = [np.zeros((0, len(a["class_names"])), np.float32) for a in self.attributes]
            if len(feats):
                with torch.inference_mode():
                    x = torch.from_numpy(feats).to(self.device)
                    probs = model.head(x).softmax(1).cpu().numpy()
                    attrs = [a.cpu().numpy() for a in model.attribute_probabilities(x)]
            yield BatchResult(batch.index.numpy(), batch.ok.numpy(), probs, feats, batch.errors, attrs)

    def _onnx_batch(self, batch: Batch) -> BatchResult:
        probs = np.zeros((0, len(self.class_names)), np.float32)
        feats = np.zeros((0, self.feature_dim), np.float32)
        attrs = [np.zeros((0, len(a["class_names"])), np.float32) for a in self.attributes]
        if batch.pixels.numel():
            outputs = ["probabilities", "features", *(a["output"] for a in self.attributes)]
            probs, feats, *attrs = self.session.run(outputs, {"pixels": batch.pixels.numpy()})
        return BatchResult(batch.index.numpy(), batch.ok.numpy(), probs, feats, batch.errors, attrs)

    @property
    def attributes(self) -> list[dict[str, Any]]:
        """The model's further attributes (manifest entries: name, class_names, multi_label,
        thresholds, ...), in the order of :attr:`BatchResult.attributes`."""
        return self.loaded.attributes

    def predict_proba(
        self,
        sources: Sequence[Source],
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, list[str]]:
        """Probabilities ``(N, C)`` (NaN rows where a file could not be decoded) and errors."""
        probs, _, errors = self.predict_all(sources, batch_size=batch_size, workers=workers, progress=progress)
        return probs, errors

    def predict_all(
        self,
        sources: Sequence[Source],
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
        """As :meth:`predict_proba`, plus each further attribute's probabilities ``(N, C_a)``."""
        probs = np.full((len(sources), len(self.class_names)), np.nan, dtype=np.float32)
        attrs = [np.full((len(sources), len(a["class_names"])), np.nan, np.float32) for a in self.attributes]
        errors = [""] * len(sources)
        with tqdm(total=len(sources), desc="predict", unit="img", disable=not progress) as bar:
            for r in self.iter_batches(sources, batch_size=batch_size, workers=workers):
                probs[r.index[r.ok]] = r.probabilities
                for full, part in zip(attrs, r.attributes, strict=True):
                    full[r.index[r.ok]] = part
                for j in np.flatnonzero(~r.ok):
                    errors[int(r.index[j])] = r.errors[j]
                bar.update(len(r.index))
        return probs, attrs, errors

    @property
    def unknown_threshold(self) -> float | None:
        """The threshold chosen at fit-head time, if any (``fit-head --unknown-threshold``)."""
        t = self.loaded.manifest["head"].get("unknown_threshold")
        return float(t) if isinstance(t, int | float) else None

    def predict(
        self,
        sources: Sequence[Source],
        *,
        top_k: int = 3,
        unknown_threshold: float | None = None,
        min_confidence: float = 0.5,
        **kw: Any,
    ) -> list[dict[str, Any]]:
        """One dict per input: ``label``, ``probability``, ``top_k`` [(label, p), ...], ``error``.

        A photo whose best probability is below ``unknown_threshold`` (default: the model's own,
        if fit-head set one; 0 turns it off) gets the label ``"unknown"``; ``top_k`` still lists
        the classes. A model with a category tree adds ``node`` (the deepest node whose
        probability - the sum of its leaves' - is at least ``min_confidence``; None when not even
        a top-level node is), ``node_probability`` and ``node_path`` [(node, p), ...], top level first.
        A model with further attributes adds ``attributes``: per name, ``{"label", "probability"}``
        or, multi-label, ``{"labels": [names at or above their thresholds], "probabilities": {name: p}}``."""
        threshold = self.unknown_threshold if unknown_threshold is None else unknown_threshold
        probs, attrs, errors = self.predict_all(sources, **kw)
        return [
            self._row(p, e, top_k, threshold, min_confidence, [a[i] for a in attrs])
            for i, (p, e) in enumerate(zip(probs, errors, strict=True))
        ]

    def _row(
        self,
        p: np.ndarray,
        err: str,
        top_k: int,
        threshold: float | None,
        min_confidence: float = 0.5,
        attrs: list[np.ndarray] | None = None,
    ) -> dict[str, Any]:
        tree = self.tree
        extra: dict[str, Any] = {"attributes": self._attribute_answers(attrs, bool(err))} if self.attributes else {}
        if err:
            nodes: dict[str, Any] = {"node": None, "node_probability": None, "node_path": []} if tree else {}
            return {"label": None, "probability": None, "top_k": [], **nodes, **extra, "error": err}
        names = self.class_names
        order = np.argsort(-p, kind="stable")[: max(1, min(top_k, len(names)))]
        top = [(names[i], float(p[i])) for i in order]
        label = UNKNOWN if threshold is not None and top[0][1] < threshold else top[0][0]
        nodes = tree.describe(p, min_confidence) if tree else {}
        return {"label": label, "probability": top[0][1], "top_k": top, **nodes, **extra, "error": ""}

    def _attribute_answers(self, attrs: list[np.ndarray] | None, failed: bool) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, a in enumerate(self.attributes):
            names = a["class_names"]
            if a.get("multi_label"):
                if failed or attrs is None:
                    out[a["name"]] = {"labels": [], "probabilities": {}}
                    continue
                q = attrs[k]
                on = [n for n, v, t in zip(names, q, a["thresholds"], strict=True) if v >= t]
                out[a["name"]] = {"labels": on, "probabilities": {n: float(v) for n, v in zip(names, q, strict=True)}}
            elif failed or attrs is None:
                out[a["name"]] = {"label": None, "probability": None}
            else:
                i = int(np.argmax(attrs[k]))
                out[a["name"]] = {"label": names[i], "probability": float(attrs[k][i])}
        return out


# --------------------------------------------------------------------------- outputs


def output_format(cfg: PredictConfig) -> str:
    fmt = cfg.format or ("jsonl" if Path(cfg.out).suffix.lower() in (".jsonl", ".ndjson") else "csv")
    if fmt not in OUTPUT_FORMATS:
        raise InputError(f"unknown output format {fmt!r}; choose one of: {', '.join(OUTPUT_FORMATS)}")
    return fmt


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


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[IO[str]]:
    """Where rows go: stdout (None), or a temporary file renamed over ``path`` once every row is
    written - a full disk or a kill leaves the previous file, never a truncated one. File names
    that are not valid UTF-8 (surrogate-escaped by Python) are written as their original bytes
    in CSV (``errors="surrogateescape"`` reads them back) and as ``\\udcXX`` escapes in JSON
    (see docs/formats.md)."""
    if path is None:
        if isinstance(sys.stdout, io.TextIOWrapper):
            sys.stdout.reconfigure(errors="surrogateescape")
        yield sys.stdout
        return
    with atomic_file(path) as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
        try:
            yield text
            text.flush()
        finally:
            text.detach()  # atomic_file owns and closes the file


def predict(cfg: PredictConfig, stdin: IO[str] | None = None) -> tuple[Path, PredictSummary]:
    """Classify ``cfg.inputs``, streaming rows to ``cfg.out`` (``-`` = stdout) as batches finish."""
    fmt = output_format(cfg)
    if cfg.unknown_threshold is not None and not 0.0 <= cfg.unknown_threshold <= 1.0:
        raise InputError(f"--unknown-threshold must be a probability between 0 and 1, not {cfg.unknown_threshold}")
    predictor = Predictor.load(cfg.model, cfg.device, cfg.precision, cfg.engine)
    paths = expand_inputs(cfg.inputs, stdin)
    k = max(1, min(cfg.top_k, len(predictor.class_names)))
    threshold = predictor.unknown_threshold if cfg.unknown_threshold is None else cfg.unknown_threshold
    emb = EmbeddingWriter(Path(cfg.embeddings), paths, predictor.feature_dim) if cfg.embeddings else None
    to_stdout = cfg.out == "-"
    out = Path(cfg.out)
    failed = unknown = 0
    with (
        _output(None if to_stdout else out) as f,
        tqdm(total=len(paths), desc="predict", unit="img", disable=not cfg.progress) as bar,
    ):
        tree = predictor.tree is not None
        writer = RowWriter(f, fmt, k, raw=cfg.raw_csv, tree=tree, attributes=predictor.attributes)
        complete = False
        try:
            for r in predictor.iter_batches(paths, batch_size=cfg.batch_size, workers=cfg.workers):
                probs = iter(r.probabilities)
                attrs = [iter(a) for a in r.attributes]
                for j, i in enumerate(r.index):
                    p = next(probs) if r.ok[j] else np.empty(0)
                    q = [next(a) for a in attrs] if r.ok[j] else None
                    row = predictor._row(p, r.errors[j], k, threshold, cfg.min_confidence, q)
                    failed += bool(row["error"])
                    unknown += row["label"] == UNKNOWN
                    writer.write(paths[int(i)], row)
                if emb is not None:
                    emb.write(r.index, r.ok, r.features, r.errors)
                bar.update(len(r.index))
            complete = True
        finally:
            if emb is not None:
                emb.close(complete)
    if not to_stdout:
        save_resolved(cfg, out.with_name(out.name + ".config.json"), output_format=fmt, precision=predictor.precision)
    return out, PredictSummary(cfg.out, len(paths), failed, unknown, cfg.embeddings)


__all__ = ["BatchResult", "PredictSummary", "Predictor", "expand_inputs", "predict"]
