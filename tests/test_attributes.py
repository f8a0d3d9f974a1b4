"""Several labels per photo: a manifest with one column per attribute (``path,category,finish,
tags``), stored in the cache, one head per attribute (multi-label: one-vs-rest with a threshold
per label), carried by export (native and ONNX) and answered by predict. Mechanics on the tiny
random backbone; that the tags are learned, on real EfficientNet-Lite0 features."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_sample_photos

from pipeline.cache.store import Cache
from pipeline.cli import cli
from pipeline.data import SAMPLE_CATALOG
from pipeline.data.attributes import label_column, split_cell
from pipeline.data.catalog import discover
from pipeline.errors import InputError
from pipeline.predict import Predictor
from pipeline.probe.multilabel import choose_thresholds, multilabel_metrics

FIT = ("--near-duplicate-threshold", "1", "--c", "0.01")  # random tiny features: plain split, C fixed
# fp32 features whatever this CPU's `--precision auto` picks: the native model then runs in fp32
# as ONNX does, so native and ONNX (and a head on the cache against ONNX on the photos) agree to
# 1e-6 on any CPU; bf16 features on an AMX CPU would differ by 1e-2 and could flip a near tie.
TINY = ("--backbone", "tiny", "--precision", "fp32")
FOOTWEAR = {"sneaker", "sandal", "ankle_boot"}


def _cli(*args: object, ok: bool = True) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert (r.exit_code == 0) == ok, r.output
    return r.output


def _tags(category: str, i: int) -> str:
    # footwear follows the category (learnable from the photo); "sale" is arbitrary bookkeeping
    return ";".join(t for t, on in (("footwear", category in FOOTWEAR), ("sale", i % 3 == 0)) if on)


def _manifest(images: Path, out: Path, finish: str = "finish") -> Path:
    """path,category,<finish>,tags for every photo under images/<class>/ (finish: alternating)."""
    rows = []
    for i, p in enumerate(sorted(images.rglob("*.png"))):
        cat = p.parent.name
        rows.append([p.relative_to(out.parent).as_posix(), cat, "matte" if i % 2 else "glossy", _tags(cat, i)])
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "category", finish, "tags"])
        w.writerows(rows)
    return out


# --------------------------------------------------------------------------- reading the manifest


def test_manifest_columns_become_attributes_and_the_label_column_is_chosen(tmp_path):
    images = copy_sample_photos(tmp_path / "images", 2)
    cat = discover(_manifest(images, tmp_path / "m.csv"))
    assert cat.label_column == "category"
    assert cat.attribute_names == ["finish", "tags"]
    bag = next(i for i in cat.items if i.rel.startswith("images/bag/"))
    assert bag.label == "bag" and bag.attributes[0] in ("matte", "glossy")
    # without a category or label column: the first column with no ';' in any cell
    assert label_column(["tags", "finish"], {"tags": ["a;b", ""], "finish": ["matte"]}) == "finish"
    assert label_column(["tags"], {"tags": ["a;b"]}) is None
    assert split_cell(" vegan; refillable;;vegan ") == ["vegan", "refillable"]


@pytest.mark.parametrize(
    ("header", "message"),
    [("path,category,a/b", "may not contain '/'"), ("path,category,finish,finish", "more than once")],
)
def test_bad_column_names_are_refused_with_the_reason(tmp_path, header, message):
    images = copy_sample_photos(tmp_path / "images", 1)
    first = sorted(images.rglob("*.png"))[0].relative_to(tmp_path).as_posix()
    (tmp_path / "m.csv").write_text(f"{header}\n{first},bag,x,y\n", encoding="utf-8")
    with pytest.raises(InputError, match=message):
        discover(tmp_path / "m.csv")


# --------------------------------------------------------------------------- the cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """3 classes x 6 photos through a manifest with category, finish and tags: the cache, a head
    with all three attributes, and its native and ONNX models."""
    root = tmp_path_factory.mktemp("attributes")
    images = copy_sample_photos(root / "images", 6, ("bag", "sneaker", "trouser"))
    manifest = _manifest(images, root / "catalog.csv")
    cache = root / "f.h5"
    _cli("extract", manifest, "--out", cache, *TINY, "--no-progress", "--workers", "0")
    head = root / "head"
    _cli("fit-head", cache, "--out", head, *FIT)
    native, onnx = root / "native", root / "onnx"
    _cli("export", head, "--out", native)
    _cli("export", head, "--out", onnx, "--format", "onnx")
    return {"root": root, "images": images, "manifest": manifest, "cache": cache, "head": head,
            "native": native, "onnx": onnx}  # fmt: skip


def test_the_cache_stores_every_column_readable_with_plain_h5py(tiny):
    with h5py.File(tiny["cache"], "r") as f:
        assert f.attrs["label_column"] == "category"
        g = f["attributes"]
        assert json.loads(g.attrs["columns"]) == ["finish", "tags"]
        values = [v.decode() for v in g["tags/class_names"][()]]
        assert values == sorted({"footwear", "footwear;sale", "sale"})
        paths = [p.decode() for p in f["paths"][()]]
        tags = g["tags/labels"][()]
    with open(tiny["manifest"], encoding="utf-8") as fh:
        want = {r["path"]: r["tags"] for r in csv.DictReader(fh)}
    for p, t in zip(paths, tags, strict=True):
        assert (values[t] if t >= 0 else "") == want[p]


def test_relabelling_a_column_rewrites_the_index_and_reextracts_nothing(tiny, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(tiny["root"] / "images", root / "images")
    manifest = _manifest(root / "images", root / "catalog.csv")
    cache = root / "f.h5"
    args = ("extract", manifest, "--out", cache, *TINY, "--no-progress", "--workers", "0")
    _cli(*args)
    text = manifest.read_text(encoding="utf-8").replace(",matte,", ",satin,")
    manifest.write_text(text, encoding="utf-8")
    line = _cli(*args)
    assert "extracted 0" in line and "relabelled 9" in line, line
    with Cache(cache) as c:
        col = c.attribute("finish")
        assert col.values == ["glossy", "satin"]
        assert (col.labels >= 0).all()
        before = {k: c.attribute(k).labels.tolist() for k in c.attribute_names}
    # a compaction moves rows, never labels: every attribute survives it
    assert CliRunner().invoke(cli, ["cache", "compact", str(cache), "--min-dead-share", "0"]).exit_code == 0
    with Cache(cache) as c:
        assert {k: c.attribute(k).labels.tolist() for k in c.attribute_names} == before


# --------------------------------------------------------------------------- heads


def test_fit_head_writes_one_head_per_attribute(tiny):
    head = tiny["head"]
    main = json.loads((head / "head.json").read_text(encoding="utf-8"))
    assert main["attribute"] == "category" and main["class_names"] == ["bag", "sneaker", "trouser"]
    assert [(a["name"], a["multi_label"]) for a in main["attributes"]] == [("finish", False), ("tags", True)]
    tags = json.loads((head / "attributes" / "tags" / "head.json").read_text(encoding="utf-8"))
    assert tags["class_names"] == ["footwear", "sale"] and tags["kind"] == "multilabel"
    assert len(tags["thresholds"]) == 2 and all(0 <= t <= 1 for t in tags["thresholds"])
    assert set(tags["metrics"]["per_label"]) == {"footwear", "sale"}
    assert {"micro_f1", "macro_f1", "macro_average_precision"} <= set(tags["metrics"])


def test_attribute_option_and_a_label_map_per_attribute(tiny, tmp_path):
    (tmp_path / "tags.toml").write_text(
        'attribute = "tags"\ndrop = ["sale"]\n[classes]\nshoes = 0\n[rename]\nfootwear = "shoes"\n', encoding="utf-8"
    )
    out = tmp_path / "head"
    _cli("fit-head", tiny["cache"], "--out", out, "--attribute", "finish", "--attribute", "tags",
         "--classes", tmp_path / "tags.toml", *FIT)  # fmt: skip
    main = json.loads((out / "head.json").read_text(encoding="utf-8"))
    assert main["attribute"] == "finish" and main["class_names"] == ["glossy", "matte"]
    tags = json.loads((out / "attributes" / "tags" / "head.json").read_text(encoding="utf-8"))
    assert tags["class_names"] == ["shoes"] and tags["label_map"]["text"].startswith('attribute = "tags"')


def test_unknown_or_only_multi_label_attributes_are_clear_errors(tiny, tmp_path):
    out = _cli("fit-head", tiny["cache"], "--out", tmp_path / "h", "--attribute", "finsh", *FIT, ok=False)
    assert "'finsh' is not a column" in out and "did you mean 'finish'" in out
    out = _cli("fit-head", tiny["cache"], "--out", tmp_path / "h", "--attribute", "tags", *FIT, ok=False)
    assert "multi-label" in out and "single-label" in out


def test_thresholds_maximise_f1_or_reach_the_target_precision():
    y = np.array([[1], [1], [0], [1], [0], [0]])
    p = np.array([[0.9], [0.8], [0.7], [0.6], [0.2], [0.1]])
    t, short = choose_thresholds(p, y)
    # cutting after 0.6 predicts 4 rows (3 right): F1 6/7, the best; the cut is halfway to 0.2
    assert t[0] == pytest.approx(0.4) and short == []
    t, short = choose_thresholds(p, y, target_precision=1.0)
    assert t[0] == pytest.approx(0.75) and short == []  # the top two only: precision 1
    m = multilabel_metrics(y, p, t, ["x"])
    assert m["per_label"]["x"]["precision"] == 1.0 and m["per_label"]["x"]["recall"] == pytest.approx(2 / 3)
    t, short = choose_thresholds(np.array([[0.3], [0.9]]), np.array([[1], [0]]), target_precision=0.9)
    assert short == [0]  # no cut reaches it


# --------------------------------------------------------------------------- export and predict


def test_native_and_onnx_models_answer_every_attribute_alike(tiny, tmp_path):
    manifest = json.loads((tiny["onnx"] / "manifest.json").read_text(encoding="utf-8"))
    assert [a["output"] for a in manifest["attributes"]] == ["probabilities_finish", "probabilities_tags"]
    assert manifest["parity"]["max_abs_diff"] <= 1e-3
    photos = sorted(tiny["images"].rglob("*.png"))[:6]
    rows = {}
    for name in ("native", "onnx"):
        p = Predictor.load(tiny[name], device="cpu")
        probs, attrs, errors = p.predict_all(photos, workers=0)
        assert errors == [""] * len(photos)
        rows[name] = (probs, attrs)
        answer = p.predict(photos, workers=0)[0]["attributes"]
        assert set(answer) == {"finish", "tags"}
        assert answer["finish"]["label"] in ("glossy", "matte")
        assert set(answer["tags"]["probabilities"]) == {"footwear", "sale"}
    for a, b in zip(rows["native"][1], rows["onnx"][1], strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)
    np.testing.assert_allclose(rows["native"][0], rows["onnx"][0], atol=1e-4)


def test_predict_writes_a_column_group_per_attribute(tiny, tmp_path):
    out = tmp_path / "p.csv"
    _cli("predict", tiny["native"], tiny["images"] / "bag", "--out", out, "--no-progress", "--workers", "0")
    with open(out, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {"finish", "finish_probability", "tags", "tags_probabilities"} <= set(rows[0])
    for r in rows:
        scores = dict(kv.split("=") for kv in r["tags_probabilities"].split(";"))
        assert set(scores) == {"footwear", "sale"}
        assert set(split_cell(r["tags"])) <= set(scores)
    out = tmp_path / "p.jsonl"
    _cli("predict", tiny["onnx"], tiny["images"] / "bag", "--out", out, "--no-progress", "--workers", "0")
    first = json.loads(out.read_text(encoding="utf-8").splitlines()[0])
    assert set(first["attributes"]["tags"]) == {"labels", "probabilities"}


def test_a_head_without_attributes_still_exports_as_before(tiny_head, tmp_path):
    main = json.loads((tiny_head / "head.json").read_text(encoding="utf-8"))
    assert "attributes" not in main or main["attributes"] == []
    _cli("export", tiny_head, "--out", tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text(encoding="utf-8"))
    assert "attributes" not in manifest


# --------------------------------------------------------------------------- real features


@pytest.mark.slow
def test_tags_are_learned_from_real_features(tmp_path):
    """Lite0 features of 4 classes x 15 photos; ``footwear`` (sneaker, sandal) is in the photo,
    so the exported model tags the 4 x 50 held-out photos with it almost perfectly (measured:
    F1 0.980, 4 photos of 200 wrong; asserted 0.85, which takes about 30 wrong). ``sale`` is
    arbitrary bookkeeping, not in the photo: its F1 is not asserted."""
    classes = ("bag", "sneaker", "trouser", "sandal")
    images = copy_sample_photos(tmp_path / "images", 15, classes)
    manifest = _manifest(images, tmp_path / "catalog.csv")
    cache, head, model = tmp_path / "f.h5", tmp_path / "head", tmp_path / "model"
    _cli("extract", manifest, "--out", cache, "--no-progress", "--workers", "0")
    _cli("fit-head", cache, "--out", head)
    _cli("export", head, "--out", model, "--format", "onnx")
    test = [p for c in classes for p in sorted((SAMPLE_CATALOG / "test" / c).glob("*.png"))]
    answers = Predictor.load(model, device="cpu").predict(test, workers=0)
    got = np.array(["footwear" in a["attributes"]["tags"]["labels"] for a in answers])
    want = np.array([p.parent.name in FOOTWEAR for p in test])
    tp = (got & want).sum()
    f1 = 2 * tp / (got.sum() + want.sum())
    assert f1 >= 0.85, f1


def test_evaluate_scores_each_attribute_of_a_head_or_a_model(tiny, tmp_path):
    """The single-label attribute gets the usual report, the multi-label one per-label numbers
    at the head's thresholds; the head on the cache and the ONNX model on the photos agree."""
    reports = {}
    for name, model, data in (("head", tiny["head"], tiny["cache"]), ("onnx", tiny["onnx"], tiny["manifest"])):
        for attribute in ("finish", "tags"):
            out = tmp_path / f"{name}-{attribute}"
            _cli("evaluate", model, data, "--out", out, "--attribute", attribute, "--no-progress", "--workers", "0")
            reports[name, attribute] = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert reports["head", "finish"]["n"] == 18 and set(reports["head", "finish"]["per_class"]) == {"glossy", "matte"}
    tags = reports["head", "tags"]
    assert set(tags["per_label"]) == {"footwear", "sale"} and tags["n"] == 18
    assert tags["per_label"]["footwear"]["support"] == 6  # the sneakers
    assert tags["per_label"]["sale"]["support"] == 6  # every third photo
    for attribute in ("finish", "tags"):
        a, b = reports["head", attribute], reports["onnx", attribute]
        key = "micro_f1" if attribute == "tags" else "accuracy"
        assert a[key] == pytest.approx(b[key]), attribute
    out = _cli("evaluate", tiny["head"], tiny["cache"], "--out", tmp_path / "x", "--attribute", "shade", ok=False)
    assert "no head for attribute 'shade'" in out


