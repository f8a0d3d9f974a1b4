"""headstart: classify product photos with a pretrained backbone, a cached feature file and a
head that trains in seconds. The import package is ``pipeline``; the CLI is ``headstart``."""

__version__ = "0.1.0"

from .errors import ArtifactError, BackboneError, CacheError, HeadstartError, InputError

__all__ = [
    "ArtifactError",
    "BackboneError",
    "CacheError",
    "HeadstartError",
    "InputError",
    "__version__",
]
