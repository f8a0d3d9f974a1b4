"""predict for real use: inputs (files, folders, globs, lists, stdin), CSV / JSON Lines,
top-k, unknown threshold, embeddings, error rows, the Python API."""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExportConfig
from pipeline.data.inputs import expand_inputs
from pipeline.errors import InputError
from pipeline.export import export
from pipeline.predict import Predictor

CLASSES = ["bag", "sneaker", "trouser"]


@pytest.fixture(scope="module")
def model(tiny_head, tmp_path_factory) -> Path:
    return export(ExportConfig(head=str(tiny_head), out=str(tmp_path_factory.mktemp("pred") / "model")))


@pytest.fixture(scope="module")
def images(tiny_head) -> Path:
    return tiny_head.parent / "images"


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _run(run_cli, model, *args, **kw):
    r = run_cli("predict", model, *args, "--no-progress", "--workers", "0", **kw)
    assert r.exit_code == 0, r.output
    return r


def test_inputs_files_folders_globs_lists(images, tmp_path):
    bags = sorted((images / "bag").glob("*.png"))
    listing = tmp_path / "list.txt"
    listing.write_text(f"# photos\n{bags[0]}\n\n{os.path.relpath(bags[1], tmp_path)}\n", encoding="utf-8")
    table = tmp_path / "list.csv"
    table.write_text(f"label,path\nbag,{bags[2]}\n", encoding="utf-8")
    got = expand_inputs(
        [str(bags[3]), str(images / "trouser"), str(images / "sn*" / "*.png"), str(listing), str(table)]
    )
    assert got[0] == bags[3]
    assert got[1:7] == sorted((images / "trouser").glob("*.png"))
    assert got[7:13] == sorted((images / "sneaker").glob("*.png"))
    assert [p.resolve() for p in got[13:]] == [bags[0], bags[1], bags[2]]
    stdin = io.StringIO(f"{bags[4]}\n{tmp_path / 'gone.jpg'}\n")
    assert expand_inputs(["-"], stdin) == [bags[4], tmp_path / "gone.jpg"]  # missing: kept, becomes a row


def test_inputs_that_are_mistakes(tmp_path):
    with pytest.raises(InputError, match=r"nope\.jpg does not exist"):
        expand_inputs([str(tmp_path / "nope.jpg")])
    with pytest.raises(InputError, match=r"no files match '.*\*\.webp'"):
        expand_inputs([str(tmp_path / "*.webp")])
    with pytest.raises(InputError, match="no images found"):
        expand_inputs([str(tmp_path)])


def test_csv_with_top_k_unknown_and_error_rows(model, images, tmp_path, run_cli):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "p.csv"
    r = _run(run_cli, model, images / "bag", bad, "--out", out, "--top-k", "2")
    assert "7 predictions, 1 file could not be read" in r.output
    rows = _csv(out)
    assert list(rows[0]) == ["path", "label", "best_guess", "probability", "label_2", "probability_2", "error"]
    good, broken = rows[:6], rows[6]
    assert all(row["label"] in CLASSES and row["error"] == "" for row in good)
    assert all(float(row["probability"]) >= float(row["probability_2"]) for row in good)
    assert broken["path"] == str(bad) and broken["label"] == "" and "Truncated File Read" in broken["error"]

    # A threshold between the top-1 probabilities: exactly the rows below it become "unknown".
    top1 = sorted(float(row["probability"]) for row in good)
    threshold = (top1[0] + top1[-1]) / 2
    assert top1[0] < threshold < top1[-1]
    out2 = tmp_path / "u.csv"
    r = _run(run_cli, model, images / "bag", "--out", out2, "--unknown-threshold", f"{threshold}")
    n_below = sum(p < threshold for p in top1)
    assert f"{n_below} below the unknown threshold" in r.output
    for before, after in zip(good, _csv(out2), strict=True):
        want = "unknown" if float(before["probability"]) < threshold else before["label"]
        assert after["label"] == want and after["label_2"] == before["label_2"]
        assert after["best_guess"] == before["label"]  # the top class, whatever the threshold


def test_missing_listed_file_becomes_a_row(model, images, tmp_path, run_cli):
    listing = tmp_path / "photos.lst"
    listing.write_text(f"{next((images / 'bag').glob('*.png'))}\ngone.jpg\n", encoding="utf-8")
    out = tmp_path / "p.jsonl"
    _run(run_cli, model, listing, "--out", out)
    rows = _jsonl(out)
    assert rows[0]["label"] in CLASSES and rows[0]["error"] is None
    assert rows[1]["path"] == str(tmp_path / "gone.jpg") and rows[1]["label"] is None
    assert "No such file" in rows[1]["error"]


