"""Hardware choices made once: device, precision, memory format, batch size, workers.

``--precision auto`` picks bf16 on CUDA (where supported) and, on the CPU, where the CPU has
native bf16 matrix instructions (AMX or avx512_bf16); fp32 elsewhere. The rule is checked by
``bench/precision_auto.py`` (fp32 against bf16 on the same photos, in-run rates), and held on
each CPU measured so far (EfficientNet-Lite0, 2 cores; docs/benchmarks.md has the details):

* AVX-512 + AMX: bf16 56 img/s, fp32 12-30 img/s -> bf16;
* avx512_bf16, no AMX: bf16 68.5, fp32 57.8 img/s -> bf16;
* AVX2 only (AMD EPYC, no AVX-512): bf16 2.1, fp32 27.6 img/s -> fp32 (bf16 is emulated there,
  13x slower: a flag-free "bf16 everywhere" would be a disaster on such CPUs).
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
from collections.abc import Iterator

import torch

from ..config import PRECISIONS
from ..errors import InputError


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {device} asked for, but this machine has no CUDA GPU; use --device cpu")
    return dev


def cpu_has_fast_bf16() -> bool:
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, c, lambda: False)()) for c in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_fast_bf16() else "fp32"


# Networks run in channels_last everywhere: fp32 on the CPU gains from it, on CUDA it feeds the
# tensor cores, and bf16 on the CPU, first measured fastest in the default layout, was
# re-measured (Lite0, batch 32, 3 alternating rounds on a 2-core AMX CPU): fp32 24.5 img/s,
# fp32 + channels_last 35, bf16 45, bf16 + channels_last 75.
CHANNELS_LAST = True


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def auto_batch_size(device: torch.device) -> int:
    # On the CPU smaller batches run faster per image (activations stay in cache): Lite0, bf16 +
    # channels_last on the 2-core dev CPU, quiet rounds: batch 16 113-123 img/s, 32 85-96, 64 ~60.
    return 256 if device.type == "cuda" else 16


def auto_workers(device: torch.device) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        return max(1, min(cpus - 1, 16))
    # On CPU the network and the decoders share the cores: one decode worker per spare core,
    # at least one so decoding overlaps the forward pass.
    return max(1, min(cpus // 2, 8))


def prepare_worker_sharing(num_workers: int) -> None:
    """Avoid "Bad file descriptor" from DataLoader workers (seen on a 16-worker H200 box).

    torch's default ``file_descriptor`` sharing keeps one fd per shared tensor in flight; with
    many workers and pinned memory that exceeds a low ``ulimit -n``. Raise the soft limit to
    the hard one, and if it is still low fall back to ``file_system`` sharing.
    """
    if num_workers <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 16
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
    if soft < 4096 * max(1, num_workers // 4):
        torch.multiprocessing.set_sharing_strategy("file_system")


@contextlib.contextmanager
def no_cyclic_gc() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block: for the per-file bookkeeping (the
    folder walk, the stat scan, the index read, assembled and committed). Those phases make a
    few objects per file, none of them in a cycle, and every full collection walks every live
    container, torch's included: in an unchanged re-run of 20,000 files the collector took a
    third of the time. Not around the backbone, which runs for hours on a large catalog:
    whatever cycles it leaves are collected as usual.

    On the way out the block's survivors go straight to the oldest generation (``freeze`` then
    ``unfreeze``: two list splices, and the young generation's count back to 0). Why: with the
    count of every object made in the block, the first allocation after ``enable`` started a
    collection that walked them all, 0.04-0.05 s per block at 100,000 files. They are still
    collected, by the next full collection, if they turn out to be garbage."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.freeze()
            gc.unfreeze()
            gc.enable()
