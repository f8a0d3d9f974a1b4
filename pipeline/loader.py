"""The input pipeline shared by extract, predict and evaluate: decode in DataLoader workers,
ship uint8 batches through pinned memory, copy to the device without blocking, and run the
network under the chosen precision.

A file that cannot be decoded does not stop the batch: its slot carries the error message and
its pixels are dropped before the forward pass.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from . import runtime
from .backbones import FeatureNet, Preprocessing
from .images import DEFAULT_MAX_PIXELS, DecodeError, load_pixels

Source = str | os.PathLike[str] | Image.Image


class PixelDataset(Dataset[tuple[int, np.ndarray | None, str]]):
    def __init__(self, sources: Sequence[Source], prep: Preprocessing, max_pixels: int | None = None) -> None:
        self.sources = sources
        self.prep = prep
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> tuple[int, np.ndarray | None, str]:
        try:
            return i, load_pixels(self.sources[i], self.prep, max_pixels=self.max_pixels), ""
        except DecodeError as e:
            return i, None, str(e)
        except Exception as e:
            return i, None, f"cannot decode: {type(e).__name__}: {e}"


@dataclass
class Batch:
    index: torch.Tensor  # positions in the source list, for every item of the batch
    pixels: torch.Tensor  # uint8 (n_ok, 3, H, W), only the decodable items
    ok: torch.Tensor  # bool mask over ``index``
    errors: list[str]  # "" where ok


def _collate(items: list[tuple[int, np.ndarray | None, str]]) -> Batch:
    index = torch.tensor([i for i, _, _ in items], dtype=torch.int64)
    ok = torch.tensor([p is not None for _, p, _ in items], dtype=torch.bool)
    good = [torch.from_numpy(p) for _, p, _ in items if p is not None]
    pixels = torch.stack(good) if good else torch.empty(0, dtype=torch.uint8)
    return Batch(index, pixels, ok, [e for _, _, e in items])


def make_loader(
    sources: Sequence[Source],
    prep: Preprocessing,
    *,
    device: torch.device,
    batch_size: int | None = None,
    workers: int | None = None,
    max_pixels: int | None = None,
) -> DataLoader[Batch]:
    batch_size = batch_size or runtime.auto_batch_size(device)
    workers = runtime.auto_workers(device) if workers is None else workers
    # PIL images in memory cannot be sent to worker processes cheaply; decode those inline.
    if workers and any(isinstance(s, Image.Image) for s in sources):
        workers = 0
    workers = min(workers, max(0, (len(sources) + batch_size - 1) // batch_size))
    runtime.prepare_worker_sharing(workers)
    return DataLoader(
        PixelDataset(sources, prep, max_pixels),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )


@torch.inference_mode()
def embed_batches(
    net: FeatureNet,
    loader: DataLoader[Batch],
    *,
    device: torch.device,
    precision: str,
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Yield each batch with float32 features ``(n_ok, D)`` for its decodable items."""
    channels_last = runtime.use_channels_last(device, precision)
    net = net.to(device).eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for batch in loader:
        if batch.pixels.numel() == 0:
            yield batch, np.zeros((0, 0), dtype=np.float32)
            continue
        x = batch.pixels.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with runtime.autocast(device, precision):
            feats = net(x)
        yield batch, feats.float().cpu().numpy()
