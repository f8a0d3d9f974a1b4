"""How much do bf16 autocast and JPEG draft decoding change the features and a linear probe?

    python bench/bf16_draft_accuracy.py [--train 500 --test 500] [--backbone efficientnet_lite0]

* bf16 vs fp32: Fashion-MNIST product photos (Zalando, MIT; the Debian package
  ``dataset-fashion-mnist``), first ``--train`` training and ``--test`` test images, as PNG.
* draft vs no draft: the same photos upscaled to 560 px (bicubic) and saved as JPEG, so that
  draft decoding actually engages (it needs a JPEG at least twice the resize target; 28 px
  photos never are). Also the feature cosine on real photos at 1280 px (``photos.py``).

For each pair: the per-photo cosine between the two feature vectors (mean and minimum), and a
linear probe (standardised features, logistic regression, C picked on a 20% validation split
of the training photos) - test accuracy of each, and the share of test photos on which the
two probes predict the same class.
"""

from __future__ import annotations

import argparse
import gzip
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from photos import make_photos

from pipeline.cache.store import Cache
from pipeline.config import ExtractConfig
from pipeline.extract import extract

FMNIST = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]


def _idx(name: str) -> np.ndarray:
    with gzip.open(FMNIST / name, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def write_set(root: Path, n_train: int, n_test: int, fmt: str) -> Path:
    """A CSV manifest over ``root/{train,test}/<i>.<fmt>``; labels are the class names."""
    rows = ["path,label"]
    for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        images, labels = _idx(f"{prefix}-images-idx3-ubyte.gz")[:n], _idx(f"{prefix}-labels-idx1-ubyte.gz")[:n]
        (root / split).mkdir(parents=True, exist_ok=True)
        for i, (img, lab) in enumerate(zip(images, labels, strict=True)):
            path = root / split / f"{i:05d}.{fmt}"
            if not path.exists():
                im = Image.fromarray(img, "L")
                if fmt == "jpg":
                    im.resize((560, 560), Image.Resampling.BICUBIC).save(path, quality=90)
                else:
                    im.save(path)
            rows.append(f"{split}/{path.name},{CLASSES[lab]}")
    manifest = root / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")
    return manifest


def features(images: Path, out: Path, backbone: str, **kw) -> dict[str, tuple[str, int, np.ndarray]]:
    extract(ExtractConfig(images=str(images), out=str(out), backbone=backbone, progress=False, rebuild=True, **kw))
    with Cache(out) as c:
        f = c.features()
        return {h: (p, int(y), f[i]) for i, (h, p, y) in enumerate(zip(c.content_hash, c.paths, c.labels, strict=True))}


def cosines(a: dict, b: dict) -> np.ndarray:
    keys = sorted(a)
    x, y = np.stack([a[k][2] for k in keys]), np.stack([b[k][2] for k in keys])
    return (x * y).sum(1) / np.linalg.norm(x, axis=1) / np.linalg.norm(y, axis=1)


def probe(rows: dict) -> tuple[float, np.ndarray, list[str]]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    keys = sorted(rows, key=lambda k: rows[k][0])
    train = [k for k in keys if rows[k][0].startswith("train/")]
    test = [k for k in keys if rows[k][0].startswith("test/")]
    xtr, ytr = np.stack([rows[k][2] for k in train]), np.array([rows[k][1] for k in train])
    xte, yte = np.stack([rows[k][2] for k in test]), np.array([rows[k][1] for k in test])
    rng = np.random.default_rng(0)
    val = rng.random(len(train)) < 0.2
    best = (-1.0, 1.0)
    for c in (0.001, 0.01, 0.1, 1.0):
        sc = StandardScaler().fit(xtr[~val])
        m = LogisticRegression(C=c, max_iter=3000).fit(sc.transform(xtr[~val]), ytr[~val])
        best = max(best, (float((m.predict(sc.transform(xtr[val])) == ytr[val]).mean()), c))
    sc = StandardScaler().fit(xtr)
    m = LogisticRegression(C=best[1], max_iter=3000).fit(sc.transform(xtr), ytr)
    pred = m.predict(sc.transform(xte))
    return float((pred == yte).mean()), pred, test


def compare(name: str, a: dict, b: dict, labels: tuple[str, str]) -> None:
    cos = cosines(a, b)
    print(f"{name}: feature cosine mean {cos.mean():.4f}, min {cos.min():.4f} over {len(cos)} photos")
    if any(v[0].startswith("test/") for v in a.values()):
        acc_a, pa, ka = probe(a)
        acc_b, pb, kb = probe(b)
        assert ka == kb
        print(
            f"{name}: linear-probe test accuracy {labels[0]} {acc_a:.4f}, {labels[1]} {acc_b:.4f} "
            f"(difference {100 * (acc_b - acc_a):+.2f} points); same prediction on {(pa == pb).mean():.1%}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", type=int, default=500)
    ap.add_argument("--test", type=int, default=500)
    ap.add_argument("--real", type=int, default=48, help="real photos at 1280 px for the draft cosine")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--workdir", default="artifacts/bench")
    args = ap.parse_args()
    root = Path(args.workdir) / "accuracy"
    png = write_set(root / "fmnist-png", args.train, args.test, "png")
    jpg = write_set(root / "fmnist-jpg560", args.train, args.test, "jpg")
    print(f"Fashion-MNIST: {args.train} train + {args.test} test photos; backbone {args.backbone}")

    fp32 = features(png, root / "png-fp32.h5", args.backbone, precision="fp32")
    bf16 = features(png, root / "png-bf16.h5", args.backbone, precision="bf16")
    compare("bf16 vs fp32 (28 px PNG)", fp32, bf16, ("fp32", "bf16"))

    no_draft = features(jpg, root / "jpg-nodraft.h5", args.backbone, precision="fp32", draft=False)
    draft = features(jpg, root / "jpg-draft.h5", args.backbone, precision="fp32", draft=True)
    compare("draft vs no draft (560 px JPEG, fp32)", no_draft, draft, ("no-draft", "draft"))

    real = root / "real1280"
    make_photos(real / "all", args.real, size=1280)
    a = features(real, root / "real-nodraft.h5", args.backbone, precision="fp32", draft=False)
    b = features(real, root / "real-draft.h5", args.backbone, precision="fp32", draft=True)
    compare("draft vs no draft (real photos, 1280 px JPEG, fp32)", a, b, ("no-draft", "draft"))


if __name__ == "__main__":
    main()
