"""The ``headstart`` command line: a thin click shell over the library (the only package that
imports click). ``app`` holds the group and the machinery every command shares (options from
config dataclasses, ``--config``, errors -> ``Error:``); each further module registers one family
of commands on it."""

from . import audit, backbones, cache, stages  # noqa: F401  (importing them registers their commands)
from .app import cli, main

__all__ = ["cli", "main"]