def test_audit_an_attribute_and_apply_keeps_every_column(tiny, tmp_path):
    """``audit --attribute finish`` cross-fits the finish labels; ``--apply`` writes a manifest
    with all the cache's columns, the accepted photos' finish changed, and extracting it
    changes that label only (no photo is run through the backbone again)."""
    root = tmp_path / "copy"
    shutil.copytree(tiny["root"] / "images", root / "images")
    manifest = _manifest(root / "images", root / "catalog.csv")
    cache = root / "f.h5"
    extract = ("extract", None, "--out", cache, *TINY, "--no-progress", "--workers", "0")
    _cli(*[manifest if a is None else a for a in extract])
    report = tmp_path / "audit"
    _cli("audit", cache, "--out", report, "--attribute", "finish", "--no-progress")
    with open(report / "label_issues.csv", encoding="utf-8") as f:
        issues = list(csv.DictReader(f))
    assert {r["given"] for r in issues} <= {"glossy", "matte"} and issues
    accepted = tmp_path / "accepted.csv"
    with open(accepted, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerow([issues[0]["path"], "satin"])
    _cli("audit", cache, "--out", tmp_path / "applied", "--apply", accepted, "--attribute", "finish")
    relabelled = tmp_path / "applied" / "relabelled.csv"
    with open(relabelled, encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "category", "finish", "tags"]
    assert sum(r["finish"] == "satin" for r in rows) == 1
    line = _cli(*[relabelled if a is None else a for a in extract])
    assert "extracted 0" in line and "relabelled 1" in line, line
    with Cache(cache) as c:
        assert "satin" in c.attribute("finish").values
        assert c.attribute("tags").values == sorted({"footwear", "footwear;sale", "sale"})
    out = _cli("audit", cache, "--out", tmp_path / "a2", "--attribute", "tags", "--no-progress", ok=False)
    assert "multi-label" in out


def test_cache_info_and_the_parquet_export_show_every_column(tiny, tmp_path):
    out = _cli("cache", "info", tiny["cache"])
    assert "(column category)" in out
    assert "attribute     tags (multi-label), 2 labels" in out and "  footwear: 6" in out
    _cli("cache", "export", tiny["cache"], "--format", "parquet", tmp_path / "pq")
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "pq")
    assert table.schema.names[-2:] == ["finish", "tags"]
    with Cache(tiny["cache"]) as c:
        col = c.attribute("tags")
        want = [col.values[i] if i >= 0 else None for i in col.labels]
    assert table.column("tags").to_pylist() == want


