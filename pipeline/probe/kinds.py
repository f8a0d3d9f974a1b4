"""Head kinds: the one place a kind is defined.

Each entry names the kind as ``--head`` / ``FitHeadConfig.head`` / head.json ``"kind"`` spell it
(``logreg``, ``mlp``, ``centroid``, ``zeroshot``), builds its unfitted scikit-learn estimator from the
fit-head options, and says which torch module its ``torch_state()`` tensors load into
(:data:`pipeline.models.heads.HEAD_BUILDERS`: ``linear``, ``cosine``, ``mlp``; head.json ``"torch_kind"``,
head.npz ``"kind"``). A new kind is one entry here and, if it needs a new module, one builder
there.

Light on purpose: the CLI reads :data:`HEAD_KINDS` for its ``--head`` choice at start-up, so the
estimators (scikit-learn, torch) are imported only when one is built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from ..errors import InputError

if TYPE_CHECKING:
    from .estimators import _Head


class ProbeOptions(Protocol):
    """The fit-head options a head is built from (:class:`~pipeline.config.FitHeadConfig` is one)."""

    @property
    def class_weight(self) -> str | None: ...

    @property
    def max_iter(self) -> int: ...

    @property
    def hidden(self) -> int: ...

    @property
    def seed(self) -> int: ...


@dataclass(frozen=True)
class HeadKind:
    name: str  # --head, FitHeadConfig.head, head.json "kind"
    torch_kind: str  # the models.heads builder its tensors load into
    make: Callable[[ProbeOptions, float, str, str], _Head]  # (options, C, solver, device)
    uses_c: bool = False  # logistic: C swept on validation log-loss (selection.sweep_c) or --c
    streams: bool = False  # can fit from rows read off the cache in chunks (above --max-memory-gb)
    # built from class prompts, not photos: the caller passes the text tower's class embeddings
    # with set_params(text_embeddings=..., logit_scale=...) (probe/zeroshot.py) before fit
    needs_text: bool = False

    def estimator(self, opts: ProbeOptions, *, C: float, solver: str, device: str) -> _Head:
        """The unfitted estimator. ``solver``/``device`` are fit-head's resolved choice
        (``resolve_solver``); kinds that have no use for them ignore them."""
        return self.make(opts, C, solver, device)


def _logreg(o: ProbeOptions, C: float, solver: str, device: str) -> _Head:
    from .estimators import LogisticHead

    return LogisticHead(C=C, class_weight=o.class_weight, max_iter=o.max_iter, solver=solver, device=device)


def _mlp(o: ProbeOptions, C: float, solver: str, device: str) -> _Head:
    from .estimators import MLPProbe

    return MLPProbe(hidden=o.hidden, class_weight=o.class_weight, random_state=o.seed, device=device)


def _centroid(o: ProbeOptions, C: float, solver: str, device: str) -> _Head:
    from .estimators import NearestCentroidHead

    return NearestCentroidHead()


def _zeroshot(o: ProbeOptions, C: float, solver: str, device: str) -> _Head:
    from .zeroshot import ZeroShotHead

    return ZeroShotHead()


KINDS: dict[str, HeadKind] = {
    k.name: k
    for k in (
        HeadKind("logreg", "linear", _logreg, uses_c=True, streams=True),
        HeadKind("mlp", "mlp", _mlp),
        HeadKind("centroid", "linear", _centroid),
        HeadKind("zeroshot", "cosine", _zeroshot, needs_text=True),
    )
}
HEAD_KINDS = tuple(KINDS)  # the --head choices


def head_kind(name: str) -> HeadKind:
    kind = KINDS.get(name)
    if kind is None:
        raise InputError(f"unknown head {name!r}; available: {', '.join(HEAD_KINDS)}")
    return kind
