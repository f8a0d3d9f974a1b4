"""The files ``predict`` writes: the predictions (CSV or JSON Lines, streamed row by row) and the
embeddings (``.npy`` or ``.h5``, batch by batch); their columns: docs/formats.md."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..core.csvcells import safe_cell
from ..errors import InputError
from ..probe.hierarchy import path_text


class RowWriter:
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


class EmbeddingWriter:
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

    def write(self, index: np.ndarray, ok: np.ndarray, features: np.ndarray, errors: list[str]) -> None:
        """One batch: positions ``index`` in the input list, ``ok`` mask, the good rows' features."""
        rows = index[ok]
        if len(rows):
            # Batches arrive in order, so each batch's good rows form a sorted selection.
            self.arr[rows] = features
        if self.h5 is not None:
            for j in np.flatnonzero(~ok):
                self.errors[int(index[j])] = errors[j]

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
