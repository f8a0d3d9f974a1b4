"""The input pipeline shared by extract, predict and evaluate: decode in DataLoader workers,
ship uint8 batches through pinned memory, copy to the device without blocking, and run the
network under the chosen precision.

A file that cannot be decoded does not stop the batch: its slot carries the error message and
its pixels are dropped before the forward pass.

With ``expected_hashes`` (extract) each file is read once: the worker hashes the very bytes it
decodes, so a photo rewritten after it was hashed can never store new pixels under the old key.

With ``decode="gpu"`` the workers only read JPEG bytes and parse headers; the main process
decodes the whole batch with nvjpeg and resizes on the GPU (see ``gpu_decode.py``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from ..core import runtime
from ..core.faults import crash_point
from ..core.hashing import hash_bytes
from ..errors import InputError, WorkerError
from .gpu_decode import RawJpeg, decode_batch, probe_jpeg, require_cuda
from .images import DEFAULT_MAX_PIXELS, DecodeError, FileReadError, load_pixels, read_image_bytes
from .preprocessing import Preprocessing

Source = str | os.PathLike[str] | Image.Image
Decoded = np.ndarray | RawJpeg | None  # CPU pixels, JPEG bytes for the GPU, or failure
# (position, pixels, error or "", retry): retry = the failure says nothing about the content.
Item = tuple[int, Decoded, str, bool]
DECODERS = ("cpu", "gpu")
CHANGED = "changed while extract was reading it; run extract again"


class PixelDataset(Dataset[Item]):
    def __init__(
        self,
        sources: Sequence[Source],
        prep: Preprocessing,
        max_pixels: int | None = None,
        decode: str = "cpu",
        expected_hashes: Sequence[str] | None = None,
    ) -> None:
        if expected_hashes is not None and len(expected_hashes) != len(sources):
            raise ValueError(f"{len(expected_hashes)} expected hashes for {len(sources)} sources")
        self.sources = sources
        self.prep = prep
        self.max_pixels = max_pixels or DEFAULT_MAX_PIXELS
        self.decode = decode
        self.expected_hashes = expected_hashes

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int) -> Item:
        crash_point("decode")  # the crash tests kill a worker here
        src = self.sources[i]
        what: Source | bytes = src  # what is decoded: the source, or the bytes read from it
        if self.expected_hashes is not None and not isinstance(src, Image.Image):
            # Read once, hash that buffer, decode that buffer. Until the hash matches, a failure
            # is about the file as it is now (swapped, removed, rewritten), not the content the
            # caller keyed by that hash: retry, never remember.
            try:
                data = read_image_bytes(src, max_pixels=self.max_pixels)
            except DecodeError as e:
                return i, None, str(e), True
            except Exception as e:
                return i, None, f"cannot read file: {type(e).__name__}: {e}", True
            if hash_bytes(data) != self.expected_hashes[i]:
                return i, None, CHANGED, True
            what = data
        try:
            if self.decode == "gpu" and not isinstance(what, Image.Image):
                raw = probe_jpeg(what, self.max_pixels, self.prep)
                if raw is not None:
                    return i, raw, "", False
            return i, load_pixels(what, self.prep, max_pixels=self.max_pixels), "", False
        except FileReadError as e:
            return i, None, str(e), True
        except DecodeError as e:
            return i, None, str(e), False
        except Exception as e:  # not a recorded reason: an environment fault (memory) or a bug
            return i, None, f"cannot decode: {type(e).__name__}: {e}", True


@dataclass
class Batch:
    index: torch.Tensor  # positions in the source list, for every item of the batch
    pixels: torch.Tensor  # uint8 (n_ok, 3, H, W), only the decodable items
    ok: torch.Tensor  # bool mask over ``index``
    errors: list[str]  # "" where ok
    # True where the failure is not a property of the content (the file changed, vanished or
    # became a FIFO while it was read; an unexpected exception): do not remember it as a skip.
    retry: list[bool]
    # --decode gpu: items whose JPEG bytes still need decoding (position in the batch, bytes);
    # their slots in ``pixels`` are filled on the device by :func:`embed_batches`.
    raw: list[tuple[int, RawJpeg]] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (``pin_memory=True``): page-locked pixels
        let the host-to-GPU copy run asynchronously (``non_blocking=True``)."""
        self.pixels = self.pixels.pin_memory()
        return self


