"""Domain errors. The library raises these; ``pipeline.cli`` turns them into ``Error: ...`` and exit 1.

Every message says what went wrong, with the numbers, and what to do about it
(the scikit-learn habit: "X has 512 features, but ... is expecting 1280").
"""

from __future__ import annotations


class HeadstartError(Exception):
    """Base class: a problem the user can fix. Never a bug in headstart."""


class InputError(HeadstartError):
    """Images, manifests or arguments that cannot be used as given."""


class BackboneError(HeadstartError):
    """Unknown backbone, or its weights are not available on this machine."""


class CacheError(HeadstartError):
    """A feature cache that is missing, corrupt, locked or made by another backbone."""


class ArtifactError(HeadstartError):
    """A head or exported model that is missing, tampered with, or from a newer version."""
