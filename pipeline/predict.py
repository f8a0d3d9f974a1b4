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
import io
import json
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
from .config import PredictConfig, save_resolved
from .core import runtime
from .core.atomic import atomic_file
from .core.csvcells import safe_cell
from .data.inputs import expand_inputs
from .data.loader import Batch, Source, embed_batches, make_loader
from .errors import InputError
from .models import engine as engines
from .probe.hierarchy import TreeIndex, path_text

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


class _RowWriter:
    """CSV (path, label, best_guess, probability, label_2, probability_2, ..., error) or JSON
    Lines. ``label`` is the answer (``unknown`` below the threshold), ``best_guess`` the top
    class whatever the threshold, ``probability`` its probability. A model with a category tree
    adds ``node``, ``node_probability`` and ``node_path`` ("makeup > lips"; ``path`` is the photo's)
    - in JSONL one object ``tree``: ``node``, ``probability``, ``path`` [{node, probability}, ...].
    CSV text cells are guarded against formula injection unless ``raw`` (:mod:`pipeline.core.csvcells`)."""

    def __init__(
        self,
        f: IO[str],
        fmt: str,
        k: int,
        raw: bool = False,
        tree: bool = False,
        attributes: list[dict[str, Any]] | None = None,
    ) -> None:
        self.f, self.fmt, self.k, self.raw, self.tree = f, fmt, k, raw, tree
        self.attributes = attributes or []
        if fmt == "csv":
            self.csv = csv.writer(f)
            header = ["path", "label", "best_guess", "probability"]
            for r in range(2, k + 1):
                header += [f"label_{r}", f"probability_{r}"]
            header += ["node", "node_probability", "node_path"] if tree else []
            for a in self.attributes:  # multi-label: the labels at their thresholds, ;-separated
                scores = "probabilities" if a.get("multi_label") else "probability"
                name = a["name"]
                if name in header or name == "error" or f"{name}_{scores}" in header:
                    name = f"attribute_{name}"  # a column called "probability" keeps the fixed header's meaning
                header += [name, f"{name}_{scores}"]
            self.csv.writerow([safe_cell(h, raw) for h in [*header, "error"]])

    def write(self, path: Path, row: dict[str, Any]) -> None:
        if self.fmt == "jsonl":
            body = {
                "path": str(path),
                "label": row["label"],
                "best_guess": row["top_k"][0][0] if row["top_k"] else None,
                "probability": row["probability"],
                "top_k": [{"label": n, "probability": p} for n, p in row["top_k"]],
                **({"tree": _tree_object(row)} if self.tree else {}),
                **({"attributes": row["attributes"]} if self.attributes else {}),
                "error": row["error"] or None,
            }
            text = json.dumps(body, ensure_ascii=False)
            if _has_surrogates(text):  # a file name that is not UTF-8: escape it (valid JSON, reversible)
                text = json.dumps(body, ensure_ascii=True)
            self.f.write(text + "\n")
            return
        prob, cell = row["probability"], lambda text: safe_cell(text, self.raw)
        best = row["top_k"][0][0] if row["top_k"] else ""
        line: list[Any] = [cell(str(path)), cell(row["label"] or ""), cell(best), "" if prob is None else f"{prob:.6f}"]
        for r in range(1, self.k):
            name, p = row["top_k"][r] if r < len(row["top_k"]) else ("", None)
            line += [cell(name), "" if p is None else f"{p:.6f}"]
        if self.tree:
            q = row["node_probability"]
            line += [cell(row["node"] or ""), "" if q is None else f"{q:.6f}", cell(path_text(row["node_path"]))]
        for a in self.attributes:
            ans = row["attributes"][a["name"]]
            if a.get("multi_label"):  # "vegan;refillable" and "vegan=0.912345;refillable=0.100000"
                scores = ";".join(f"{n}={v:.6f}" for n, v in ans["probabilities"].items())
                line += [cell(";".join(ans["labels"])), cell(scores)]
            else:
                q = ans["probability"]
                line += [cell(ans["label"] or ""), "" if q is None else f"{q:.6f}"]
        self.csv.writerow([*line, cell(row["error"])])


def _tree_object(row: dict[str, Any]) -> dict[str, Any]:
    path = [{"node": n, "probability": p} for n, p in row["node_path"]]
    return {"node": row["node"], "probability": row["node_probability"], "path": path}


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _EmbeddingWriter:
    """Features, one float32 row per input in input order (NaN where a file failed), written
    batch by batch to ``.npy`` (memory-mapped) or ``.h5`` (``/embeddings``, ``/paths``,
    ``/error``), so a million photos never sit in memory at once. Written under a temporary
    name and renamed into place by :meth:`close` only after a complete run."""

    def __init__(self, path: Path, paths: list[Path], dim: int) -> None:
        suffix = path.suffix.lower()
        if suffix not in (".npy", ".h5", ".hdf5"):
            raise InputError(f"--embeddings must end in .npy or .h5, not {path.name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.h5 = path, None  # self.h5: an h5py.File for .h5 output
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{suffix}")
        try:
            self._open(suffix, paths, dim)
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise

    def _open(self, suffix: str, paths: list[Path], dim: int) -> None:
        shape = (len(paths), dim)
        if suffix == ".npy":
            self.arr: Any = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=shape)
            self.arr[:] = np.nan
        else:
            import h5py

            self.h5 = f = h5py.File(self.tmp, "w")
            self.arr = f.create_dataset(
                "embeddings", shape=shape, dtype="f4", fillvalue=np.nan, chunks=(min(len(paths), 1024), dim)
            )
            # Names that are not UTF-8 keep their original bytes (as in the CSV output).
            names = [str(p).encode("utf-8", "surrogateescape") for p in paths]
            f.create_dataset("paths", data=names, dtype=h5py.string_dtype("utf-8"))
            self.errors = f.create_dataset("error", shape=(len(paths),), dtype=h5py.string_dtype("utf-8"))

    def write(self, r: BatchResult) -> None:
        rows = r.index[r.ok]
        if len(rows):
            # Batches arrive in order, so each batch's good rows form a sorted selection.
            self.arr[rows] = r.features
        if self.h5 is not None:
            for j in np.flatnonzero(~r.ok):
                self.errors[int(r.index[j])] = r.errors[j]

    def close(self, complete: bool) -> None:
        """Finish the file: renamed into place if the run was ``complete``, else removed."""
        try:
            if self.h5 is not None:
                self.h5.close()
            else:
                self.arr.flush()
                del self.arr
            if complete:
                os.replace(self.tmp, self.path)
        finally:
            self.tmp.unlink(missing_ok=True)


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
    emb = _EmbeddingWriter(Path(cfg.embeddings), paths, predictor.feature_dim) if cfg.embeddings else None
    to_stdout = cfg.out == "-"
    out = Path(cfg.out)
    failed = unknown = 0
    with (
        _output(None if to_stdout else out) as f,
        tqdm(total=len(paths), desc="predict", unit="img", disable=not cfg.progress) as bar,
    ):
        tree = predictor.tree is not None
        writer = _RowWriter(f, fmt, k, raw=cfg.raw_csv, tree=tree, attributes=predictor.attributes)
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
                    emb.write(r)
                bar.update(len(r.index))
            complete = True
        finally:
            if emb is not None:
                emb.close(complete)
    if not to_stdout:
        save_resolved(cfg, out.with_name(out.name + ".config.json"), output_format=fmt, precision=predictor.precision)
    return out, PredictSummary(cfg.out, len(paths), failed, unknown, cfg.embeddings)


__all__ = ["BatchResult", "PredictSummary", "Predictor", "expand_inputs", "predict"]
