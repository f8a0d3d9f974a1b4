"""Feature rows as the heads read them: an in-memory array or a :class:`RowSource` read off the
cache chunk by chunk, the standardisation accumulated over those chunks, and the one-thread
limit for small problems."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from threadpoolctl import threadpool_limits

# Small problems run on one CPU thread (BLAS and torch alike). Measured on the shared 2-core
# development machine, 300 x 1280 features: one L-BFGS fit 0.2 s on one thread, 8 s on two while
# other jobs used the cores (OpenBLAS and torch worker threads busy-wait for each other), and a
# whole fit-head 140 s. Threads pay off only for large matrices: 20M values is e.g. 15k photos x
# 1280 features.
SINGLE_THREAD_VALUES = 20_000_000
CHUNK_ROWS = 65536


class RowSource(Protocol):
    """What the chunked paths need: a row count and row slicing. ``fit_head.CacheRows`` is one:
    it reads the rows from the HDF5 cache on every slice, so nothing but a chunk is in memory.
    ``is_row_source = True`` marks such objects (arrays are validated the scikit-learn way)."""

    is_row_source: bool

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


def iter_chunks(X: RowSource | np.ndarray, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, int(X.shape[0]), chunk_rows):
        yield start, np.asarray(X[start : start + chunk_rows], dtype=np.float32)


def standardisation(X: RowSource | np.ndarray, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std, accumulated in float64 over row chunks (one pass, bounded memory)."""
    n = 0
    s: Any = 0.0
    ss: Any = 0.0
    for _, c in iter_chunks(X, chunk_rows):
        c64 = c.astype(np.float64)
        n += len(c)
        s = s + c64.sum(0)
        ss = ss + (c64**2).sum(0)
    mean = s / n
    var = np.maximum(ss / n - mean**2, 0.0)
    return mean.astype(np.float32), (np.sqrt(var) + 1e-6).astype(np.float32)


_limited = 0  # depth of the one-thread limits in force


@contextlib.contextmanager
def _one_blas_thread() -> Iterator[None]:
    global _limited
    if _limited:  # an outer limit holds already: threadpoolctl would re-scan every loaded library
        _limited += 1  # for nothing (a few ms each time; fit-head nests three inside its own)
        try:
            yield
        finally:
            _limited -= 1
        return
    with threadpool_limits(limits=1):
        _limited += 1
        try:
            yield
        finally:
            _limited -= 1


def blas_threads_for(n_values: int) -> contextlib.AbstractContextManager[Any]:
    """One BLAS thread for problems of up to SINGLE_THREAD_VALUES values, else no limit. Nested
    inside another such limit it costs nothing (the outer one is still in force)."""
    return _one_blas_thread() if n_values <= SINGLE_THREAD_VALUES else contextlib.nullcontext()


@contextlib.contextmanager
def small_problem_threads(n_values: int, device: str) -> Iterator[None]:
    """One torch CPU thread for problems of up to SINGLE_THREAD_VALUES values."""
    import torch

    if device != "cpu" or n_values > SINGLE_THREAD_VALUES:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
