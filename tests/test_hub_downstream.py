"""Everything downstream of extract with library backbones: finetune (layer groups found in a
ViT's blocks and a CNN's stages, trained, exported with parity, predicted), `similar` (a query
outside the cache embedded by the imported backbone) and `audit`. Small random-weight timm and
Hugging Face models, saved in their libraries' own layouts and imported offline."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from test_hub_backbones import save_hf, save_timm

from pipeline.cache.store import Cache

pytest.importorskip("timm")

CPU = ("--device", "cpu", "--workers", "0")


pytestmark = pytest.mark.usefixtures("own_registry")  # conftest: a registry of its own per test


def chain_to_head(run_cli, folder: Path, name: str, images: Path, tmp_path: Path, *extra: str) -> tuple[Path, Path]:
    r = run_cli("backbones", "import", folder, "--as", name, *extra)
    assert r.exit_code == 0, r.output
    cache, head = tmp_path / "f.h5", tmp_path / "head"
    r = run_cli("extract", images, "--out", cache, "--backbone", name, "--no-progress", "--precision", "fp32", *CPU)
    assert r.exit_code == 0, r.output
    r = run_cli("fit-head", cache, "--out", head, "--c", "1", "--near-duplicate-threshold", "1", "--device", "cpu")
    assert r.exit_code == 0, r.output
    return cache, head


def finetune_export_predict(run_cli, images: Path, head: Path, tmp_path: Path, formats: tuple[str, ...]) -> dict:
    ft = tmp_path / "ft"
    r = run_cli(
        "finetune", images, "--head", head, "--out", ft, "--epochs", "2", "--batch-size", "6", "--stages", "3",
        "--unfreeze-every", "0", "--lr", "3e-4", "--init", "random", "--precision", "fp32", "--no-progress", *CPU,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    doc = json.loads((ft / "finetune.json").read_text())
    # from a random head, a trained epoch beats the start: model.pt holds trained weights
    assert doc["best_epoch"] >= 1, doc["history"]
    for fmt in formats:
        model = tmp_path / f"model-{fmt}"
        r = run_cli("export", ft, "--out", model, "--format", fmt)
        assert r.exit_code == 0, r.output
        assert json.loads((model / "manifest.json").read_text())["parity"]["max_abs_diff"] < 1e-4
        out = tmp_path / f"{fmt}.csv"
        r = run_cli("predict", model, images, "--out", out, *CPU)
        assert r.exit_code == 0, r.output
        with out.open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 18 and all(row["error"] == "" for row in rows)
    return doc


def moved(ft_dir: Path, backbone: str, keys: tuple[str, ...]) -> None:
    """Fine-tuning reached the backbone: with every group unfrozen (--unfreeze-every 0), the
    weights of the top and the bottom group both differ from the imported ones."""
    import torch

    from pipeline.models.backbones import load_backbone

    tuned = torch.load(ft_dir / "model.pt", map_location="cpu", weights_only=True)
    start = load_backbone(backbone).net.body.state_dict()
    for key in keys:
        assert not torch.equal(tuned[f"net.body.{key}"], start[key]), key


@pytest.mark.parametrize("arch", ["test_vit", "test_efficientnet"])
def test_finetune_a_timm_vit_and_cnn_end_to_end(arch, small_catalog, tmp_path, run_cli):
    pytest.importorskip("onnxruntime")
    folder, _ = save_timm(arch, tmp_path / arch)
    _, head = chain_to_head(run_cli, folder, "m", small_catalog, tmp_path, "--image-size", "64")
    # ONNX for the CNN (BatchNorm, trained); a ViT's ONNX parity is test_hub_backbones' chain test
    formats = ("native",) if arch == "test_vit" else ("native", "onnx")
    doc = finetune_export_predict(run_cli, small_catalog, head, tmp_path, formats)
    groups = doc["training"]["layer_groups"]
    assert len(groups) == 4 and groups[0].startswith("0: head")
    if arch == "test_vit":  # the top group ends at the final norm; the blocks are split among groups
        assert groups[1].startswith("1: model.blocks.4 .. model.norm")
        assert groups[3].startswith("3: model(own) .. model.blocks.0")  # class token, patch embedding, block 0
        moved(tmp_path / "ft", "m@64:cls", ("model.blocks.4.attn.qkv.weight", "model.patch_embed.proj.weight"))
    else:
        assert groups[3].startswith("3: model.conv_stem")
        moved(tmp_path / "ft", "m@64:mean", ("model.conv_head.weight", "model.conv_stem.weight"))


def test_hf_dinov2_similar_and_audit(small_catalog, tmp_path, run_cli):
    """An imported transformers ViT through similar (a query not in the cache is embedded by
    the imported backbone, with the cache's preprocessing) and audit."""
    pytest.importorskip("transformers")
    from PIL import Image

    folder, _ = save_hf("dinov2", tmp_path / "dinov2")
    cache, head = chain_to_head(run_cli, folder, "d2", small_catalog, tmp_path, "--pooling", "cls+mean")
    query = sorted((small_catalog / "sneaker").glob("*.png"))[2]
    copy = tmp_path / "query.bmp"  # other bytes, same pixels: not in the cache by hash
    Image.open(query).save(copy)
    r = run_cli("similar", copy, "--cache", cache, "-k", "3", "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    matches = json.loads(r.output)
    assert matches[0]["path"] == f"sneaker/{query.name}" and matches[0]["similarity"] > 0.999
    with Cache(cache) as c:  # brute force over the cached rows agrees on the order
        X, paths = c.features().astype(np.float64), c.paths
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    order = np.argsort(-(X @ X[paths.index(f"sneaker/{query.name}")]), kind="stable")[:3]
    assert [m["path"] for m in matches] == [paths[i] for i in order]

    r = run_cli(
        "audit", cache, "--head", head, "--out", tmp_path / "audit", "--folds", "3", "--device", "cpu", "--no-progress"
    )
    assert r.exit_code == 0, r.output
    for name in ("label_issues.csv", "overlaps.csv", "duplicates.csv", "outliers.csv", "report.html"):
        assert (tmp_path / "audit" / name).is_file(), name
    with (tmp_path / "audit" / "label_issues.csv").open() as f:
        assert {row["path"] for row in csv.DictReader(f)} <= set(paths)


def test_hf_dinov2_finetune(small_catalog, tmp_path, run_cli):
    pytest.importorskip("transformers")
    folder, _ = save_hf("dinov2", tmp_path / "dinov2")
    _, head = chain_to_head(run_cli, folder, "d2", small_catalog, tmp_path, "--pooling", "cls+mean")
    doc = finetune_export_predict(run_cli, small_catalog, head, tmp_path, ("native",))
    groups = doc["training"]["layer_groups"]
    # input to output: the embeddings at the bottom, the encoder's layers, its final norm on top
    assert groups[1].split(" (")[0].endswith(".. model.layernorm") and groups[3].startswith("3: model.embeddings")
    assert doc["fingerprint"]["backbone"] == "d2@56:cls+mean"
