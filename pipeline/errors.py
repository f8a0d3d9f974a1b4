"""Domain errors. The library raises these; ``pipeline.cli`` turns them into ``Error: ...`` and exit 1.

Every message says what went wrong, with the numbers, and what to do about it
(the scikit-learn habit: "X has 512 features, but ... is expecting 1280").
"""

from __future__ import annotations

import errno


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


class WorkerError(HeadstartError):
    """A decoding worker process died (killed, usually by the kernel's out-of-memory killer)."""


# What an operating-system error while reading or writing means for the user, by errno.
_OS_HINTS = {
    "ENOSPC": "the disk is full: free space or write elsewhere",
    "EDQUOT": "the disk quota is used up: free space or write elsewhere",
    "EFBIG": "a file-size limit was reached (`ulimit -f`): raise it or write elsewhere",
    "EROFS": "the file system is read-only: choose another --out",
    "EACCES": "permission denied: choose a folder you can write, or fix its permissions",
    "EPERM": "operation not permitted: choose a folder you can write, or fix its permissions",
    "EIO": "an input/output error (a failing disk or network share)",
}


def describe_os_error(e: OSError) -> str:
    """``OSError`` -> one readable sentence: what failed, on which file, and what to do."""
    name = errno.errorcode.get(e.errno or 0, "")
    what = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    hint = _OS_HINTS.get(name)
    return f"{what}{where}" + (f"; {hint}" if hint else "")
