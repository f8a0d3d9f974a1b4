"""The HDF5 feature cache: schema, segments, index writer, lock, reader (``store``) and its
inspection (``inspection``: ``cache info`` / ``cache verify``). No torch at import time."""

from .store import Cache

__all__ = ["Cache"]
