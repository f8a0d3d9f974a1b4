"""Linear-probe accuracy and extraction speed of the backbones people pick today.

For each backbone: ``extract`` the train and test photos, ``fit-head`` (logistic regression, C
swept on a validation split, temperature-scaled) on the train cache, ``evaluate`` the head on
the test cache. The real pipeline end to end, nothing re-implemented. Two data sets:

* ``catalog``: the bundled sample catalog (Fashion-MNIST photos, 30 train / 50 test per class,
  10 classes, from the official train and test files);
* ``fmnist``: a larger Fashion-MNIST subset (default 100 train / 50 test per class), from the
  Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist).

Default backbones (``--backbones`` replaces them: comma-separated NAME or LABEL=NAME, any name
``--backbone`` takes, e.g. one imported with ``headstart backbones import``):

==============  ============================================  =================================
Lite0           efficientnet_lite0                            weights in a PyPI wheel (offline)
ResNet-50       resnet50                                      torchvision download
DINOv2-S/14     hf/facebook/dinov2-small@224:cls+mean         Hugging Face download
DINOv2-B/14     hf/facebook/dinov2-base@224:cls+mean          Hugging Face download
CLIP B/16       open_clip/ViT-B-16:openai                     Hugging Face download (open_clip)
SigLIP B/16     open_clip/ViT-B-16-SigLIP:webli               Hugging Face download (open_clip)
==============  ============================================  =================================

DINOv2 runs at 224 px with the class token and the mean patch token concatenated (its paper's
linear-probe recipe; 518 px costs ~8.6x). headstart itself never downloads; this script does,
once, for a user who is online: it runs each library's own download in a child process (the
command it prints), then extracts offline from the library's cache. Offline (no connection to
huggingface.co within 3 s, or ``--no-download``) a backbone whose weights are not on disk is
skipped at once with the command to run, and the next one is measured.

images/s is extract's in-run rate (decoding + network) on the test photos, on this machine's
``--device``; the first backbone also pays the decode workers' start-up.

    python bench/backbone_probe.py [--backbones ...] [--datasets catalog,fmnist] [--device auto]

Exit status: 0 when every backbone was measured, 2 when some were skipped (the table still
prints), 1 on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# The user's own offline switches, read before anything imports huggingface_hub (headstart sets
# HF_HUB_OFFLINE for its own process: it must never wait on a network).
USER_OFFLINE = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or bool(os.environ.get("TRANSFORMERS_OFFLINE"))

REPO = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")


@dataclass(frozen=True)
class Backbone:
    label: str
    name: str
    fetch: str | None  # Python code that downloads the weights into the library's cache


DEFAULTS = (
    Backbone("Lite0", "efficientnet_lite0", None),
    Backbone(
        "ResNet-50",
        "resnet50",
        "import torchvision; torchvision.models.get_model('resnet50', weights='IMAGENET1K_V2')",
    ),
    Backbone(
        "DINOv2-S/14",
        "hf/facebook/dinov2-small@224:cls+mean",
        "import huggingface_hub as h; h.snapshot_download('facebook/dinov2-small')",
    ),
    Backbone(
        "DINOv2-B/14",
        "hf/facebook/dinov2-base@224:cls+mean",
        "import huggingface_hub as h; h.snapshot_download('facebook/dinov2-base')",
    ),
    Backbone(
        "CLIP B/16",
        "open_clip/ViT-B-16:openai",
        "import open_clip; open_clip.create_model('ViT-B-16', pretrained='openai')",
    ),
    Backbone(
        "SigLIP B/16",
        "open_clip/ViT-B-16-SigLIP:webli",
        # the tokenizer too (a Hugging Face one for SigLIP, fetched apart): zero-shot heads need it
        "import open_clip; open_clip.create_model('ViT-B-16-SigLIP', pretrained='webli'); "
        "open_clip.get_tokenizer('ViT-B-16-SigLIP')",
    ),
)


def parse_backbones(text: str) -> list[Backbone]:
    known = {b.name: b for b in DEFAULTS}
    out = []
    for item in (s.strip() for s in text.split(",")):
        if item:
            label, eq, name = item.partition("=")
            name = name if eq else label
            fetch = known[name].fetch if name in known else None
            out.append(Backbone(label if eq else name, name, fetch))
    return out


def online(timeout: float = 3.0) -> bool:
    """A TCP connection to the Hugging Face hub within ``timeout`` seconds: a quick, bounded
    answer, where a download on a machine without a route could wait for minutes. Behind a
    proxy a direct connection says nothing: then the downloads try (--download-timeout bounds
    each)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def ready(name: str) -> str | None:
    """None when ``name``'s weights are on this machine, else the reason (headstart's own
    message, which names the command that gets them)."""
    from pipeline.errors import HeadstartError
    from pipeline.models import hub
    from pipeline.models.backbones import get_spec

    hub.forget()  # a download since the last look changes the answer
    try:
        spec = get_spec(name)
    except HeadstartError as e:
        return str(e)
    if spec.available():
        return None
    return f"weights for {spec.name} ({spec.weights_name}) are not on this machine; {spec.how_to_get}"