def test_identical_files_that_disagree_are_left_out_of_that_attribute(tmp_path):
    """Two copies of one photo: different finish (single-label) and one with tags, one without
    (multi-label, where an empty cell means "none"): both conflicts, recorded and left out of
    those heads; the category, on which the copies agree, is kept. A column named like a
    fixed output column gets its own name in predict's CSV."""
    images = copy_sample_photos(tmp_path / "images", 6)
    twin = images / "bag" / "twin.png"
    shutil.copy(sorted((images / "bag").glob("*.png"))[0], twin)
    manifest = _manifest(images, tmp_path / "catalog.csv", finish="probability")
    rows = list(csv.reader(manifest.open(encoding="utf-8")))
    for r in rows[1:]:
        if r[0].endswith("twin.png"):
            r[2], r[3] = "satin", ""  # the original has glossy/matte and footwear/sale cells
    first = next(r for r in rows[1:] if r[0].startswith("images/bag/") and not r[0].endswith("twin.png"))
    first[3] = "sale"
    with open(manifest, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    cache = tmp_path / "f.h5"
    out = _cli("extract", manifest, "--out", cache, *TINY, "--no-progress", "--workers", "0")
    assert "left out of the probability head" in out and "left out of the tags head" in out
    with Cache(cache) as c:
        row = c.paths.index(first[0])
        assert c.attribute("probability").labels[row] == -2 and c.attribute("tags").labels[row] == -2
        assert c.class_names[c.labels[row]] == "bag"
    head = tmp_path / "head"
    _cli("fit-head", cache, "--out", head, *FIT)
    tags = json.loads((head / "attributes" / "tags" / "head.json").read_text(encoding="utf-8"))
    assert tags["n_train"] + tags["n_val"] == 17  # 19 files, 18 distinct photos, the disagreeing one left out
    _cli("export", head, "--out", tmp_path / "m")
    _cli("predict", tmp_path / "m", images / "bag", "--out", tmp_path / "p.csv", "--no-progress", "--workers", "0")
    header = next(csv.reader((tmp_path / "p.csv").open(encoding="utf-8")))
    assert header.count("probability") == 1 and "attribute_probability" in header
