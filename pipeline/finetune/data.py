"""Fine-tuning data: which photos train and which validate, and the training-time loader.

The validation photos are the ones ``fit-head`` held out, found again by content hash in
``split.json``, so the linear probe and the fine-tuned network are scored on identical photos
even if files were renamed or moved. Everything else that carries a label the head knows trains.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, DistributedSampler, Sampler

from ..core.hashing import hash_file
from ..data.augment import augment, sample_generator
from ..data.catalog import discover
from ..data.images import DEFAULT_MAX_PIXELS, DecodeError, open_rgb
from ..data.labels import LabelMap
from ..data.preprocessing import Preprocessing
from ..errors import ArtifactError, InputError


@dataclass(frozen=True)
class Example:
    path: str  # absolute
    label: int  # index into the head's class names
    content_hash: str


@dataclass
class Split:
    train: list[Example]
    val: list[Example]
    ignored: dict[str, int]  # reason -> count (unlabelled, duplicates, unreadable)


def read_val_hashes(head_dir: Path) -> set[str]:
    path = head_dir / "split.json"
    try:
        return set(json.loads(path.read_text(encoding="utf-8"))["val_content_hash"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ArtifactError(
            f"{path} is missing or unreadable ({type(e).__name__}); re-run `headstart fit-head` on the cache"
        ) from None


def split_examples(images: str, class_names: list[str], val_hashes: set[str], label_map: LabelMap | None) -> Split:
    """Folder categories become the head's classes through the head's label map, if it has one
    (merged, renamed and dropped categories train as they were fitted)."""
    catalog = discover(images)
    index = {name: i for i, name in enumerate(class_names)}
    target = {c: (label_map.target(c) if label_map else c) for c in catalog.class_names}
    unknown = sorted(c for c, t in target.items() if t is not None and t not in index)
    if unknown:
        raise InputError(
            f"{images} has categories the head does not know: {', '.join(unknown[:10])}; "
            "re-run `headstart extract` and `headstart fit-head` on this folder first"
        )
    labelled = [it for it in catalog.items if it.label is not None and target[it.label] is not None]
    ignored = {"unlabelled or dropped": len(catalog.items) - len(labelled), "skipped": len(catalog.skipped)}
    with ThreadPoolExecutor(max_workers=8) as pool:  # hashlib releases the GIL on big buffers
        hashes = list(pool.map(lambda it: _hash_or_none(it.path), labelled))
    by_hash: dict[str, Example | None] = {}
    for it, h in zip(labelled, hashes, strict=True):
        if h is None:
            ignored["unreadable"] = ignored.get("unreadable", 0) + 1
            continue
        ex = Example(str(it.path), index[str(target[str(it.label)])], h)
        if h not in by_hash:
            by_hash[h] = ex
            continue
        # Same bytes twice: train on them once; same bytes under two labels: ambiguous, dropped
        # (the feature cache does the same, so fit-head and finetune see the same photos).
        ignored["duplicates"] = ignored.get("duplicates", 0) + 1
        prev = by_hash[h]
        if prev is not None and prev.label != ex.label:
            by_hash[h] = None
    examples = [e for e in by_hash.values() if e is not None]
    val = [e for e in examples if e.content_hash in val_hashes]
    train = [e for e in examples if e.content_hash not in val_hashes]
    if not val:
        raise InputError(
            f"none of the {len(val_hashes)} validation photos recorded in split.json are in {images}; "
            "pass the folder whose cache the head was fitted on"
        )
    if not train:
        raise InputError(f"{images} has no labelled photos outside the validation split to train on")
    return Split(train, val, {k: v for k, v in ignored.items() if v})


def _hash_or_none(path: Path) -> str | None:
    try:
        return hash_file(path)
    except OSError:
        return None


class TrainSet(Dataset[tuple[torch.Tensor | None, int, str]]):
    """Decoded, augmented training photos. ``epoch`` is set before each epoch's iterator is
    created (workers receive a copy then), and seeds every photo's augmentation."""

    def __init__(self, examples: list[Example], prep: Preprocessing, preset: str, seed: int, max_pixels: int | None):
        self.examples = examples
        self.prep = prep
        self.preset = preset
        self.seed = seed
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.epoch = 0
        # Same DCT-domain downscaling target as at prediction time (images.load_pixels).
        self.draft_to = (self.prep.crop if self.prep.letterbox else self.prep.resize) if self.prep.draft else None

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, str]:
        ex = self.examples[i]
        try:
            img = open_rgb(ex.path, draft_to=self.draft_to, max_pixels=self.max_pixels)
            return augment(img, self.prep, self.preset, sample_generator(self.seed, self.epoch, i)), ex.label, ""
        except DecodeError as e:
            return None, ex.label, f"{ex.path}: {e}"
        except OSError as e:
            return None, ex.label, f"{ex.path}: {type(e).__name__}: {e}"


def collate(items: list[tuple[torch.Tensor | None, int, str]]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Undecodable photos are dropped from the batch (and reported), never fatal."""
    good = [(x, y) for x, y, _ in items if x is not None]
    if good:
        pixels = torch.stack([x for x, _ in good])
        labels = torch.tensor([y for _, y in good], dtype=torch.int64)
    else:
        pixels, labels = torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.int64)
    return pixels, labels, [e for _, _, e in items if e]


class ResumeSampler(Sampler[int]):
    """This rank's share of one epoch (``DistributedSampler``: a seeded permutation, padded to a
    multiple of the world size, every ``world``-th index), minus the first ``skip`` samples,
    which a run killed mid-epoch had already trained on."""

    def __init__(self, n: int, *, seed: int, epoch: int, rank: int, world: int, skip: int = 0) -> None:
        # DistributedSampler only needs len(dataset); passing num_replicas and rank explicitly
        # means no process group is needed in a single-process run.
        inner: DistributedSampler[int] = DistributedSampler(
            range(n),  # type: ignore[arg-type]
            num_replicas=world,
            rank=rank,
            shuffle=True,
            seed=seed,
            drop_last=False,
        )
        inner.set_epoch(epoch)
        self.indices = list(inner)[skip:]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def per_rank_samples(n: int, world: int) -> int:
    return len(DistributedSampler(range(n), num_replicas=world, rank=0, shuffle=False))  # type: ignore[arg-type]
