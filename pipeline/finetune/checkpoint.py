"""Crash-safe training checkpoints: written atomically, read with ``weights_only=True``.

A checkpoint is a dict of tensors and plain containers only (model, optimizer and scheduler
state dicts, RNG states as uint8 tensors, progress counters), so resuming never unpickles an
arbitrary object. Writing goes to a temporary file in the same folder, is fsynced, then renamed
over the old one: a SIGKILL at any instant leaves either the previous checkpoint or the new
one, never a torn file.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from ..core.torchio import atomic_torch_save
from ..errors import ArtifactError


def atomic_save(obj: Any, path: Path) -> None:
    atomic_torch_save(obj, path)


def load(path: Path) -> dict[str, Any]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        raise ArtifactError(
            f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            "delete it to start the fine-tune over"
        ) from None
    if not isinstance(obj, dict):
        raise ArtifactError(f"{path} is not a headstart checkpoint; delete it to start over")
    return obj


def rng_state() -> dict[str, Any]:
    """Global RNG streams the training step draws from (dropout, stochastic depth)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def remove_tmp_files(folder: Path) -> None:
    """Temporary files of a write that was killed half-way."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)