def _collate(items: list[Item]) -> Batch:
    index = torch.tensor([it[0] for it in items], dtype=torch.int64)
    ok = torch.tensor([it[1] is not None for it in items], dtype=torch.bool)
    good = [torch.from_numpy(it[1]) for it in items if isinstance(it[1], np.ndarray)]
    raw = [(j, it[1]) for j, it in enumerate(items) if isinstance(it[1], RawJpeg)]
    pixels = torch.stack(good) if good else torch.empty(0, dtype=torch.uint8)
    return Batch(index, pixels, ok, [it[2] for it in items], [it[3] for it in items], raw)


def _gpu_pixels(batch: Batch, prep: Preprocessing, device: torch.device, max_pixels: int) -> torch.Tensor:
    """Merge CPU-decoded pixels and nvjpeg-decoded JPEGs, in batch order, on ``device``.
    A JPEG that neither nvjpeg nor PIL can use turns its slot into an error (``batch.ok``)."""
    decoded = decode_batch([r for _, r in batch.raw], prep, device, max_pixels)
    by_pos = {j: d for (j, _), d in zip(batch.raw, decoded, strict=True)}
    cpu = iter(batch.pixels.to(device, non_blocking=True)) if batch.pixels.numel() else iter(())
    ok = batch.ok.tolist()
    out: list[torch.Tensor] = []
    for j, good in enumerate(ok):
        if not good:
            continue
        d = by_pos[j] if j in by_pos else next(cpu)
        if isinstance(d, str):
            ok[j] = False
            batch.errors[j] = d
        else:
            out.append(d)
    batch.ok = torch.tensor(ok, dtype=torch.bool)
    return torch.stack(out) if out else torch.empty(0, dtype=torch.uint8, device=device)


def make_loader(
    sources: Sequence[Source],
    prep: Preprocessing,
    *,
    device: torch.device,
    batch_size: int | None = None,
    workers: int | None = None,
    max_pixels: int | None = None,
    decode: str = "cpu",
    expected_hashes: Sequence[str] | None = None,
) -> DataLoader[Batch]:
    """Batches of ``sources``. ``expected_hashes`` (one content hash per source, as
    ``core.hashing.hash_file`` gives): read each file once and decode it only if its bytes still
    have that hash; else the slot fails with :data:`CHANGED` and ``Batch.retry`` True."""
    if decode not in DECODERS:
        raise InputError(f"unknown --decode {decode!r}; choose cpu or gpu")
    if decode == "gpu":
        require_cuda(device)
    batch_size = batch_size or runtime.auto_batch_size(device)
    workers = runtime.auto_workers(device) if workers is None else workers
    # PIL images in memory cannot be sent to worker processes cheaply; decode those inline.
    if workers and any(isinstance(s, Image.Image) for s in sources):
        workers = 0
    workers = min(workers, max(0, (len(sources) + batch_size - 1) // batch_size))
    runtime.prepare_worker_sharing(workers)
    # collate_fn turns the dataset's items into a Batch, which DataLoader's typing cannot express.
    return DataLoader(
        PixelDataset(sources, prep, max_pixels, decode, expected_hashes),  # type: ignore[arg-type]
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
    embed: Callable[[torch.Tensor], np.ndarray],
    loader: DataLoader[Batch],
    *,
    device: torch.device,
) -> Iterator[tuple[Batch, np.ndarray]]:
    """Yield each batch with float32 features ``(n_ok, D)`` for its decodable items.

    ``embed`` maps uint8 pixels on ``device`` to features: a ``models.engine`` embedder (the
    engine, precision and memory format are chosen there; data/ stays below models/)."""
    dataset = loader.dataset
    for batch in _batches(loader):
        if batch.raw:
            assert isinstance(dataset, PixelDataset)
            x = _gpu_pixels(batch, dataset.prep, device, dataset.max_pixels)
        else:
            x = batch.pixels.to(device, non_blocking=True)
        if x.numel() == 0:
            yield batch, np.zeros((0, 0), dtype=np.float32)
            continue
        yield batch, embed(x)


def _batches(loader: DataLoader[Batch]) -> Iterator[Batch]:
    """The loader's batches; a worker that died is a :class:`WorkerError`, not the
    DataLoader's RuntimeError traceback."""
    it = iter(loader)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (RuntimeError, ConnectionError, EOFError) as e:
            # A dead worker shows as the DataLoader's RuntimeError, or, when it died mid-send,
            # as a reset pipe. Shut the others down first: torch's SIGCHLD handler would
            # otherwise raise again, asynchronously, while the error is being printed.
            if isinstance(e, RuntimeError) and "DataLoader worker" not in str(e):
                raise
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                with contextlib.suppress(Exception):
                    shutdown()
            raise WorkerError(
                f"a decoding worker process died ({e}); usually the machine ran out of memory (see `dmesg`): "
                "run again with fewer --workers or a smaller --batch-size"
            ) from None
        yield batch
