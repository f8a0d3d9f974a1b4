"""Saving torch objects so that a failed write is an ``OSError``.

``torch.save`` into a file reports a write that hit a full disk or a file-size limit as a
``RuntimeError`` from its zip writer ("unexpected pos ..."), which no caller can tell from a bug.
Serialising into memory first and writing the bytes atomically makes it the plain ``OSError``
(ENOSPC, EFBIG) that the CLI turns into ``Error:``. The objects saved here (head and fine-tuned
weights, checkpoints) fit in memory by construction: they are in memory already.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_file


def atomic_torch_save(obj: Any, path: Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with atomic_file(path) as f:
        f.write(buffer.getbuffer())
