"""Layer groups for gradual unfreezing and layer-wise learning rates, for any backbone.

No per-architecture table: the backbone body is cut into an ordered list of *units* by
repeatedly splitting the unit with the most parameters into its children (an EfficientNet's
``_blocks`` list becomes its 16 blocks, a ResNet's ``layer4`` its 3 bottlenecks, a ViT's encoder
its 12 layers) until there are at least ``MIN_UNITS``. Module registration order is forward
order in every registered backbone, so the units run from the input to the output. They are
then cut into ``stages`` contiguous groups of (nearly) equal unit count.

Group 0 is the classification head; group ``i`` (1 = the top of the backbone) trains with
``lr * layer_decay**i`` (ULMFiT's discriminative learning rates, BEiT's layer-wise decay) and
is unfrozen ``i``-th (ULMFiT's gradual unfreezing; the seed article's FAQ 3).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

MIN_UNITS = 8


@dataclass
class Unit:
    name: str
    params: list[tuple[str, nn.Parameter]]
    modules: list[nn.Module]  # whose train/eval mode follows the unit (BatchNorm statistics)

    @property
    def size(self) -> int:
        return sum(p.numel() for _, p in self.params)


def _unit_of(name: str, module: nn.Module) -> Unit:
    return Unit(name, [(f"{name}.{n}" if name else n, p) for n, p in module.named_parameters()], [module])


def _split(unit: Unit) -> list[Unit] | None:
    """A module's own parameters (a ViT's class token) first, then one unit per child."""
    (module,) = unit.modules
    children = [(n, c) for n, c in module.named_children() if any(True for _ in c.parameters())]
    if not children:
        return None
    prefix = f"{unit.name}." if unit.name else ""
    own = [(f"{prefix}{n}", p) for n, p in module.named_parameters(recurse=False)]
    out = [Unit(f"{unit.name}(own)", own, [])] if own else []
    return out + [_unit_of(f"{prefix}{n}", c) for n, c in children]


def backbone_units(body: nn.Module, min_units: int = MIN_UNITS) -> list[Unit]:
    units = [_unit_of("", body)]
    frozen_out: set[int] = set()  # units that cannot be split further
    while len(units) < min_units:
        candidates = [i for i, u in enumerate(units) if i not in frozen_out and len(u.modules) == 1]
        if not candidates:
            break
        i = max(candidates, key=lambda j: units[j].size)
        parts = _split(units[i])
        if parts is None:
            frozen_out.add(i)
            continue
        units[i : i + 1] = parts
        frozen_out = {j if j < i else j + len(parts) - 1 for j in frozen_out}
    return [u for u in units if u.params]


@dataclass
class LayerGroups:
    """``groups[0]`` is the head; ``groups[i]``, i >= 1, the i-th backbone group from the top."""

    groups: list[list[Unit]]

    @property
    def n_backbone(self) -> int:
        return len(self.groups) - 1

    def describe_short(self) -> list[str]:
        """One line per group, for logs and finetune.json (unit lists can be long)."""
        out = []
        for i, g in enumerate(self.groups):
            names = g[0].name if len(g) == 1 else f"{g[0].name} .. {g[-1].name}"
            out.append(f"{i}: {names} ({len(g)} units, {sum(u.size for u in g):,} parameters)")
        return out

    def param_groups(self, lr: float, layer_decay: float, weight_decay: float) -> list[dict[str, object]]:
        """AdamW groups: per layer group, one with weight decay (weights) and one without
        (biases, norm scales: decaying them only shrinks activations, the usual exemption)."""
        out: list[dict[str, object]] = []
        for i, group in enumerate(self.groups):
            params = [p for u in group for _, p in u.params]
            decay = [p for p in params if p.ndim > 1]
            no_decay = [p for p in params if p.ndim <= 1]
            for ps, wd in ((decay, weight_decay), (no_decay, 0.0)):
                if ps:
                    out.append({"params": ps, "lr": lr * layer_decay**i, "weight_decay": wd, "layer_group": i})
        return out

    def set_trainable(self, n_backbone_groups: int) -> None:
        """Head plus the top ``n_backbone_groups`` train; the rest is frozen, BatchNorm
        statistics included (eval mode), so a frozen block really does not change."""
        for i, group in enumerate(self.groups):
            on = i <= n_backbone_groups
            for u in group:
                for _, p in u.params:
                    p.requires_grad_(on)
                for m in u.modules:
                    m.train(on)


def layer_groups(body: nn.Module, head: nn.Module, stages: int) -> LayerGroups:
    units = backbone_units(body, max(MIN_UNITS, stages))
    stages = max(1, min(stages, len(units)))
    bounds = [round(k * len(units) / stages) for k in range(stages + 1)]
    bottom_up = [units[bounds[k] : bounds[k + 1]] for k in range(stages)]
    return LayerGroups([[_unit_of("head", head)], *reversed(bottom_up)])
