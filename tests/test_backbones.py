"""Backbone registry, and proof that the bundled weights are real ImageNet weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.images import load_pixels
from pipeline.errors import BackboneError
from pipeline.models.backbones import get_spec, load_backbone, names


def test_registry_has_the_promised_backbones():
    for name in (
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
        "resnet50",
        "efficientnet_b0",
        "convnext_tiny",
    ):
        assert name in names()


def test_unknown_backbone_lists_valid_names():
    with pytest.raises(BackboneError, match=r"unknown backbone 'resnet5000'.*efficientnet_lite0"):
        get_spec("resnet5000")


def test_torchvision_preprocessing_comes_from_the_weights():
    import torchvision

    t = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.transforms()
    prep = get_spec("resnet50").preprocessing
    assert (prep.resize, prep.crop) == (t.resize_size[0], t.crop_size[0]) == (232, 224)
    assert prep.mean == tuple(t.mean)


def test_missing_torchvision_weights_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache
    with pytest.raises(BackboneError, match=r"not on this machine.*--weights-file"):
        load_backbone("resnet50")
    with pytest.raises(BackboneError, match=r"not on this machine at .*nope\.pth"):
        load_backbone("resnet50", tmp_path / "nope.pth")


def test_weights_file_of_another_network_is_refused(tmp_path):
    lite = get_spec("efficientnet_lite0").find_weights()
    with pytest.raises(BackboneError, match=r"does not fit resnet18"):
        load_backbone("resnet18", lite)


def test_feature_shapes_tiny_backbone():
    lb = load_backbone("tiny")
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    assert lb.net(x).shape == (2, 32)


def _sample_photos() -> dict[str, np.ndarray]:
    from skimage import data

    return {"cat": data.chelsea(), "coffee": data.coffee()}


def test_lite0_imagenet_sanity_on_real_photos():
    """The bundled weights classify real photos into the right ImageNet classes."""
    import torchvision

    categories = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.meta["categories"]
    lb = load_backbone("efficientnet_lite0")
    expected = {"cat": {"tabby", "tiger cat", "Egyptian cat"}, "coffee": {"espresso", "cup", "coffee mug"}}
    for name, arr in _sample_photos().items():
        x = torch.from_numpy(load_pixels(Image.fromarray(arr), lb.spec.preprocessing))[None]
        with torch.inference_mode():
            probs = lb.net.imagenet_logits(x).softmax(1)[0]
        top1 = categories[int(probs.argmax())]
        assert top1 in expected[name], f"{name} classified as {top1}"
        # imagenet_logits runs outside autocast: fp32 whatever --precision auto resolves to. Measured
        # (fp32 / bf16 override alike): cat "tiger cat" 0.393, coffee "espresso" 0.951; one photo each,
        # deterministic, so 0.3 is a sanity floor (ImageNet chance 0.001), not a sampled estimate.
        assert float(probs.max()) > 0.3
