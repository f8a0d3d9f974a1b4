"""Single-image CPU latency and batch throughput of the native (PyTorch) and ONNX artifacts.

    python bench/predict_latency.py                      # EfficientNet-Lite0, 10 classes
    python bench/predict_latency.py --backbone tiny --runs 50 --threads 2

Exports one model in both formats from the real backbone with a random linear head (speed does
not depend on the head's values; the parity check runs as in any export), loads each back the
way ``headstart predict`` does, and times the network on pre-decoded uint8 pixels, so the
numbers compare runtimes, not decoders. Decode + resize per image (Pillow) is timed separately.

Native runs as ``Predictor`` would on this machine: fp32 (+ channels_last), and bf16 autocast
where the CPU has AMX/avx512_bf16. ONNX runs in onnxruntime's CPU provider, fp32.

Measured 2026-11-29 on the 2-core development CPU (AVX-512 + AMX) while three other jobs ran
(load average 4-5: expect +-30 %), torch 2.14.1, onnxruntime 1.32.0, Lite0 224 px:

    --threads 1              1 image median ms   batch 32 img/s
    native fp32                     96.2              10.6
    native bf16 (autocast)          76.4              15.2
    onnx fp32                       14.1              56.0
    -> ONNX: 6.8x lower latency than native fp32 (5.4x vs bf16), 5.3x (3.7x) the throughput

    --threads 2 (both cores, oversubscribed by the other jobs: PyTorch's spinning OpenMP
    threads suffer most): native fp32 316 ms / 7.9 img/s, bf16 858 ms / 6.4, onnx 13 ms / 56.

Why ONNX wins on CPU: onnxruntime folds BatchNorm into the convolutions and fuses the static
"SAME" padding and ReLU6 of EfficientNet-Lite, which PyTorch eager mode runs as separate ops.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.artifacts.model_dir import ModelSource, load_model, write_model
from pipeline.artifacts.onnx import onnx_session
from pipeline.core import runtime
from pipeline.data import SAMPLE_CATALOG
from pipeline.data.images import load_pixels
from pipeline.models.backbones import get_spec, load_backbone
from pipeline.models.heads import Classifier, build_head


def build_models(backbone: str, n_classes: int, out: Path) -> tuple[Path, Path]:
    loaded = load_backbone(backbone)
    net = loaded.net
    net.imagenet_head = None
    g = torch.Generator().manual_seed(0)
    head = build_head(
        "linear",
        {"weight": torch.randn(n_classes, net.feature_dim, generator=g) * 0.05, "bias": torch.zeros(n_classes)},
    )
    src = ModelSource(
        classifier=Classifier(net, head).eval(),
        fingerprint=loaded.fingerprint("fp32"),
        class_names=[f"class_{i}" for i in range(n_classes)],
        head={"kind": "linear"},
        provenance={"source": "bench/predict_latency.py (random head)"},
    )
    return write_model(src, out / "native"), write_model(src, out / "onnx", fmt="onnx")


def time_it(fn: Callable[[], object], runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def native_runner(model_dir: Path, precision: str) -> Callable[[np.ndarray], np.ndarray]:
    model = load_model(model_dir).model
    assert model is not None
    cpu = torch.device("cpu")
    channels_last = runtime.CHANNELS_LAST
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def run(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x)
        if channels_last:
            t = t.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), runtime.autocast(cpu, precision):
            return model(t).float().softmax(1).numpy()

    return run


def onnx_runner(model_dir: Path, threads: int) -> Callable[[np.ndarray], np.ndarray]:
    session = onnx_session(model_dir / "model.onnx", threads=threads)
    return lambda x: session.run(["probabilities"], {"pixels": x})[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--runs", type=int, default=30, help="timed single-image runs")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batch-runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(runtime.os.sched_getaffinity(0)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    prep = get_spec(args.backbone).preprocessing
    photos = sorted((SAMPLE_CATALOG / "test").rglob("*.png"))[: args.batch]
    decode = time_it(lambda: load_pixels(photos[0], prep), args.runs)
    pixels = np.stack([load_pixels(p, prep) for p in photos])
    one = pixels[:1]

    with tempfile.TemporaryDirectory() as tmp:
        native_dir, onnx_dir = build_models(args.backbone, 10, Path(tmp))
        runners = {"native fp32": native_runner(native_dir, "fp32")}
        if runtime.cpu_has_fast_bf16():
            runners["native bf16"] = native_runner(native_dir, "bf16")
        runners["onnx fp32"] = onnx_runner(onnx_dir, args.threads)

        print(f"{args.backbone}, {prep.crop}px, {args.threads} threads, torch {torch.__version__}")
        print(f"decode + resize + crop (Pillow), one 28px PNG: {statistics.median(decode) * 1e3:.2f} ms")
        print(f"{'runtime':<14} {'1 image median ms':>18} {'p90 ms':>8} {f'batch {args.batch} img/s':>16}")
        results = {}
        for name, run in runners.items():
            lat = sorted(time_it(lambda run=run: run(one), args.runs))
            batch = time_it(lambda run=run: run(pixels), args.batch_runs, warmup=1)
            med, p90 = statistics.median(lat), lat[int(0.9 * (len(lat) - 1))]
            thr = len(pixels) / statistics.median(batch)
            results[name] = (med, thr)
            print(f"{name:<14} {med * 1e3:>18.1f} {p90 * 1e3:>8.1f} {thr:>16.1f}")
        base_lat, base_thr = results["onnx fp32"]
        for name, (med, thr) in results.items():
            if name != "onnx fp32":
                print(f"onnx vs {name}: latency x{med / base_lat:.2f} faster, throughput x{base_thr / thr:.2f}")


if __name__ == "__main__":
    main()