def test_jsonl_from_stdin_to_stdout(model, images, run_cli):
    paths = sorted((images / "trouser").glob("*.png"))[:3]
    r = _run(run_cli, model, "-", "--out", "-", "--format", "jsonl", "--top-k", "5", input="\n".join(map(str, paths)))
    lines = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [row["path"] for row in lines] == [str(p) for p in paths]
    for row in lines:
        assert len(row["top_k"]) == 3  # capped at the number of classes
        assert row["top_k"][0] == {"label": row["label"], "probability": row["probability"]}
        assert abs(sum(t["probability"] for t in row["top_k"]) - 1) < 1e-5


@pytest.mark.parametrize("suffix", [".npy", ".h5"])
def test_embeddings_align_with_rows(model, images, tmp_path, run_cli, suffix):
    bad = tmp_path / "bad.png"
    bad.write_text("no")
    photos = sorted((images / "sneaker").glob("*.png"))[:3]
    emb = tmp_path / f"e{suffix}"
    _run(run_cli, model, photos[0], bad, *photos[1:], "--out", tmp_path / "p.csv", "--embeddings", emb,
         "--batch-size", "2")  # fmt: skip
    if suffix == ".npy":
        arr = np.load(emb)
    else:
        with h5py.File(emb) as f:
            arr = f["embeddings"][:]
            assert [p.decode() for p in f["paths"][:]] == [str(p) for p in (photos[0], bad, *photos[1:])]
            assert f["error"][1].decode().startswith("not an image") and f["error"][0].decode() == ""
    assert arr.shape == (4, 32) and arr.dtype == np.float32
    assert np.isnan(arr[1]).all() and np.isfinite(arr[[0, 2, 3]]).all()
    # The same features the model computes for each photo alone.
    p = Predictor.load(model, device="cpu")
    for i, photo in ((0, photos[0]), (3, photos[2])):
        (r,) = list(p.iter_batches([photo], workers=0))
        np.testing.assert_allclose(arr[i], r.features[0], rtol=1e-5, atol=1e-6)


def test_embeddings_wrong_extension(model, images, tmp_path, run_cli):
    r = run_cli("predict", model, images / "bag", "--out", tmp_path / "p.csv", "--embeddings", tmp_path / "e.txt")
    assert r.exit_code == 1 and "Error: --embeddings must end in .npy or .h5" in r.output


def test_python_api_accepts_paths_and_pil_images(model, images):
    photo = sorted((images / "bag").glob("*.png"))[0]
    p = Predictor.load(model, device="cpu", precision="fp32")
    with Image.open(photo) as img:
        rows = p.predict([photo, img.copy(), str(photo)], top_k=2)
    assert rows[0]["label"] in CLASSES and len(rows[0]["top_k"]) == 2
    assert rows[0] == rows[1] == rows[2]
    # The threshold is compared with the probability of the same one-photo batch: oneDNN's fp32
    # kernels may differ in the last bits between a batch of 3 and a batch of 1 (seen on AVX2).
    alone = p.predict([photo])[0]
    assert alone["label"] == rows[0]["label"]
    top1 = alone["probability"]
    assert p.predict([photo], unknown_threshold=top1)[0]["label"] == rows[0]["label"]  # not below: kept
    assert p.predict([photo], unknown_threshold=float(np.nextafter(top1, 2)))[0]["label"] == "unknown"


@pytest.mark.gpu
def test_gpu_batches_match_cpu(model, images):
    device = os.environ.get("HEADSTART_TEST_DEVICE", "cuda")
    photos = sorted(images.rglob("*.png"))
    cpu, _ = Predictor.load(model, device="cpu", precision="fp32").predict_proba(photos, workers=0)
    gpu, errors = Predictor.load(model, device=device, precision="fp32").predict_proba(photos)
    assert not any(errors)
    np.testing.assert_allclose(gpu, cpu, atol=1e-3)


def test_threshold_chosen_at_fit_head_time_is_the_default(model, images, tmp_path):
    import shutil

    m = Path(shutil.copytree(model, tmp_path / "model"))
    manifest = json.loads((m / "manifest.json").read_text(encoding="utf-8"))
    manifest["head"]["unknown_threshold"] = 1.0  # what `fit-head --unknown-threshold` records, via export
    (m / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    photos = sorted((images / "bag").glob("*.png"))
    p = Predictor.load(m, device="cpu")
    assert p.unknown_threshold == 1.0
    assert {r["label"] for r in p.predict(photos) if r["probability"] < 1.0} <= {"unknown"}
    assert {r["label"] for r in p.predict(photos, unknown_threshold=0.0)} <= set(CLASSES)


def test_fit_head_threshold_flows_through_export(tiny_head, tmp_path):
    from pipeline.config import FitHeadConfig
    from pipeline.fit_head import fit_head

    cache = tiny_head.parent / "features.h5"
    head = tmp_path / "head"
    fit_head(
        FitHeadConfig(cache=str(cache), out=str(head), c=0.01, near_duplicate_threshold=None, unknown_threshold=0.9)
    )
    model = export(ExportConfig(head=str(head), out=str(tmp_path / "model"), format="onnx"))
    assert Predictor.load(model, device="cpu").unknown_threshold == 0.9
