"""Inference engines: onnxruntime on the CPU, PyTorch as the fallback; same features either way;
the exported backbone graph cached, reused, and rebuilt when damaged."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from conftest import copy_sample_photos

from pipeline.cache import Cache
from pipeline.config import ExtractConfig
from pipeline.errors import InputError
from pipeline.extract import extract
from pipeline.models import engine
from pipeline.models.backbones import load_backbone

CPU = torch.device("cpu")


@pytest.fixture
def graph_cache(tmp_path, monkeypatch):
    """A private graph cache, so counting exports is not disturbed by other tests' graphs."""
    monkeypatch.setenv("HEADSTART_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache" / "engines"


def _pixels(n: int = 4, crop: int = 224) -> torch.Tensor:
    from pipeline.data import SAMPLE_CATALOG
    from pipeline.data.images import load_pixels

    prep = load_backbone("efficientnet_lite0").spec.preprocessing
    photos = sorted((SAMPLE_CATALOG / "test").rglob("*.png"))[::50][:n]
    return torch.from_numpy(np.stack([load_pixels(p, prep) for p in photos]))


def test_auto_is_onnxruntime_on_the_cpu_and_torch_without_it(monkeypatch):
    assert engine.resolve("auto", "auto", CPU) == ("onnxruntime", "fp32")
    assert engine.resolve("auto", "fp32", CPU) == ("onnxruntime", "fp32")
    assert engine.resolve("torch", "fp32", CPU) == ("torch", "fp32")
    assert engine.resolve("auto", "bf16", CPU) == ("torch", "bf16")  # bf16 is PyTorch's
    with pytest.raises(InputError, match="computes in fp32"):
        engine.resolve("onnxruntime", "bf16", CPU)
    # onnxruntime not installed: auto falls back, an explicit request says how to install it.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    assert not engine.onnxruntime_available()
    assert engine.resolve("auto", "fp32", CPU) == ("torch", "fp32")
    with pytest.raises(InputError, match=r"pip install '\.\[onnx\]'"):
        engine.resolve("onnxruntime", "auto", CPU)


@pytest.mark.parametrize("backbone", ["tiny", "efficientnet_lite0"])
def test_onnxruntime_features_equal_torch_fp32_features(backbone, graph_cache):
    net = load_backbone(backbone).net
    x = _pixels()
    crop = load_backbone(backbone).spec.preprocessing.crop
    x = torch.nn.functional.interpolate(x.float(), size=(crop, crop)).to(torch.uint8) if crop != 224 else x
    ort = engine.make_embedder(net, crop, engine="onnxruntime", device=CPU, precision="fp32")(x)
    ref = engine.make_embedder(net, crop, engine="torch", device=CPU, precision="fp32")(x)
    assert ort.shape == ref.shape and ort.dtype == np.float32
    # Measured: 1e-5 (Lite0, 1280-d features of magnitude ~1), well inside the 1e-4 promise.
    np.testing.assert_allclose(ort, ref, atol=1e-4, rtol=1e-4)


def test_the_exported_graph_is_reused_and_a_damaged_one_rebuilt(graph_cache, monkeypatch):
    net = load_backbone("tiny").net
    exports = []
    real_export = engine._export
    monkeypatch.setattr(engine, "_export", lambda *a: (exports.append(a[2]), real_export(*a)))
    x = _pixels(2)
    first = engine.make_embedder(net, 224, engine="onnxruntime", device=CPU, precision="fp32")(x)
    engine.make_embedder(net, 224, engine="onnxruntime", device=CPU, precision="fp32")
    assert len(exports) == 1  # the second run reused it
    (graph,) = graph_cache.glob("*.onnx")
    # A flipped byte (sha256 no longer matches the sidecar): rebuilt, never used.
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    again = engine.make_embedder(net, 224, engine="onnxruntime", device=CPU, precision="fp32")(x)
    assert len(exports) == 2
    np.testing.assert_array_equal(again, first)
    # A partial file whose sidecar was made to match it (a copy cut short): onnxruntime refuses
    # it, and it is rebuilt.
    graph.write_bytes(graph.read_bytes()[:1000])
    sidecar = graph.with_suffix(".json")
    from pipeline.core.hashing import sha256_file

    sidecar.write_text(json.dumps({"sha256": sha256_file(graph)}))
    again = engine.make_embedder(net, 224, engine="onnxruntime", device=CPU, precision="fp32")(x)
    assert len(exports) == 3
    np.testing.assert_array_equal(again, first)
    # Other weights (a fine-tuned network): another graph, never the cached one.
    with torch.no_grad():
        next(net.parameters()).add_(0.1)
    engine.make_embedder(net, 224, engine="onnxruntime", device=CPU, precision="fp32")
    assert len(exports) == 4 and len(list(graph_cache.glob("*.onnx"))) == 2


def test_a_cache_grows_with_either_engine_and_records_it(tmp_path):
    """The engine is not in the fingerprint: rows from both engines may share a cache."""
    images = copy_sample_photos(tmp_path / "images", per_class=3)
    out = tmp_path / "f.h5"
    kw = dict(images=str(images), out=str(out), backbone="tiny", progress=False, workers=0)
    extract(ExtractConfig(**kw, engine="torch"))
    with Cache(out) as c:
        first, fp = c.features(), c.fingerprint
        assert json.loads(c.attrs["config"])["engine_used"] == "torch"
    copy_sample_photos(tmp_path / "more", per_class=4)
    for cls in ("bag", "sneaker", "trouser"):
        extra = sorted((tmp_path / "more" / cls).glob("*.png"))[-1]
        extra.rename(images / cls / extra.name)
    s = extract(ExtractConfig(**kw, engine="onnxruntime"))
    assert (s.extracted, s.reused) == (3, 9)
    with Cache(out) as c:
        assert c.fingerprint == fp and json.loads(c.attrs["config"])["engine_used"] == "onnxruntime"
        grown = dict(zip(c.content_hash, c.features(), strict=True))
    assert len(grown) == 12
    extract(ExtractConfig(**kw, engine="onnxruntime", rebuild=True))
    with Cache(out) as c:
        rebuilt = dict(zip(c.content_hash, c.features(), strict=True))
    assert rebuilt.keys() == grown.keys()
    # The torch rows and their onnxruntime re-extraction agree to float16 storage precision.
    for h, row in rebuilt.items():
        np.testing.assert_allclose(row, grown[h], atol=2e-3, rtol=2e-3)
    assert sum(any(np.array_equal(f, g) for g in grown.values()) for f in first) == len(first)


def test_auto_keeps_the_precision_a_cache_was_made_in(tmp_path):
    """A cache extracted in bf16 (the old CPU default on AMX machines) grows in bf16 under
    ``--precision auto``, instead of failing the fingerprint check now that fp32 is the default."""
    images = copy_sample_photos(tmp_path / "images", per_class=2)
    out = tmp_path / "f.h5"
    kw = dict(images=str(images), out=str(out), backbone="tiny", progress=False, workers=0)
    extract(ExtractConfig(**kw, precision="bf16"))
    copy_sample_photos(tmp_path / "more", per_class=3, classes=("bag",))
    new = sorted((tmp_path / "more" / "bag").glob("*.png"))[-1]
    new.rename(images / "bag" / new.name)
    s = extract(ExtractConfig(**kw))  # precision auto
    with Cache(out) as c:
        assert c.fingerprint.precision == "bf16" and (s.rows, s.extracted) == (7, 1)


class _Body(torch.nn.Module):
    """Singular values: an operation opset 17 has no translation for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x.mean(dim=3))


def test_a_network_onnx_cannot_express_runs_in_pytorch_and_cannot_be_exported_as_onnx(graph_cache, capfd, tmp_path):
    from pipeline.data.preprocessing import Preprocessing
    from pipeline.models.network import FeatureNet

    prep = Preprocessing(resize=40, crop=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    net = FeatureNet(_Body(), None, prep, 3).eval()
    embed = engine.make_embedder(net, 32, engine="onnxruntime", device=torch.device("cpu"), precision="fp32")
    x = torch.randint(0, 255, (2, 3, 32, 32), dtype=torch.uint8)
    want = torch.linalg.svdvals(((x.float() / 255 - 0.5) / 0.25).mean(dim=3)).numpy()
    assert np.allclose(embed(x), want, atol=1e-4)
    err = capfd.readouterr().err
    assert "cannot be exported to ONNX opset 17 (UnsupportedOperatorError" in err
    assert "running the backbone in PyTorch instead" in err and "Torch IR graph" not in err
    with pytest.raises(engine.GraphExportError, match="aten::linalg_svdvals"):
        engine.export_graph(net, 32, tmp_path / "x.onnx", ["features"])
