"""Whole-process extraction: ``headstart extract`` against the seed article's loop, as commands,
start-up included, with a breakdown and the machine's estimated limit.

Both run as fresh subprocesses on the same real photos (JPEG, long side 640 px; ``photos.py``):

* seed: the article's loop (PIL full decode, Resize + CenterCrop, fp32, batch 32, no workers);
* headstart: ``headstart extract`` with its defaults (``--engine auto``: onnxruntime on the CPU),
  and with ``--engine torch`` for comparison.

Breakdown, measured separately in this process on the same photos: start-up (``import`` and
model build, as a command pays them), decode + resize per photo (one core, PIL with draft, as
extract does), the network per photo (batch 16, both engines, all cores). The estimated limit
for the machine is ``1 / (decode per photo / cores + network per photo)``: decode and network
compete for the same cores (the network's figure is measured on all of them), so their CPU
costs add up.

    python bench/extract_whole_process.py [--n 1000] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import make_photos

SEED_SCRIPT = """
import sys, torch
from pathlib import Path
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from pipeline.models.backbones import load_backbone
paths = sorted(Path(sys.argv[1]).rglob("*.jpg"))
loaded = load_backbone("efficientnet_lite0")
net, prep = loaded.net.eval(), loaded.spec.preprocessing
t = transforms.Compose([transforms.Resize(224), transforms.CenterCrop(224), transforms.ToTensor(),
                        transforms.Normalize(prep.mean, prep.std)])
class D(Dataset):
    def __len__(self): return len(paths)
    def __getitem__(self, i): return t(Image.open(paths[i]).convert("RGB")), 0
with torch.no_grad():
    for x, _ in DataLoader(D(), batch_size=32, num_workers=0):
        net.body(x).flatten(1)
"""


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def breakdown(photos: list[Path]) -> dict[str, float]:
    import numpy as np
    import torch

    t0 = time.perf_counter()
    from pipeline.data.images import load_pixels
    from pipeline.models import engine
    from pipeline.models.backbones import load_backbone

    loaded = load_backbone("efficientnet_lite0")
    out = {"start-up (imports + model build, in this process)": time.perf_counter() - t0}
    prep = loaded.spec.preprocessing
    sample = photos[:200]
    t0 = time.perf_counter()
    pixels = np.stack([load_pixels(p, prep) for p in sample])
    out["decode + resize per photo, one core (ms)"] = 1e3 * (time.perf_counter() - t0) / len(sample)
    x = torch.from_numpy(pixels[:16])
    for name in ("torch", "onnxruntime"):
        embed = engine.make_embedder(loaded.net, prep.crop, engine=name, device=torch.device("cpu"), precision="fp32")
        embed(x)  # warm-up (and the one-time graph export)
        t0 = time.perf_counter()
        for _ in range(4):
            embed(x)
        out[f"network per photo, {name} fp32, batch 16 (ms)"] = 1e3 * (time.perf_counter() - t0) / 64
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=2, help="interleaved rounds; the median counts")
    ap.add_argument("--workdir", default="artifacts/bench")
    args = ap.parse_args()
    root = Path(args.workdir)
    folder = root / "photos640" / "all"
    make_photos(folder, args.n, 640)
    for extra in sorted(folder.glob("photo-*.jpg"))[args.n :]:
        extra.unlink()
    photos = sorted(folder.glob("photo-*.jpg"))
    exe = [sys.executable, "-m", "pipeline", "extract", str(folder.parent), "--no-progress", "--rebuild"]
    cmds = {
        "seed loop": [sys.executable, "-c", SEED_SCRIPT, str(folder.parent)],
        "headstart extract (defaults)": [*exe, "--out", str(root / "whole-auto.h5")],
        "headstart extract --engine torch": [*exe, "--out", str(root / "whole-torch.h5"), "--engine", "torch"],
    }
    run(cmds["headstart extract (defaults)"])  # page cache, and the one-time graph export
    times: dict[str, list[float]] = {k: [] for k in cmds}
    for _ in range(args.repeat):
        for name, cmd in cmds.items():
            times[name].append(run(cmd))
    cores = len(os.sched_getaffinity(0))
    print(f"{len(photos)} photos, 640 px JPEG; {cores} cores; load average {os.getloadavg()[0]:.1f}")
    seed = statistics.median(times["seed loop"])
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"  {name:<34} {t:6.1f} s  {len(photos) / t:6.1f} img/s  {seed / t:5.2f}x the seed loop")
    parts = breakdown(photos)
    for k, v in parts.items():
        print(f"  {k:<58} {v:8.2f}")
    decode = parts["decode + resize per photo, one core (ms)"]
    net = parts["network per photo, onnxruntime fp32, batch 16 (ms)"]
    limit = 1e3 / (decode / cores + net)
    best = len(photos) / statistics.median(times["headstart extract (defaults)"])
    print(
        f"estimated limit: {limit:.1f} img/s (decode {decode:.1f} ms/photo over {cores} cores vs network "
        f"{net:.1f} ms/photo on all cores, added); defaults reach {best:.1f} img/s"
        f" whole-process ({100 * best / limit:.0f}% of it)"
    )


if __name__ == "__main__":
    main()