def download(b: Backbone, timeout: float) -> str | None:
    """Run the library's own download in a child process allowed to use the network; None on
    success, else what went wrong."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    print(f'  downloading {b.label}: {sys.executable} -c "{b.fetch}"', flush=True)
    try:
        r = subprocess.run([sys.executable, "-c", b.fetch or ""], env=env, timeout=timeout, text=True,
                           capture_output=True)  # fmt: skip
    except subprocess.TimeoutExpired:
        return f"download did not finish in {timeout:.0f} s"
    if r.returncode != 0:
        return (r.stderr.strip().splitlines() or ["failed"])[-1]
    return None


def fmnist_split(root: Path, train_per_class: int, test_per_class: int) -> Path:
    """Fashion-MNIST photos as class folders (root/train, root/test), written once."""
    sys.path.insert(0, str(REPO / "scripts"))
    from build_sample_catalog import CLASSES, pick, read_idx
    from PIL import Image

    for split, stem, per_class in (("train", "train", train_per_class), ("test", "t10k", test_per_class)):
        done = root / split / f".done-{per_class}"
        if done.is_file():
            continue
        shutil.rmtree(root / split, ignore_errors=True)
        images = read_idx(FMNIST / f"{stem}-images-idx3-ubyte.gz")
        labels = read_idx(FMNIST / f"{stem}-labels-idx1-ubyte.gz")
        for i in pick(labels, per_class, seed=1):
            d = root / split / CLASSES[int(labels[i])]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], "L").save(d / f"{stem}-{i:05d}.png")
        done.write_text("")
    return root


def probe(name: str, data: Path, out: Path, device: str, workers: int | None) -> dict[str, float | int]:
    """extract train + test, fit-head on train, evaluate on test: the pipeline's own stages."""
    from pipeline.config import EvaluateConfig, ExtractConfig, FitHeadConfig
    from pipeline.evaluate import evaluate
    from pipeline.extract import extract
    from pipeline.fit_head import fit_head

    out.mkdir(parents=True, exist_ok=True)
    common = dict(backbone=name, device=device, workers=workers, progress=False)
    extract(ExtractConfig(images=str(data / "train"), out=str(out / "train.h5"), **common))  # type: ignore[arg-type]
    test = extract(ExtractConfig(images=str(data / "test"), out=str(out / "test.h5"), **common))  # type: ignore[arg-type]
    head = fit_head(FitHeadConfig(cache=str(out / "train.h5"), out=str(out / "head"), device=device))
    ev = evaluate(EvaluateConfig(model=str(out / "head"), data=str(out / "test.h5"), out=str(out / "report"),
                                 device=device, worst=0))  # fmt: skip
    from pipeline.cache.store import Cache

    with Cache(out / "test.h5") as c:
        dim, canonical = c.fingerprint.feature_dim, c.fingerprint.backbone
    return {
        "accuracy": float(ev.metrics["accuracy"]),
        "macro_f1": float(ev.metrics["macro_f1"]),
        "n_test": int(ev.metrics["n"]),
        "images_per_s": test.extracted / test.seconds if test.extracted and test.seconds else float("nan"),
        "feature_dim": int(dim),
        "C": float(head.C) if head.C is not None else float("nan"),
        "canonical": canonical,  # type: ignore[dict-item]
    }


