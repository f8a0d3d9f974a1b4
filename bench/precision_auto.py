"""Does ``--precision auto`` pick the faster precision on this CPU? fp32 against bf16, one run.

``auto`` on the CPU picks bf16 where the CPU has AMX or avx512_bf16 (native bf16 matrix
instructions) and fp32 elsewhere. That rule is a guess about speed; this script checks it on the
machine at hand: the same real photos are extracted with ``--precision fp32`` and ``bf16``, in
interleaved rounds (so a change of load hits both), and the in-run rate (images/s inside
``extract``, start-up excluded) of each is printed with the ratio and what ``auto`` chose.

    python bench/precision_auto.py [--n 160] [--repeat 3] [--backbone efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import make_photos

from pipeline.config import ExtractConfig
from pipeline.core import runtime
from pipeline.extract import extract


def cpuinfo(key: str) -> str:
    """The first ``key : value`` line of /proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith(key)), "")
    except OSError:
        return ""


def cpu_flags() -> str:
    flags = cpuinfo("flags").split()
    if not flags:
        return "unknown"
    wanted = [f for f in flags if f.startswith("amx") or f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx2")]
    return " ".join(wanted) or "none of avx2/avx512/amx"


def rate(photos: Path, out: Path, backbone: str, precision: str) -> float:
    s = extract(ExtractConfig(images=str(photos), out=str(out), backbone=backbone, precision=precision,
                              progress=False, rebuild=True))  # fmt: skip
    return s.extracted / s.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=160, help="number of photos (640 px JPEG)")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; the median counts")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--workdir", default="artifacts/bench")
    args = ap.parse_args()

    root = Path(args.workdir)
    photos = root / "photos640"
    make_photos(photos / "all", args.n, 640)
    for extra in sorted((photos / "all").glob("photo-*.jpg"))[args.n :]:
        extra.unlink()
    model = cpuinfo("model name") or platform.processor() or platform.machine()
    auto = runtime.resolve_precision("auto", torch.device("cpu"))
    print(f"CPU {model}; flags: {cpu_flags()}; {torch.get_num_threads()} torch threads; torch {torch.__version__}")
    print(f"{args.n} photos, {args.backbone}; --precision auto resolves to {auto} here")
    rate(photos, root / "precision-warmup.h5", args.backbone, "fp32")  # page cache, lazy imports
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeat):
        for p in ("fp32", "bf16"):
            rates[p].append(rate(photos, root / f"precision-{p}.h5", args.backbone, p))
        print(f"  round: fp32 {rates['fp32'][-1]:6.1f} img/s, bf16 {rates['bf16'][-1]:6.1f} img/s")
    fp32, bf16 = (statistics.median(rates[p]) for p in ("fp32", "bf16"))
    faster = "bf16" if bf16 > fp32 else "fp32"
    verdict = "holds" if faster == auto else "DOES NOT HOLD"
    print(
        f"median in-run rate: fp32 {fp32:.1f}, bf16 {bf16:.1f} img/s; bf16/fp32 {bf16 / fp32:.2f}x; "
        f"faster: {faster}; auto picked {auto}: the rule {verdict} here; load average {os.getloadavg()[0]:.1f}"
    )


if __name__ == "__main__":
    main()
