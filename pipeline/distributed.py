"""``torchrun`` support for extraction: which rank am I, which files are mine, and the three
collectives extraction needs (gather, barrier, agree on an error).

Under ``torchrun --nproc_per_node=N -m pipeline extract ...`` every rank discovers the same
files, hashes a 1/N slice of them and gathers the rest, then runs the backbone only on the new
content whose hash falls in its shard (``int(hash[:8], 16) % N == rank``: deterministic, so a
re-run or a grown folder shards the same way). Every rank commits its rows to the cache's
shared journal (``CACHE.h5.journal/``, on a filesystem all nodes see); rank 0 holds the writer
lock, waits for the others and writes the one cache. A rank that dies loses at most its last
uncommitted batch: the re-run finds every other rank's finished work in the journal.

The control traffic is small Python objects, so it always goes over a gloo process group, also
on GPU machines (NCCL would need them as CUDA tensors).
"""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import HeadstartError

T = TypeVar("T")

# Rank 0 may spend a long time merging and writing a large cache while the others wait at the
# last barrier; gloo's default 30-minute timeout would kill a healthy job.
TIMEOUT = _dt.timedelta(seconds=float(os.environ.get("HEADSTART_DIST_TIMEOUT_S", str(12 * 3600))))


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

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


def merge_shards(parts: Sequence[dict[int, T]], n: int) -> list[T]:
    """Per-rank ``{index: value}`` dicts -> one list of ``n`` values."""
    out: list[Any] = [None] * n
    for part in parts:
        for i, v in part.items():
            out[i] = v
    return out
