"""``headstart demo``: the whole chain on the bundled sample catalog, as a user would run it.

extract (train/) -> fit-head -> export -> predict (test/) -> held-out accuracy, next to the
accuracy of logistic regression on the raw pixels of the same split (the honest baseline: a
transfer-learning tool must beat it).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ExportConfig, ExtractConfig, FitHeadConfig, PredictConfig
from .data import SAMPLE_CATALOG
from .data.catalog import discover
from .data.images import open_rgb
from .errors import InputError
from .export import export
from .extract import extract
from .fit_head import fit_head
from .predict import predict
from .probe.estimators import LogisticHead
from .probe.selection import sweep_c


@dataclass
class DemoResult:
    out: Path
    predictions: Path
    accuracy: float
    pixel_baseline: float
    n_test: int
    n_classes: int

    def line(self) -> str:
        return (
            f"held-out accuracy {self.accuracy:.3f} on {self.n_test} test photos ({self.n_classes} classes; "
            f"chance {1 / self.n_classes:.3f}, logistic regression on raw pixels {self.pixel_baseline:.3f}); "
            f"predictions written to {self.predictions}"
        )


def pixel_baseline(train_dir: Path, test_dir: Path, side: int = 28) -> float:
    """Swept logistic regression on raw greyscale pixels, same split, same protocol."""

    def load(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
        cat = discover(folder)
        names = cat.class_names
        X = np.stack(
            [
                np.asarray(open_rgb(i.path).convert("L").resize((side, side)), np.float32).ravel() / 255
                for i in cat.items
            ]
        )
        y = np.array([names.index(i.label) for i in cat.items if i.label is not None])
        return X, y, names

    Xtr, ytr, names = load(train_dir)
    Xte, yte, names_te = load(test_dir)
    if names != names_te:
        raise InputError(f"train and test class folders differ: {names} vs {names_te}")
    rng = np.random.default_rng(0)
    val = rng.random(len(ytr)) < 0.2
    c, _ = sweep_c(Xtr[~val], ytr[~val], Xtr[val], ytr[val])
    head = LogisticHead(C=c).fit(Xtr, ytr)
    return float((head.predict(Xte) == yte).mean())


def run_demo(
    out: str | Path = "artifacts/demo",
    catalog: str | Path = SAMPLE_CATALOG,
    *,
    backbone: str = "efficientnet_lite0",
    image_size: int | None = None,
    progress: bool = True,
) -> DemoResult:
    out, catalog = Path(out), Path(catalog)
    train, test = catalog / "train", catalog / "test"
    cfg = ExtractConfig(
        images=str(train), out=str(out / "features.h5"), backbone=backbone, image_size=image_size, progress=progress
    )
    extract(cfg)
    fit_head(FitHeadConfig(cache=str(out / "features.h5"), out=str(out / "head")))
    export(ExportConfig(head=str(out / "head"), out=str(out / "model")))
    pred_path, _ = predict(
        PredictConfig(
            model=str(out / "model"), inputs=(str(test),), out=str(out / "predictions.csv"), progress=progress
        )
    )
    with open(pred_path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    truth = [Path(r["path"]).parent.name for r in rows]
    correct = sum(r["label"] == t for r, t in zip(rows, truth, strict=True))
    return DemoResult(
        out=out,
        predictions=pred_path,
        accuracy=correct / len(rows),
        pixel_baseline=pixel_baseline(train, test),
        n_test=len(rows),
        n_classes=len(set(truth)),
    )
