"""torch.distributed for headstart stages run under ``torchrun``: one process per GPU (or CPU
slot), rendezvous from torchrun's environment variables, NCCL on GPUs and gloo on CPUs.

A stage that runs in one process gets ``Rank(0, 1, device)`` and every helper is a no-op, so the
same code serves a laptop and eight GPUs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from . import runtime


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0


@contextlib.contextmanager
def distributed(device: str) -> Iterator[Rank]:
    """One process, or one of ``torchrun``'s (rendezvous from its environment variables)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Rank(device=runtime.resolve_device(device))
        return
    dev = runtime.resolve_device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    try:
        yield Rank(dist.get_rank(), dist.get_world_size(), dev)
    finally:
        if owned:
            dist.destroy_process_group()


def broadcast(obj: Any, r: Rank) -> Any:
    if r.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any, r: Rank) -> list[Any]:
    if r.world == 1:
        return [obj]
    out: list[Any] = [None] * r.world
    dist.all_gather_object(out, obj)
    return out
