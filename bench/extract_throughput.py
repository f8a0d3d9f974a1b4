"""Extraction throughput: headstart's ``extract`` against the seed article's loop, in one run.

Same photos (real photos, JPEG, long side 640 px; see ``photos.py``), same backbone and weights.

* seed: what /work/shared/reference/seed-blog-post-zh.md does - PIL full decode,
  ``Resize(224)`` + ``CenterCrop(224)`` + ``ToTensor`` + ``Normalize``, fp32, batch 32, no
  DataLoader workers (here under ``torch.no_grad()``, which only helps it).
* headstart: ``extract()`` end to end with its defaults - hashing, decode workers, JPEG draft
  decoding, uint8 batches, bf16 autocast where the CPU has AMX/avx512_bf16, writing the cache.

    python bench/extract_throughput.py [--n 256] [--backbone efficientnet_lite0] [--variants] [--engine E]

In-process rates (start-up excluded for both); ``bench/extract_whole_process.py`` times whole
commands and breaks the time down.

Prints both rates (images/s) and the ratio. Target: >= 3x on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import make_photos

from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.models.backbones import load_backbone


class SeedDataset(Dataset):
    def __init__(self, paths: list[Path], mean, std) -> None:
        from torchvision import transforms

        self.paths = paths
        self.transform = transforms.Compose(
            [
                transforms.Resize(224),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        )

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(Image.open(self.paths[i]).convert("RGB")), 0


def seed_loop(paths: list[Path], backbone: str) -> float:
    """Timed from loading the model, like ours (which also hashes and writes the cache)."""
    t0 = time.perf_counter()
    loaded = load_backbone(backbone)
    net = loaded.net.eval()
    prep = loaded.spec.preprocessing
    loader = DataLoader(SeedDataset(paths, prep.mean, prep.std), batch_size=32, shuffle=False, num_workers=0)
    n = 0
    with torch.no_grad():
        for images, _ in loader:
            feats = net.body(images).flatten(1)  # the network after normalisation, fp32
            n += feats.shape[0]
    return n / (time.perf_counter() - t0)


def timed(fn) -> tuple[float, float]:
    """(fn's result, CPU seconds used meanwhile by this process and its finished children)."""
    before = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result = fn()
    after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before, strict=True))
    return result, cpu


def ours(photos: Path, out: Path, backbone: str, **kw) -> float:
    t0 = time.perf_counter()
    s = extract(ExtractConfig(images=str(photos), out=str(out), backbone=backbone, progress=False, rebuild=True, **kw))
    return s.rows / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=256, help="number of photos")
    ap.add_argument("--size", type=int, default=640, help="long side of the photos, px")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--workdir", default="artifacts/bench")
    ap.add_argument("--repeat", type=int, default=3, help="interleaved pairs of runs; the median counts")
    ap.add_argument("--variants", action="store_true", help="also time ours with --precision fp32 and --no-draft")
    ap.add_argument("--engine", default="auto", choices=["auto", "torch", "onnxruntime"], help="headstart's engine")
    args = ap.parse_args()

    root = Path(args.workdir)
    photos = root / f"photos{args.size}"
    make_photos(photos / "all", args.n, args.size)
    for extra in sorted((photos / "all").glob("photo-*.jpg"))[args.n :]:
        extra.unlink()  # a smaller --n than last time
    paths = sorted((photos / "all").glob("photo-*.jpg"))
    print(
        f"{len(paths)} real photos, JPEG, long side {args.size}px; backbone {args.backbone}; "
        f"{torch.get_num_threads()} torch threads"
    )

    ours(photos, root / "warmup.h5", args.backbone, engine=args.engine)  # page cache, lazy imports, graph export
    # On a shared machine wall-clock rates swing with other jobs, so: interleaved pairs, each
    # pair's ratio, their median; and CPU time per photo (this process and its decode workers),
    # which other jobs disturb far less.
    pairs = []
    for _ in range(args.repeat):
        seed, seed_cpu = timed(lambda: seed_loop(paths, args.backbone))
        fast, fast_cpu = timed(lambda: ours(photos, root / "throughput.h5", args.backbone, engine=args.engine))
        pairs.append((seed, fast, seed_cpu / len(paths), fast_cpu / len(paths)))
        print(
            f"  pair: seed {seed:6.1f} images/s ({1e3 * pairs[-1][2]:.0f} CPU-ms/photo), "
            f"headstart {fast:6.1f} images/s ({1e3 * pairs[-1][3]:.0f} CPU-ms/photo): {fast / seed:.2f}x"
        )
    ratios = sorted(f / s_ for s_, f, _, _ in pairs)
    seed = statistics.median(p[0] for p in pairs)
    fast = statistics.median(p[1] for p in pairs)
    cpu_ratio = statistics.median(p[2] for p in pairs) / statistics.median(p[3] for p in pairs)
    print(f"seed loop (PIL full decode, Resize+CenterCrop, fp32, batch 32, 0 workers): {seed:7.1f} images/s (median)")
    print(f"headstart extract (defaults, end to end incl. hashing and cache write): {fast:7.1f} images/s (median)")
    if args.variants:
        for label, kw in (("--precision fp32", {"precision": "fp32"}), ("--no-draft", {"draft": False})):
            r = ours(photos, root / "variant.h5", args.backbone, **kw)
            print(f"headstart extract {label:<44}: {r:7.1f} images/s")
    load = os.getloadavg()[0]
    print(
        f"ratio: {statistics.median(ratios):.2f}x, median of {len(ratios)} pairs "
        f"({', '.join(f'{r:.2f}' for r in ratios)}); "
        f"CPU time per photo: {cpu_ratio:.2f}x less (target >= 3x on a 2-core CPU); "
        f"load average {load:.1f} on {os.cpu_count()} CPUs"
    )
    shutil.rmtree(root / "variant.h5", ignore_errors=True)


if __name__ == "__main__":
    main()
