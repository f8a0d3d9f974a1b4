"""The ONNX model runs without headstart: README's "Deploying" script, taken from the README
itself, runs in a separate Python process in which ``pipeline`` (and torch) cannot be imported,
and gives the same labels and probabilities as ``headstart predict``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExportConfig, ExtractConfig, FitHeadConfig
from pipeline.data import SAMPLE_CATALOG
from pipeline.export import export

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- deploy-snippet:"

# Runs the snippet as __main__ with headstart and torch made unimportable, then proves neither
# was imported.
RUNNER = """
import runpy, sys
sys.modules["pipeline"] = None
sys.modules["torch"] = None
snippet, *argv = sys.argv[1:]
sys.argv = ["deploy.py", *argv]
runpy.run_path(snippet, run_name="__main__")
loaded = [m for m, mod in sys.modules.items() if mod is not None and m.split(".")[0] in ("pipeline", "torch")]
assert not loaded, loaded
"""


def readme_snippet() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("```python\n", text.index(MARKER)) + len("```python\n")
    return text[start : text.index("```\n", start)]


def run_snippet(tmp_path: Path, model: Path, images: list[Path]) -> list[dict]:
    (tmp_path / "deploy.py").write_text(readme_snippet(), encoding="utf-8")
    (tmp_path / "runner.py").write_text(RUNNER, encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-I", "runner.py", "deploy.py", str(model), *map(str, images)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def headstart_predict(run_cli, model: Path, images: list[Path], out: Path) -> list[dict]:
    r = run_cli(
        "predict",
        model,
        *images,
        "--out",
        out,
        "--precision",
        "fp32",
        "--top-k",
        "99",
        "--no-progress",
        "--workers",
        "0",
    )
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert not any(row["error"] for row in rows)
    return rows


def compare(deployed: list[dict], predicted: list[dict], classes: list[str], atol: float) -> None:
    assert [d["path"] for d in deployed] == [p["path"] for p in predicted]
    for d, p in zip(deployed, predicted, strict=True):
        assert d["label"] == p["label"], d["path"]
        want = np.array([dict((t["label"], t["probability"]) for t in p["top_k"])[c] for c in classes])
        np.testing.assert_allclose(d["probabilities"], want, atol=atol, err_msg=d["path"])


@pytest.fixture
def odd_images(tmp_path) -> list[Path]:
    """Real photos in the formats the snippet must decode exactly like headstart."""
    import sklearn.datasets

    china = Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"
    d = tmp_path / "odd"
    d.mkdir()
    shutil.copy(china, d / "colour_640.jpg")  # large JPEG: DCT-domain draft decoding applies
    with Image.open(china) as img:
        small = img.resize((160, 107))
        exif = Image.Exif()
        exif[0x0112] = 6  # rotated 90 degrees
        small.save(d / "exif_rotated.jpg", exif=exif)
        img.convert("CMYK").save(d / "cmyk.jpg")
        img.convert("L").save(d / "grey.jpg")
        rgba = small.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(small.size))
        rgba.save(d / "cutout.png")
        pal = small.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
        pal.info["transparency"] = 0
        pal.save(d / "palette.png", transparency=0)
        small.crop((0, 0, 100, 60)).save(d / "wide.png")
    return [*sorted(d.iterdir()), *sorted((SAMPLE_CATALOG / "test" / "bag").glob("*.png"))[:2]]


def test_readme_snippet_matches_headstart_predict_tiny(tiny_head, odd_images, tmp_path, run_cli):
    native = export(ExportConfig(head=str(tiny_head), out=str(tmp_path / "native")))
    onnx = export(ExportConfig(head=str(tiny_head), out=str(tmp_path / "onnx"), format="onnx"))
    classes = json.loads((onnx / "manifest.json").read_text(encoding="utf-8"))["class_names"]
    deployed = run_snippet(tmp_path, onnx, odd_images)
    # Native is pinned to fp32 (--precision fp32 in headstart_predict), ONNX is fp32. Measured (fp32 / bf16
    # head features): max |dp| 6e-8, smallest top-2 gap 0.0039 / 0.0040: equal labels are 10^4 x safe.
    compare(deployed, headstart_predict(run_cli, native, odd_images, tmp_path / "n.jsonl"), classes, atol=1e-5)
    # headstart predict on the ONNX directory itself (onnxruntime inside headstart) agrees too.
    compare(deployed, headstart_predict(run_cli, onnx, odd_images, tmp_path / "o.jsonl"), classes, atol=1e-6)


def test_snippet_refuses_a_tampered_model(tiny_head, tmp_path):
    onnx = export(ExportConfig(head=str(tiny_head), out=str(tmp_path / "onnx"), format="onnx"))
    data = (onnx / "model.onnx").read_bytes()
    (onnx / "model.onnx").write_bytes(data[:-10])
    (tmp_path / "deploy.py").write_text(readme_snippet(), encoding="utf-8")
    r = subprocess.run(
        [sys.executable, "-I", "deploy.py", str(onnx), "x.jpg"], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 1 and "model.onnx does not match manifest.json" in r.stderr


def test_readme_snippet_on_real_efficientnet_lite0(tmp_path, run_cli, odd_images):
    """Real network: Lite0 features of 12 catalog photos, a head, ONNX export whose parity
    check compares onnxruntime with PyTorch on the real network, then the README script vs
    ``headstart predict`` on odd real photos. (Script vs *native* predict: the tiny test above;
    native vs ONNX on Lite0: the parity check, asserted here.)"""
    from conftest import copy_sample_photos

    from pipeline.extract import extract
    from pipeline.fit_head import fit_head

    images = copy_sample_photos(tmp_path / "train", per_class=4)
    extract(ExtractConfig(images=str(images), out=str(tmp_path / "f.h5"), progress=False, workers=0))
    fit_head(
        FitHeadConfig(cache=str(tmp_path / "f.h5"), out=str(tmp_path / "head"), c=0.1, near_duplicate_threshold=None)
    )
    onnx = export(ExportConfig(head=str(tmp_path / "head"), out=str(tmp_path / "onnx"), format="onnx"))
    manifest = json.loads((onnx / "manifest.json").read_text(encoding="utf-8"))
    parity = manifest["parity"]
    print(f"Lite0 ONNX parity: max |dp| {parity['max_abs_diff']:.2e} on {parity['n_images']} images")
    # Parity compares fp32 PyTorch with fp32 onnxruntime whatever the features' precision: measured
    # 3.6e-7 / 2.4e-7 (fp32 / bf16 features), 280 x under 1e-4; snippet vs predict (both onnxruntime): |dp| 0.
    assert manifest["backbone"]["name"] == "efficientnet_lite0" and parity["max_abs_diff"] < 1e-4
    photos = [*odd_images, *sorted((SAMPLE_CATALOG / "test" / "sneaker").glob("*.png"))[:2]]
    deployed = run_snippet(tmp_path, onnx, photos)
    compare(deployed, headstart_predict(run_cli, onnx, photos, tmp_path / "o.jsonl"), manifest["class_names"], 1e-5)


def test_readme_snippet_answers_every_attribute_as_headstart_predict(tmp_path, run_cli):
    """A model with further attributes (a single-label finish, multi-label tags): the snippet's
    answer for each equals headstart predict's."""
    from conftest import copy_sample_photos

    from pipeline.config import ExtractConfig, FitHeadConfig
    from pipeline.extract import extract
    from pipeline.fit_head import fit_head

    images = copy_sample_photos(tmp_path / "images", 6)
    lines = ["path,category,finish,tags"]
    for i, p in enumerate(sorted(images.rglob("*.png"))):
        tags = ";".join(t for t, on in (("footwear", p.parent.name == "sneaker"), ("sale", i % 3 == 0)) if on)
        lines.append(f"{p.relative_to(tmp_path).as_posix()},{p.parent.name},{'matte' if i % 2 else 'glossy'},{tags}")
    (tmp_path / "catalog.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    cache = tmp_path / "f.h5"
    extract(ExtractConfig(images=str(tmp_path / "catalog.csv"), out=str(cache), backbone="tiny", progress=False,
                          workers=0))  # fmt: skip
    fit_head(FitHeadConfig(cache=str(cache), out=str(tmp_path / "head"), c=0.01, near_duplicate_threshold=None))
    onnx = export(ExportConfig(head=str(tmp_path / "head"), out=str(tmp_path / "onnx"), format="onnx"))
    photos = sorted(images.rglob("*.png"))[::3]
    deployed = run_snippet(tmp_path, onnx, photos)
    predicted = headstart_predict(run_cli, onnx, photos, tmp_path / "o.jsonl")
    for d, p in zip(deployed, predicted, strict=True):
        assert d["finish"] == p["attributes"]["finish"]["label"], d["path"]
        assert d["tags"] == p["attributes"]["tags"]["labels"], d["path"]


def test_readme_snippet_squashes_like_headstart_predict(tiny_head, odd_images, tmp_path, run_cli):
    """A model whose preprocessing squashes (Hugging Face ViT/SigLIP processors): the snippet and
    headstart resize both sides to `resize` the same way. The manifest is edited in place, the
    only road to a squashing tiny model; model.onnx, whose checksum is checked, is untouched."""
    onnx = export(ExportConfig(head=str(tiny_head), out=str(tmp_path / "onnx"), format="onnx"))
    path = onnx / "manifest.json"
    manifest = json.loads(path.read_text(encoding="utf-8"))
    manifest["preprocessing"]["squash"] = True
    path.write_text(json.dumps(manifest), encoding="utf-8")
    deployed = run_snippet(tmp_path, onnx, odd_images)
    compare(deployed, headstart_predict(run_cli, onnx, odd_images, tmp_path / "o.jsonl"), manifest["class_names"], 1e-6)
    manifest["preprocessing"]["squash"] = False  # the check can fail: cropping gives other numbers
    path.write_text(json.dumps(manifest), encoding="utf-8")
    cropped = headstart_predict(run_cli, onnx, odd_images, tmp_path / "c.jsonl")
    with pytest.raises(AssertionError):
        compare(deployed, cropped, manifest["class_names"], 1e-4)
