"""Library backbones (timm, Hugging Face transformers, open_clip) behind the one registry, tested
offline: each library's real code builds a small random-weight model, which is saved in the
library's own layout, imported with `headstart backbones import`, and then used like any backbone."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.images import load_pixels, open_rgb
from pipeline.data.preprocessing import Preprocessing

timm = pytest.importorskip("timm")

PHOTOS = Path(__file__).parent / "data" / "images"
# Real photos: a 3:2 landscape (2268 x 1512) and two small squares (100 x 100, 128 x 128).
REAL = [PHOTOS / "flower_q85_420.jpg", PHOTOS / "pil_sample_rgb.jpg", PHOTOS / "hopper.jpg"]


pytestmark = pytest.mark.usefixtures("own_registry")  # conftest: a registry of its own per test


def save_timm(arch: str, folder: Path, num_classes: int = 5, **overlay) -> tuple[Path, torch.nn.Module]:
    """A random-init timm model saved the way timm publishes models: save_for_hf, safetensors.
    ``overlay``: pretrained_cfg entries (crop_mode, crop_pct) as a published config carries them."""
    from timm.models._hub import save_for_hf

    torch.manual_seed(0)
    kw = {"pretrained_cfg_overlay": overlay} if overlay else {}
    model = timm.create_model(arch, num_classes=num_classes, **kw).eval()
    save_for_hf(model, str(folder), safe_serialization=True)
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    return folder, model


@pytest.fixture(scope="module")
def vit_dir(tmp_path_factory):
    return save_timm("test_vit", tmp_path_factory.mktemp("test_vit"))


@pytest.fixture(scope="module")
def effnet_dir(tmp_path_factory):
    return save_timm("test_efficientnet", tmp_path_factory.mktemp("test_efficientnet"))


SQUASH = {"crop_mode": "squash", "crop_pct": 0.8}  # both edges to floor(160 / 0.8) = 200, crop 160


def normalised(pixels: np.ndarray, prep: Preprocessing) -> torch.Tensor:
    x = torch.from_numpy(pixels).float() / 255
    return (x - torch.tensor(prep.mean).view(3, 1, 1)) / torch.tensor(prep.std).view(3, 1, 1)


# --------------------------------------------------------------------------- timm


@pytest.mark.parametrize("arch, overlay", [("test_vit", {}), ("test_efficientnet", {}), ("test_vit", SQUASH)])
def test_timm_preprocessing_equals_timms_own_eval_transform_on_real_photos(arch, overlay, tmp_path):
    from pipeline.models.imported import import_backbone

    folder, model = save_timm(arch, tmp_path / arch, **overlay)
    import_backbone(folder, "m")
    from pipeline.models.backbones import get_spec

    prep = get_spec("m").preprocessing
    data = timm.data.resolve_model_data_config(model)
    assert prep.crop == data["input_size"][-1] and prep.interpolation == data["interpolation"]
    assert prep.squash == (data["crop_mode"] == "squash")
    transform = timm.data.create_transform(**data, is_training=False)
    portrait = tmp_path / "portrait.png"  # a real photo of the other orientation
    open_rgb(REAL[0]).crop((600, 0, 1600, 1500)).save(portrait)
    for photo in [*REAL, portrait]:
        theirs = transform(open_rgb(photo))
        ours = normalised(load_pixels(photo, Preprocessing.from_dict({**prep.to_dict(), "draft": False})), prep)
        assert ours.shape == theirs.shape
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)


def test_import_records_the_model_and_its_sha256(vit_dir, run_cli):
    from pipeline.core.hashing import sha256_file
    from pipeline.models.imported import registry_path

    folder, _ = vit_dir
    r = run_cli("backbones", "import", folder, "--as", "vit-s")
    assert r.exit_code == 0, r.output
    assert "imported vit-s: timm test_vit, 64-d, 160 px, pooling cls" in r.output
    doc = json.loads(registry_path().read_text())
    assert doc["format"] == "headstart-backbones" and doc["version"] == 1
    e = doc["backbones"]["vit-s"]
    assert e["weights_sha256"] == sha256_file(folder / "model.safetensors")
    assert (e["family"], e["architecture"], e["pooling"], e["image_size"], e["feature_dim"]) == (
        "timm",
        "test_vit",
        "cls",
        160,
        64,
    )
    listed = run_cli("backbones")
    line = next(x for x in listed.output.splitlines() if " vit-s " in x)
    assert line.startswith("ready") and "64-d" in line and "imported timm test_vit" in line
    assert any(x.startswith("ready") and "timm/MODEL" in x for x in listed.output.splitlines())
    assert run_cli("backbones", "remove", "vit-s").exit_code == 0
    assert "vit-s" not in json.loads(registry_path().read_text())["backbones"]


def test_imported_features_equal_the_library_model(vit_dir):
    from pipeline.models.backbones import load_backbone
    from pipeline.models.imported import import_backbone

    folder, model = vit_dir
    import_backbone(folder, "vit-s")
    loaded = load_backbone("vit-s")
    prep = loaded.spec.preprocessing
    pixels = np.stack([load_pixels(p, prep) for p in REAL])
    with torch.no_grad():
        theirs = model.forward_head(model.forward_features(torch.stack([normalised(p, prep) for p in pixels])), True)
        ours = loaded.net(torch.from_numpy(pixels))
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
        # the 5-class head saved with the model is kept as the "ImageNet head" (the weights are real)
        torch.testing.assert_close(
            loaded.net.imagenet_logits(torch.from_numpy(pixels)),
            model(torch.stack([normalised(p, prep) for p in pixels])),
            atol=1e-5,
            rtol=1e-5,
        )


def test_pooling_and_image_size_are_in_the_name_and_the_fingerprint(vit_dir):
    from pipeline.models.backbones import get_spec, load_backbone
    from pipeline.models.imported import import_backbone

    import_backbone(vit_dir[0], "vit-s")
    fps = {}
    for name, dim, crop in [
        ("vit-s", 64, 160),
        ("vit-s@160:mean", 64, 160),
        ("vit-s@160:cls+mean", 128, 160),
        ("vit-s@96", 64, 96),
    ]:
        loaded = load_backbone(name)
        assert (loaded.spec.feature_dim, loaded.spec.preprocessing.crop) == (dim, crop)
        out = loaded.net(torch.zeros(2, 3, crop, crop, dtype=torch.uint8))
        assert out.shape == (2, dim)
        fps[name] = loaded.fingerprint("fp32")
    assert fps["vit-s"].backbone == "vit-s@160:cls"
    assert len({f.backbone for f in fps.values()}) == 4  # every choice is another function
    assert all(not fps["vit-s"].same_function(f) for n, f in fps.items() if n != "vit-s")
    assert get_spec("vit-s@160:cls") is get_spec("vit-s")  # the canonical name resolves to itself
    # a ViT at 96 px: the position embedding was resampled from 160 px by timm's own filter
    assert get_spec("vit-s@96").preprocessing.resize == 101  # floor(96 / 0.95)


def test_image_size_flag_means_name_at_size(vit_dir, small_catalog, tmp_path, run_cli):
    """--image-size S is NAME@S: the same canonical name, so the same fingerprint and cache."""
    from pipeline.cache.store import Cache
    from pipeline.models.backbones import sized_name
    from pipeline.models.imported import import_backbone

    import_backbone(vit_dir[0], "vit-s")
    assert sized_name("vit-s", 96) == "vit-s@96" and sized_name("vit-s@:mean", 96) == "vit-s@96:mean"
    assert sized_name("vit-s@96:cls", 96) == "vit-s@96:cls" and sized_name("vit-s@96", None) == "vit-s@96"
    cache = tmp_path / "f.h5"
    args = ("extract", small_catalog, "--out", cache, "--no-progress", "--workers", "0")
    r = run_cli(*args, "--backbone", "vit-s", "--image-size", "96")
    assert r.exit_code == 0, r.output
    with Cache(cache) as c:
        assert c.fingerprint.backbone == "vit-s@96:cls" and c.fingerprint.preprocessing.crop == 96
    r = run_cli(*args, "--backbone", "vit-s@96:cls")  # the same backbone: nothing new to extract
    assert r.exit_code == 0 and "extracted 0, reused 18" in r.output, r.output
    r = run_cli(*args, "--backbone", "vit-s@64", "--image-size", "96")
    assert r.exit_code == 1
    assert "Error: --backbone vit-s@64 asks for 64 px and --image-size for 96 px; give one of them" in r.output
    r = run_cli(*args, "--backbone", "tiny", "--image-size", "64")
    assert r.exit_code == 1 and "--image-size applies to timm/, hf/, open_clip/ and imported backbones" in r.output
    assert "tiny runs at the 32 px its weights were trained at" in r.output
    r = run_cli(*args, "--backbone", "vit-s", "--image-size", "4")
    assert r.exit_code == 2 and "--image-size" in r.output  # below the 8 px a name accepts too
    help_text = run_cli("extract", "--help").output
    assert "--image-size" in help_text and "at most 224" in help_text and "518" in help_text
    r = run_cli("demo", "--backbone", "tiny", "--image-size", "64", "--out", tmp_path / "demo", "--no-progress")
    assert r.exit_code == 1 and "tiny runs at the 32 px" in r.output  # demo passes it on to extract


def test_cnn_pooling_choices_are_checked(effnet_dir):
    from pipeline.errors import BackboneError
    from pipeline.models.backbones import get_spec
    from pipeline.models.imported import import_backbone

    import_backbone(effnet_dir[0], "effnet")
    assert get_spec("effnet").name == "effnet@160:mean"
    assert get_spec("effnet@128").preprocessing.crop == 128
    with pytest.raises(BackboneError, match=r"pooling 'cls' needs a token model \(a ViT\)"):
        get_spec("effnet@160:cls")
    with pytest.raises(BackboneError, match="unknown pooling 'max'"):
        get_spec("effnet@160:max")


def test_layer_groups_find_vit_blocks_and_cnn_stages(vit_dir, effnet_dir):
    from pipeline.finetune.layers import backbone_units, layer_groups
    from pipeline.models.backbones import load_backbone
    from pipeline.models.imported import import_backbone

    import_backbone(vit_dir[0], "vit-s")
    import_backbone(effnet_dir[0], "effnet")
    vit = load_backbone("vit-s").net.body
    names = [u.name for u in backbone_units(vit)]
    n_blocks = len(vit.model.blocks)
    assert [f"model.blocks.{i}" for i in range(n_blocks)] == [n for n in names if n.startswith("model.blocks.")]
    assert names.index("model.blocks.0") > names.index("model.patch_embed")  # input to output
    cnn = load_backbone("effnet").net.body
    units = [u.name for u in backbone_units(cnn)]
    assert any(n.startswith("model.blocks.") for n in units) and units[0].startswith("model.conv_stem")
    groups = layer_groups(vit, torch.nn.Linear(64, 3), stages=3)
    assert groups.n_backbone == 3
    top = groups.groups[1]  # the top group holds the last block, so it is unfrozen first
    assert any(u.name == f"model.blocks.{n_blocks - 1}" or u.name == "model.norm" for u in top)


def test_imported_timm_model_runs_the_whole_chain_native_and_onnx(vit_dir, small_catalog, tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    assert run_cli("backbones", "import", vit_dir[0], "--as", "vit-s", "--image-size", "64").exit_code == 0
    cache, head = tmp_path / "f.h5", tmp_path / "head"
    r = run_cli("extract", small_catalog, "--out", cache, "--backbone", "vit-s", "--no-progress", "--workers", "0")
    assert r.exit_code == 0, r.output
    r = run_cli("fit-head", cache, "--out", head, "--c", "1", "--near-duplicate-threshold", "1")
    assert r.exit_code == 0, r.output
    assert json.loads((head / "head.json").read_text())["fingerprint"]["backbone"] == "vit-s@64:cls"
    probs = {}
    for fmt in ("native", "onnx"):
        model = tmp_path / fmt
        r = run_cli("export", head, "--out", model, "--format", fmt)
        assert r.exit_code == 0, r.output
        manifest = json.loads((model / "manifest.json").read_text())
        assert manifest["backbone"]["name"] == "vit-s@64:cls" and manifest["preprocessing"]["crop"] == 64
        assert manifest["parity"]["max_abs_diff"] < 1e-4
        out = tmp_path / f"{fmt}.csv"
        r = run_cli("predict", model, small_catalog, "--out", out, "--workers", "0")
        assert r.exit_code == 0, r.output
        with out.open() as f:
            rows = sorted(csv.DictReader(f), key=lambda row: row["path"])
        probs[fmt] = np.array([float(row["probability"]) for row in rows])
        assert all(row["error"] == "" for row in rows)
    np.testing.assert_allclose(probs["onnx"], probs["native"], atol=1e-4)


# --------------------------------------------------------------------------- offline, extras


def _fake_hf_cache(root: Path, repo_id: str, folder: Path) -> None:
    """The Hugging Face cache's own layout, as a download leaves it: refs/main names the
    snapshot, snapshots/REV/ holds the files."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    for f in folder.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


