"""Stage: exported model + images -> predictions. Python API :class:`Predictor`, CLI ``predict(cfg)``.

>>> p = Predictor.load("artifacts/model")             # doctest: +SKIP
>>> p.predict(["photo.jpg", pil_image])[0]["label"]  # doctest: +SKIP
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from . import runtime
from .config import PredictConfig, save_resolved
from .errors import InputError
from .export import LoadedModel, load_model
from .images import IMAGE_EXTENSIONS
from .loader import Source, embed_batches, make_loader


@dataclass
class Predictor:
    loaded: LoadedModel
    device: torch.device
    precision: str

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "auto") -> Predictor:
        loaded = load_model(path)
        dev = runtime.resolve_device(device)
        # Run in the precision the features were extracted with when this machine supports it,
        # so predictions match the head's view of the training photos.
        precision = loaded.precision if loaded.precision == "fp32" else runtime.resolve_precision("auto", dev)
        loaded.model.to(dev)
        return cls(loaded, dev, precision)

    @property
    def class_names(self) -> list[str]:
        return self.loaded.class_names

    def predict_proba(
        self,
        sources: Sequence[Source],
        *,
        batch_size: int | None = None,
        workers: int | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, list[str]]:
        """Probabilities ``(N, C)`` (NaN rows where a file could not be decoded) and errors."""
        n_classes = len(self.class_names)
        probs = np.full((len(sources), n_classes), np.nan, dtype=np.float32)
        errors = [""] * len(sources)
        loader = make_loader(
            sources, self.loaded.preprocessing, device=self.device, batch_size=batch_size, workers=workers
        )
        head = self.loaded.model.head
        with tqdm(total=len(sources), desc="predict", unit="img", disable=not progress) as bar:
            for batch, feats in embed_batches(
                self.loaded.model.net, loader, device=self.device, precision=self.precision
            ):
                idx = batch.index.numpy()
                ok = batch.ok.numpy()
                if ok.any():
                    with torch.inference_mode():
                        logits = head(torch.from_numpy(feats).to(self.device))
                    probs[idx[ok]] = logits.softmax(1).cpu().numpy()
                for j in np.flatnonzero(~ok):
                    errors[int(idx[j])] = batch.errors[j]
                bar.update(len(idx))
        return probs, errors

    def predict(self, sources: Sequence[Source], *, top_k: int = 3, **kw: Any) -> list[dict[str, Any]]:
        """One dict per input: ``label``, ``probability``, ``top_k`` [(label, p), ...], ``error``."""
        probs, errors = self.predict_proba(sources, **kw)
        names = self.class_names
        k = max(1, min(top_k, len(names)))
        out = []
        for p, err in zip(probs, errors, strict=True):
            if err:
                out.append({"label": None, "probability": None, "top_k": [], "error": err})
                continue
            order = np.argsort(-p)[:k]
            top = [(names[i], float(p[i])) for i in order]
            out.append({"label": top[0][0], "probability": top[0][1], "top_k": top, "error": ""})
        return out


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files as given; folders searched recursively for images (sorted)."""
    paths: list[Path] = []
    for raw in inputs:
        p = Path(raw)
        if p.is_dir():
            found = sorted(
                q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and not q.name.startswith(".")
            )
            paths.extend(found)
        elif p.exists() or p.is_symlink():
            paths.append(p)
        else:
            raise InputError(f"{p} does not exist")
    if not paths:
        raise InputError(f"no images found in {', '.join(inputs)}")
    return paths


def predict(cfg: PredictConfig) -> tuple[Path, list[dict[str, Any]]]:
    predictor = Predictor.load(cfg.model, cfg.device)
    paths = expand_inputs(cfg.inputs)
    rows = predictor.predict(
        paths, top_k=cfg.top_k, batch_size=cfg.batch_size, workers=cfg.workers, progress=cfg.progress
    )
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    k = max(1, min(cfg.top_k, len(predictor.class_names)))
    header = ["path", "label", "probability"]
    for r in range(2, k + 1):
        header += [f"label_{r}", f"probability_{r}"]
    header.append("error")
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for path, row in zip(paths, rows, strict=True):
            line: list[Any] = [
                str(path),
                row["label"] or "",
                "" if row["probability"] is None else f"{row['probability']:.6f}",
            ]
            for r in range(1, k):
                if r < len(row["top_k"]):
                    name, p = row["top_k"][r]
                    line += [name, f"{p:.6f}"]
                else:
                    line += ["", ""]
            line.append(row["error"])
            w.writerow(line)
    save_resolved(cfg, out.with_name(out.name + ".config.json"))
    return out, rows