def table(rows: list[dict], datasets: list[str]) -> str:
    head = ["backbone", "name", "dim"] + [f"{d} {w}" for d in datasets for w in ("accuracy", "images/s")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["label"], f"`{r.get('canonical') or r['name']}`", str(r.get("feature_dim", "-"))]
        for d in datasets:
            m = r["results"].get(d)
            cells += [f"{m['accuracy']:.3f}", f"{m['images_per_s']:.0f}"] if m else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbones", help="Comma-separated NAME or LABEL=NAME (default: the six in the docstring).")
    ap.add_argument("--datasets", default="catalog,fmnist", help="catalog, fmnist or both.")
    ap.add_argument("--catalog", type=Path, help="A folder with train/ and test/ class folders (default: bundled).")
    ap.add_argument("--train-per-class", type=int, default=100, help="fmnist train photos per class.")
    ap.add_argument("--test-per-class", type=int, default=50, help="fmnist test photos per class.")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--workers", type=int, default=None, help="Decode processes (extract's default if unset).")
    ap.add_argument("--no-download", action="store_true", help="Measure only what is on disk already.")
    ap.add_argument("--download-timeout", type=float, default=1800.0, help="Seconds for one model's download.")
    ap.add_argument("--out", type=Path, default=Path("artifacts/bench/backbone_probe"))
    args = ap.parse_args(argv)

    from pipeline.data import SAMPLE_CATALOG

    backbones = parse_backbones(args.backbones) if args.backbones else list(DEFAULTS)
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    if not backbones or not datasets or any(d not in ("catalog", "fmnist") for d in datasets):
        ap.error("--backbones needs at least one name; --datasets takes catalog and/or fmnist")
    data: dict[str, Path] = {}
    for d in datasets:
        if d == "catalog":
            data[d] = args.catalog or SAMPLE_CATALOG
        elif not FMNIST.is_dir():
            print(f"fmnist: skipped, {FMNIST} is missing (apt-get install -y dataset-fashion-mnist)")
        else:
            data[d] = fmnist_split(args.out / "fmnist-photos", args.train_per_class, args.test_per_class)
    may_download = not args.no_download and not USER_OFFLINE and online()
    print(f"network: {'online, missing weights are downloaded once' if may_download else 'offline'}", flush=True)

    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    for b in backbones:
        t0 = time.perf_counter()
        why = ready(b.name)
        if why is not None and may_download and b.fetch:
            failed = download(b, args.download_timeout)
            why = ready(b.name) if failed is None else f"{failed}; {why}"
        if why is not None:
            hint = f' (to fetch: {sys.executable} -c "{b.fetch}")' if b.fetch and b.fetch not in why else ""
            print(f"{b.label}: skipped after {time.perf_counter() - t0:.1f} s: {why}{hint}", flush=True)
            skipped.append((b.label, why))
            continue
        row: dict = {"label": b.label, "name": b.name, "results": {}}
        for d, folder in data.items():
            m = probe(b.name, folder, args.out / b.label.replace("/", "_").replace(" ", "_") / d, args.device,
                      args.workers)  # fmt: skip
            row["canonical"], row["feature_dim"] = m.pop("canonical"), m["feature_dim"]
            row["results"][d] = m
            print(f"{b.label} on {d}: accuracy {m['accuracy']:.3f} on {m['n_test']} test photos, "
                  f"{m['images_per_s']:.0f} images/s, C={m['C']:.3g}", flush=True)  # fmt: skip
        rows.append(row)

    print()
    print(table(rows, list(data)))
    if skipped:
        print(f"\nskipped (why and the command to run: above): {', '.join(label for label, _ in skipped)}")
    args.out.mkdir(parents=True, exist_ok=True)
    record = {"rows": rows, "skipped": [{"label": lb, "why": w} for lb, w in skipped], "device": args.device}
    (args.out / "result.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 2 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