def test_library_name_uses_the_hf_cache_and_fails_fast_without_it(vit_dir, tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    from pipeline.errors import BackboneError
    from pipeline.models.backbones import get_spec, load_backbone

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    t = time.monotonic()
    with pytest.raises(BackboneError) as e:
        load_backbone("timm/test_vit.r160_in1k")
    assert time.monotonic() - t < 20  # no network wait, and no model built first (timm's import is most of it)
    assert "are not on this machine" in str(e.value) and "headstart backbones import DIR --as" in str(e.value)
    _fake_hf_cache(tmp_path / "hub", "timm/test_vit.r160_in1k", vit_dir[0])
    from pipeline.models import hub

    hub.forget()
    loaded = load_backbone("timm/test_vit.r160_in1k")
    assert loaded.spec.name == "timm/test_vit.r160_in1k@160:cls"
    assert get_spec("timm/test_vit.r160_in1k@160:cls") is loaded.spec
    from pipeline.models.imported import cached_library_models

    assert [n for n, _, _ in cached_library_models()] == ["timm/test_vit.r160_in1k"]


def test_missing_library_names_the_extra(monkeypatch, run_cli, tmp_path):
    monkeypatch.setitem(sys.modules, "timm", None)  # as if the extra were not installed
    r = run_cli("extract", tmp_path, "--backbone", "timm/resnet50.a1_in1k", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1
    assert "Error: timm backbones need the timm library" in r.output
    assert "pip install 'headstart[timm]'" in r.output


def test_unknown_and_bad_names_are_errors(run_cli, tmp_path):
    r = run_cli("extract", tmp_path, "--backbone", "nosuch", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and "headstart backbones import DIR --as NAME" in r.output
    r = run_cli("extract", tmp_path, "--backbone", "nosuch@abc", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and "image size after '@' must be a number" in r.output
    r = run_cli("backbones", "import", tmp_path, "--as", "x")
    assert r.exit_code == 1 and "has no config.json" in r.output
    assert "Traceback" not in r.output


def test_importing_pipeline_imports_no_model_library():
    code = (
        "import sys, pipeline.cli, pipeline.models.backbones, pipeline.models.hub, pipeline.models.imported;"
        "print([m for m in ('timm', 'transformers', 'open_clip', 'huggingface_hub') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- Hugging Face transformers


def save_hf(kind: str, folder: Path) -> tuple[Path, torch.nn.Module]:
    """A small random transformers model and its image processor, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "dinov2":
        config = transformers.Dinov2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=56,
            patch_size=14,
        )
        model = transformers.Dinov2Model(config)
        processor = transformers.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56})
    elif kind == "vit":
        config = transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=64,
            patch_size=16,
        )
        model = transformers.ViTModel(config)
        processor = transformers.ViTImageProcessor(size={"height": 64, "width": 64})
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], image_size=64)
        model = transformers.ConvNextModel(config)
        processor = transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    model.eval().save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return folder, model


@pytest.mark.parametrize(
    "kind, dim, crop, pool", [("dinov2", 32, 56, "cls"), ("vit", 32, 64, "cls"), ("convnext", 32, 64, "mean")]
)
def test_hf_import_features_and_preprocessing_equal_the_library(kind, dim, crop, pool, tmp_path, run_cli):
    transformers = pytest.importorskip("transformers")
    from pipeline.models.backbones import load_backbone

    folder, model = save_hf(kind, tmp_path / kind)
    r = run_cli("backbones", "import", folder, "--as", kind)
    assert r.exit_code == 0, r.output
    assert f"imported {kind}: hf" in r.output and f"{dim}-d, {crop} px, pooling {pool}" in r.output
    loaded = load_backbone(kind)
    prep = loaded.spec.preprocessing
    processor = transformers.AutoImageProcessor.from_pretrained(str(folder), backend="pil")
    assert prep.squash == (kind == "vit")  # ViTImageProcessor squashes to its square: so do we
    for photo in REAL:
        theirs = torch.as_tensor(np.asarray(processor(open_rgb(photo), return_tensors="np")["pixel_values"][0]))
        ours = normalised(load_pixels(photo, Preprocessing.from_dict({**prep.to_dict(), "draft": False})), prep)
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)
    pixels = np.stack([load_pixels(p, prep) for p in REAL])
    with torch.no_grad():
        out = model(pixel_values=torch.stack([normalised(p, prep) for p in pixels]))
        theirs = out.pooler_output if kind == "convnext" else out.last_hidden_state[:, 0]
        torch.testing.assert_close(loaded.net(torch.from_numpy(pixels)), theirs, atol=1e-5, rtol=1e-5)


def _processor(kind: str):
    transformers = pytest.importorskip("transformers")
    if kind == "vit":  # squash to 64 x 64, bilinear, no crop
        return transformers.ViTImageProcessor(size={"height": 64, "width": 64}, resample=2)
    if kind == "siglip":  # squash to 64 x 64, bicubic, mean = std = 0.5
        return transformers.SiglipImageProcessor(size={"height": 64, "width": 64})
    if kind == "deit":  # squash to 72 x 72, then centre-crop 64
        return transformers.DeiTImageProcessor(size={"height": 72, "width": 72}, crop_size={"height": 64, "width": 64})
    if kind == "bit":  # short side to 64, centre-crop 56 (DINOv2, CLIP)
        return transformers.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56})
    if kind == "convnext":  # short side to 64 / 0.875, centre-crop 64
        return transformers.ConvNextImageProcessor(size={"shortest_edge": 64}, crop_pct=0.875)
    return transformers.ConvNextImageProcessor(size={"shortest_edge": 384})  # 384 and up: squash, no crop


@pytest.mark.parametrize(
    "kind, squash, resize, crop",
    [
        ("vit", True, 64, 64),
        ("siglip", True, 64, 64),
        ("deit", True, 72, 64),
        ("bit", False, 64, 56),
        ("convnext", False, 73, 64),
        ("convnext384", True, 384, 384),
    ],
)
def test_hf_processor_recipe_is_recorded_and_gives_the_librarys_tensor(kind, squash, resize, crop, tmp_path):
    """What each image processor does to a real photo of another aspect ratio (2268 x 1512,
    and a portrait one) is what the recorded preprocessing does: squash where the processor
    squashes (it used to be mapped to a centre crop), crop where it crops."""
    transformers = pytest.importorskip("transformers")
    from pipeline.models.hf_family import preprocessing

    _processor(kind).save_pretrained(str(tmp_path))
    prep, size = preprocessing(tmp_path, None, vit=kind != "convnext384")
    assert (prep.squash, prep.resize, prep.crop, size) == (squash, resize, crop, crop)
    processor = transformers.AutoImageProcessor.from_pretrained(str(tmp_path), backend="pil")
    portrait = tmp_path / "portrait.png"  # a real photo of the other orientation (1000 x 1500)
    open_rgb(REAL[0]).crop((600, 0, 1600, 1500)).save(portrait)
    for photo in (REAL[0], portrait):  # not square: a squash and a crop give different pixels
        theirs = torch.as_tensor(np.asarray(processor(open_rgb(photo), return_tensors="np")["pixel_values"][0]))
        ours = normalised(load_pixels(photo, Preprocessing.from_dict({**prep.to_dict(), "draft": False})), prep)
        torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)
        flipped = Preprocessing.from_dict({**prep.to_dict(), "draft": False, "squash": not squash})
        assert (normalised(load_pixels(photo, flipped), prep) - theirs).abs().max() > 0.1  # the test can fail


def test_hf_processor_shapes_headstart_cannot_make_are_errors(tmp_path):
    transformers = pytest.importorskip("transformers")
    from pipeline.errors import BackboneError
    from pipeline.models.hf_family import preprocessing

    transformers.ViTImageProcessor(size={"height": 64, "width": 96}).save_pretrained(str(tmp_path / "a"))
    with pytest.raises(BackboneError, match="resizes to 64 x 96; headstart resizes to a square only"):
        preprocessing(tmp_path / "a", None, vit=True)
    transformers.CLIPImageProcessor(size={"shortest_edge": 64}, do_center_crop=False).save_pretrained(
        str(tmp_path / "b")
    )
    with pytest.raises(BackboneError, match="resizes the short side to 64 px and does not crop"):
        preprocessing(tmp_path / "b", None, vit=True)


def test_hf_pooling_size_and_the_chain(small_catalog, tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    from pipeline.finetune.layers import backbone_units
    from pipeline.models.backbones import load_backbone

    folder, _ = save_hf("dinov2", tmp_path / "dinov2")
    assert run_cli("backbones", "import", folder, "--as", "d2", "--pooling", "cls+mean").exit_code == 0
    assert load_backbone("d2").spec.name == "d2@56:cls+mean" and load_backbone("d2").spec.feature_dim == 64
    spec = load_backbone("d2@84:mean").spec
    assert (spec.feature_dim, spec.preprocessing.crop, spec.preprocessing.resize) == (32, 84, 96)
    units = [u.name for u in backbone_units(load_backbone("d2").net.body)]
    layers = [u for u in units if u.startswith("model.encoder.layer.")]  # 2 layers: split finer, in order
    assert layers[0].startswith("model.encoder.layer.0") and layers[-1].startswith("model.encoder.layer.1")
    assert units.index(layers[0]) > max(i for i, u in enumerate(units) if u.startswith("model.embeddings"))
    cache, head = tmp_path / "f.h5", tmp_path / "head"
    r = run_cli("extract", small_catalog, "--out", cache, "--backbone", "d2", "--no-progress", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert run_cli("fit-head", cache, "--out", head, "--c", "1", "--near-duplicate-threshold", "1").exit_code == 0
    for fmt in ("native", "onnx"):
        r = run_cli("export", head, "--out", tmp_path / fmt, "--format", fmt)
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / fmt / "manifest.json").read_text())["parity"]["max_abs_diff"] < 1e-4
    r = run_cli("extract", small_catalog, "--out", cache, "--backbone", "d2@56:cls", "--no-progress", "--workers", "0")
    assert r.exit_code == 1 and "backbone" in r.output  # another pooling is another backbone: refused


def test_hf_name_not_in_the_cache_fails_fast(tmp_path, monkeypatch, run_cli):
    pytest.importorskip("transformers")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    r = run_cli("extract", tmp_path, "--backbone", "hf/facebook/dinov2-small", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1
    assert "facebook/dinov2-small is not in the Hugging Face cache on this machine" in r.output
    assert "headstart backbones import DIR --as dinov2-small" in r.output


# --------------------------------------------------------------------------- open_clip

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def save_open_clip(folder: Path, resize_mode: str = "shortest", **text_cfg) -> Path:
    """open_clip's hub layout (push_to_hf_hub.save_for_hf): open_clip_config.json + safetensors.
    ``text_cfg``: entries added to the text tower's config (``hf_tokenizer_name``, as SigLIP's)."""
    open_clip = pytest.importorskip("open_clip")
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    preprocess = {
        "size": 32,
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": resize_mode,
    }
    model_cfg = {**TINY_CLIP, "text_cfg": {**TINY_CLIP["text_cfg"], **text_cfg}}
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_open_clip_image_tower_equals_the_library(tmp_path, run_cli):
    open_clip = pytest.importorskip("open_clip")
    from pipeline.models.backbones import load_backbone

    folder = save_open_clip(tmp_path / "clip")
    r = run_cli("backbones", "import", folder, "--as", "clip")
    assert r.exit_code == 0, r.output
    assert "imported clip: open_clip" in r.output and "16-d, 32 px, pooling default" in r.output
    loaded = load_backbone("clip")
    assert loaded.spec.name == "clip@32:default"
    # open_clip's own loader of the same folder, and its own eval transform
    model, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    prep = loaded.spec.preprocessing
    for photo in REAL:
        ours = normalised(load_pixels(photo, Preprocessing.from_dict({**prep.to_dict(), "draft": False})), prep)
        torch.testing.assert_close(ours, transform(open_rgb(photo)), atol=2e-6, rtol=0)
    pixels = torch.from_numpy(np.stack([load_pixels(p, prep) for p in REAL]))
    with torch.no_grad():
        theirs = model.encode_image(torch.stack([normalised(p.numpy(), prep) for p in pixels]))
        torch.testing.assert_close(loaded.net(pixels), theirs, atol=1e-5, rtol=1e-5)
    r = run_cli("extract", tmp_path, "--backbone", "clip@64", "--out", tmp_path / "f.h5")
    assert r.exit_code == 1 and "runs at 32 px" in r.output


def test_open_clip_squash_resize_mode_is_honoured(tmp_path):
    """open_clip's SigLIP tags resize with 'squash' (no crop): read, recorded, the library's pixels."""
    open_clip = pytest.importorskip("open_clip")
    from pipeline.models.backbones import get_spec
    from pipeline.models.imported import import_backbone

    folder = save_open_clip(tmp_path / "clip", resize_mode="squash")
    import_backbone(folder, "sq")
    prep = get_spec("sq").preprocessing
    assert (prep.squash, prep.resize, prep.crop) == (True, 32, 32)
    _, _, transform = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    theirs = transform(open_rgb(REAL[0]))  # 3:2: squashing and cropping differ
    ours = normalised(load_pixels(REAL[0], Preprocessing.from_dict({**prep.to_dict(), "draft": False})), prep)
    torch.testing.assert_close(ours, theirs, atol=2e-6, rtol=0)


def test_open_clip_chain_exports_with_parity(small_catalog, tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    assert run_cli("backbones", "import", save_open_clip(tmp_path / "clip"), "--as", "clip").exit_code == 0
    cache, head = tmp_path / "f.h5", tmp_path / "head"
    r = run_cli("extract", small_catalog, "--out", cache, "--backbone", "clip", "--no-progress", "--workers", "0")
    assert r.exit_code == 0, r.output
    assert run_cli("fit-head", cache, "--out", head, "--c", "1", "--near-duplicate-threshold", "1").exit_code == 0
    for fmt in ("native", "onnx"):
        r = run_cli("export", head, "--out", tmp_path / fmt, "--format", fmt)
        assert r.exit_code == 0, r.output
        assert json.loads((tmp_path / fmt / "manifest.json").read_text())["parity"]["max_abs_diff"] < 1e-4
