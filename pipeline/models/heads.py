"""The torch head modules and the classifier they complete.

A head becomes a torch module from a small **head spec**: a torch kind plus named tensors (the
arrays a fitted probe's ``torch_state()`` gives; ``head.npz``). Kinds, one builder each in
:data:`HEAD_BUILDERS`:

* ``linear``: ``weight [C, D]``, ``bias [C]`` - logistic regression, nearest centroid;
* ``cosine``: the same tensors applied to the L2-normalised features - zero-shot heads from
  text prompts and logistic heads with a text prior (:mod:`pipeline.probe.zeroshot`), whose
  logits are ``scale * cos(image, text)``;
* ``mlp``: ``layers.0.weight [H, D]``, ``layers.0.bias [H]``, ..., ``layers.L.weight [C, H]``,
  ``layers.L.bias [C]``, ReLU between layers.

Tensor names are the module's own state-dict names, so the same builder works on ``head.npz``
and on the ``head.*`` entries of an exported or fine-tuned state dict. Which fit-head kind
exports as which torch kind: :mod:`pipeline.probe.kinds`. A new torch kind is one builder here;
export, ONNX and predict need no change, because :class:`Classifier` and the saved state dict
are built from the spec alone.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import ArtifactError
from .network import FeatureNet


class LinearHead(nn.Linear):
    @property
    def n_classes(self) -> int:
        return self.out_features


class CosineHead(LinearHead):
    """``weight @ (x / |x|) + bias``: CLIP-style logits (the logit scale is folded into the weight).
    Unit features make the cosine a linear map, so the head stays one matrix; the norm is
    clamped at 1e-12 exactly as :func:`pipeline.probe.zeroshot.unit_rows` does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.nn.functional.normalize(x, dim=1, eps=1e-12))


class MLPHead(nn.Module):
    def __init__(self, layers: list[nn.Linear]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    @property
    def n_classes(self) -> int:
        return int(self.layers[-1].out_features)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == 0 else layer(torch.relu(x))
        return x


def _linear(t: dict[str, torch.Tensor]) -> nn.Module:
    w, b = t["weight"], t["bias"]
    head = LinearHead(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": b})
    return head


def _cosine(t: dict[str, torch.Tensor]) -> nn.Module:
    w, b = t["weight"], t["bias"]
    head = CosineHead(w.shape[1], w.shape[0])
    head.load_state_dict({"weight": w, "bias": b})
    return head


def _mlp(t: dict[str, torch.Tensor]) -> nn.Module:
    n = len([k for k in t if k.startswith("layers.") and k.endswith(".weight")])
    if n == 0:
        raise KeyError("layers.0.weight")
    layers = [nn.Linear(t[f"layers.{i}.weight"].shape[1], t[f"layers.{i}.weight"].shape[0]) for i in range(n)]
    head = MLPHead(layers)
    head.load_state_dict(t)
    return head


HEAD_BUILDERS: dict[str, Callable[[dict[str, torch.Tensor]], nn.Module]] = {
    "linear": _linear,
    "cosine": _cosine,
    "mlp": _mlp,
}


def build_head(kind: str, tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """Head spec -> torch module (logits). The tensors may be the head's own (``head.npz``) or
    the ``head.*`` entries of an exported or fine-tuned state dict (prefix stripped)."""
    builder = HEAD_BUILDERS.get(kind)
    if builder is None:
        raise ArtifactError(
            f"unknown head kind {kind!r} (this headstart builds: {', '.join(HEAD_BUILDERS)}); upgrade headstart"
        )
    try:
        return builder(dict(tensors))
    except (KeyError, IndexError, RuntimeError) as e:
        raise ArtifactError(f"the {kind} head's tensors are incomplete or inconsistent ({e}); re-export") from None


# --------------------------------------------------------------------------- the classifier


class Classifier(nn.Module):
    """uint8 pixels -> class logits: normalisation, backbone, head in one module; and the heads
    of further attributes (``attributes``, in the manifest's order), on the same features."""

    def __init__(
        self,
        net: FeatureNet,
        head: nn.Module,
        attributes: list[nn.Module] | None = None,
        multi_label: list[bool] | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.head = head
        # Empty for a one-attribute model: its state dict is the same as before attributes.
        self.attributes = nn.ModuleList(attributes or [])
        self.multi_label = list(multi_label or [False] * len(self.attributes))

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net(pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(pixels).float())  # type: ignore[no-any-return]

    def attribute_probabilities(self, feats: torch.Tensor) -> list[torch.Tensor]:
        """Per further attribute: softmax over its classes, or per-label sigmoid (multi-label)."""
        return [
            head(feats).sigmoid() if multi else head(feats).softmax(1)
            for head, multi in zip(self.attributes, self.multi_label, strict=True)
        ]


class ExportGraph(nn.Module):
    """What the ONNX file computes: pixels -> (probabilities, features, then one probabilities
    output per further attribute). Softmax (sigmoid for a multi-label attribute) is inside so a
    deployment reads probabilities directly; features feed search and recommendation."""

    def __init__(self, model: Classifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feats = self.model.net(pixels).float()
        return (self.model.head(feats).softmax(1), feats, *self.model.attribute_probabilities(feats))


def head_tensors(state: Mapping[str, torch.Tensor], prefix: str = "head.") -> dict[str, torch.Tensor]:
    """The ``head.*`` entries of a Classifier state dict (or another ``prefix``'s), prefix stripped."""
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
