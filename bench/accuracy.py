"""What fine-tuning buys, on real product photos: Fashion-MNIST (Zalando catalogue, MIT).

Four classifiers, one split (train photos -> fit-head's train/validation split.json; a disjoint
test set from the official test file), scored on the same held-out test photos:

* raw-pixel logistic regression (C swept on the same validation photos) - the floor;
* linear probe: `fit-head` on the frozen backbone's cached features (C swept);
* LP-FT: `finetune --init lp` (starts from the probe, gradual unfreezing, layer-wise LRs);
* FT from a random head: `finetune --init random`, the same schedule otherwise.

Every number goes through the real stages (extract, fit-head, finetune, export, predict).

    python bench/accuracy.py                         # small subset, a few minutes on 2 CPU cores
    python bench/accuracy.py --train-per-class 6000 --test-per-class 1000 --epochs 10   # GPU

Needs the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from build_sample_catalog import CLASSES, SRC, pick, read_idx

from pipeline.config import ExportConfig, ExtractConfig, FinetuneConfig, FitHeadConfig
from pipeline.core import runtime
from pipeline.core.hashing import hash_file
from pipeline.data.catalog import discover
from pipeline.data.images import open_rgb
from pipeline.export import export
from pipeline.extract import extract
from pipeline.finetune.stage import finetune
from pipeline.fit_head import fit_head
from pipeline.predict import Predictor
from pipeline.probe.estimators import LogisticHead
from pipeline.probe.selection import sweep_c


def write_split(out: Path, stem: str, per_class: int, seed: int) -> Path:
    images = read_idx(SRC / f"{stem}-images-idx3-ubyte.gz")
    labels = read_idx(SRC / f"{stem}-labels-idx1-ubyte.gz")
    root = out / ("train" if stem == "train" else "test")
    shutil.rmtree(root, ignore_errors=True)
    for i in pick(labels, per_class, seed):
        folder = root / CLASSES[int(labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i], "L").save(folder / f"fmnist-{stem}-{i:05d}.png")
    return root


def test_accuracy(model_dir: Path, test_dir: Path, device: str) -> float:
    cat = discover(test_dir)
    p = Predictor.load(model_dir, device=device)
    rows = p.predict([i.path for i in cat.items], top_k=1)
    return float(np.mean([r["label"] == i.label for r, i in zip(rows, cat.items, strict=True)]))


def raw_pixels(train_dir: Path, test_dir: Path, head_dir: Path) -> tuple[float, float]:
    """Logistic regression on the 28x28 grey pixels, C swept on split.json's validation photos."""
    val = set(json.loads((head_dir / "split.json").read_text())["val_content_hash"])

    def load(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cat = discover(folder)
        X = np.stack([np.asarray(open_rgb(i.path).convert("L"), np.float32).ravel() / 255 for i in cat.items])
        y = np.array([CLASSES.index(str(i.label)) for i in cat.items])
        is_val = np.array([hash_file(i.path) in val for i in cat.items])
        return X, y, is_val

    X, y, is_val = load(train_dir)
    Xte, yte, _ = load(test_dir)
    c, _ = sweep_c(X[~is_val], y[~is_val], X[is_val], y[is_val])
    probe = LogisticHead(C=c).fit(X[~is_val], y[~is_val])
    val_acc = float((probe.predict(X[is_val]) == y[is_val]).mean())
    return val_acc, float((LogisticHead(C=c).fit(X, y).predict(Xte) == yte).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-per-class", type=int, default=20)
    ap.add_argument("--test-per-class", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--unfreeze-every", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench-accuracy"))
    args = ap.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_dir = write_split(out, "train", args.train_per_class, args.seed)
    test_dir = write_split(out, "t10k", args.test_per_class, args.seed)

    cache, head = out / "features.h5", out / "head"
    extract(ExtractConfig(images=str(train_dir), out=str(cache), backbone=args.backbone, device=args.device,
                          progress=False, rebuild=True))  # fmt: skip
    fit_head(FitHeadConfig(cache=str(cache), out=str(head)))
    head_meta = json.loads((head / "head.json").read_text())
    rows: list[tuple[str, float, float, str]] = []
    t = time.perf_counter()
    px_val, px_test = raw_pixels(train_dir, test_dir, head)
    rows.append(("raw-pixel logistic regression", px_val, px_test, f"{time.perf_counter() - t:.0f}s"))
    export(ExportConfig(head=str(head), out=str(out / "model-lp")))
    rows.append(
        (
            f"linear probe (C={head_meta['C']:.3g})",
            head_meta["metrics"]["accuracy"],
            test_accuracy(out / "model-lp", test_dir, args.device),
            "",
        )
    )
    rates = []
    for init, name in (("lp", "LP-FT (from the probe)"), ("random", "fine-tune from a random head")):
        ft = out / f"ft-{init}"
        shutil.rmtree(ft, ignore_errors=True)
        t = time.perf_counter()
        s = finetune(
            FinetuneConfig(
                images=str(train_dir),
                head=str(head),
                out=str(ft),
                epochs=args.epochs,
                unfreeze_every=args.unfreeze_every,
                lr=args.lr,
                batch_size=args.batch_size,
                init=init,
                patience=0,
                device=args.device,
                seed=args.seed,
                progress=True,
            )
        )
        secs = time.perf_counter() - t
        rates.append(s.images_per_s)
        export(ExportConfig(head=str(ft), out=str(out / f"model-{init}")))
        acc = test_accuracy(out / f"model-{init}", test_dir, args.device)
        rows.append((f"{name}, best epoch {s.best_epoch}/{s.epochs_run}", s.metrics["accuracy"], acc, f"{secs:.0f}s"))

    dev = runtime.resolve_device(args.device)
    precision = runtime.resolve_precision("auto", dev)
    machine = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{platform.processor() or 'CPU'}"
    n_val = head_meta["n_val"]
    print(
        f"\nFashion-MNIST, {args.train_per_class}/class train ({head_meta['n_train']} train + {n_val} validation), "
        f"{args.test_per_class}/class test ({args.test_per_class * 10} photos); {args.backbone}, "
        f"{args.epochs} epochs, unfreeze every {args.unfreeze_every} epoch, lr {args.lr:g}; "
        f"{dev.type} ({machine}, {torch.get_num_threads()} threads, {precision})\n"
    )
    print(f"| {'method':<48} | val acc | test acc | time |")
    print(f"| {'-' * 48} | ------- | -------- | ---- |")
    for name, v, te, secs in rows:
        print(f"| {name:<48} | {v:7.3f} | {te:8.3f} | {secs:>4} |")
    print(f"\nfine-tuning throughput: {np.mean(rates):.1f} images/s (training, augmentation and decoding included)")
    print(f"total {time.perf_counter() - t0:.0f}s; artifacts in {out}")


if __name__ == "__main__":
    main()
