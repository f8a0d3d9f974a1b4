"""``torchrun`` support for every stage: which rank am I, which files are mine, and the few
collectives the stages need (gather, broadcast, barrier, agree on an error).

A stage run as one process gets ``Dist()`` (rank 0 of 1) and every collective is a no-op, so
the same code serves a laptop and eight GPUs.

Extraction (``from_env``):

Under ``torchrun --nproc_per_node=N -m pipeline extract ...`` every rank discovers the same
files, hashes a 1/N slice of them and gathers the rest, then runs the backbone only on the new
content whose hash falls in its shard (``int(hash[:8], 16) % N == rank``: deterministic, so a
re-run or a grown folder shards the same way). Every rank writes its rows as its own segment
files straight into the cache's folder (``CACHE.h5.segments/``, on a filesystem all nodes
see); rank 0 holds the writer lock, waits for the others and writes only the index, so no
feature bytes pass through it. A rank that dies loses at most its unfinished segment: the
re-run adopts every rank's finished segments.

The control traffic is small Python objects, so it always goes over a gloo process group, also
on GPU machines (NCCL would need them as CUDA tensors).

Fine-tuning (``distributed(device)``): DistributedDataParallel needs NCCL on GPUs (gloo on
CPUs) and one device per process, so that context manager also pins ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..errors import HeadstartError

T = TypeVar("T")

# Ranks may wait a long time at a barrier while another finishes a large share; gloo's default
# 30-minute timeout would kill a healthy job.
TIMEOUT = _dt.timedelta(seconds=float(os.environ.get("HEADSTART_DIST_TIMEOUT_S", str(12 * 3600))))


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # training's device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_device(self, device: torch.device) -> torch.device:
        """``device`` for this rank: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun,
        one GPU per local rank; an indexed device, a CPU or a single process keep theirs."""
        if self.world > 1 and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def owns_index(self, i: int) -> bool:
        return i % self.world == self.rank

    def owns_hash(self, content_hash: str) -> bool:
        return int(content_hash[:8], 16) % self.world == self.rank

    def gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as td

        out: list[Any] = [None] * self.world
        td.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as td

        box: list[Any] = [obj]
        td.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as td

            td.barrier()

    def agree(self, error: HeadstartError | None) -> None:
        """Raise on every rank if any rank failed (instead of the others hanging at the next
        collective until the timeout)."""
        messages = self.gather(str(error) if error is not None else None)
        for rank, msg in enumerate(messages):
            if msg is not None:
                if rank == self.rank and error is not None:
                    raise error
                raise HeadstartError(f"rank {rank} failed: {msg}")


def from_env() -> Dist:
    """The rank layout torchrun put in the environment (``WORLD_SIZE``, ``RANK``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``); one process without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as td

    if not td.is_initialized():
        td.init_process_group("gloo", timeout=TIMEOUT)
    return Dist(td.get_rank(), td.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def distributed(device: str) -> Iterator[Dist]:
    """One process, or one of ``torchrun``'s, with its device: NCCL on GPUs, gloo on CPUs."""
    import torch.distributed as td

    from . import runtime

    dev = runtime.resolve_device(device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Dist(device=dev)
        return
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owned = not td.is_initialized()
    if owned:
        td.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield Dist(td.get_rank(), td.get_world_size(), local, dev)
    finally:
        if owned:
            td.destroy_process_group()
