"""headstart audit on real photos with planted problems whose answer is known: flipped labels,
re-encoded copies, a photo that is not a product, one category split in two (one half under a
Chinese name), unlabelled photos of a kind no class covers; the --apply round trip through
extract; report.html in a real browser."""

from __future__ import annotations

import csv
import io
import json
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_sample_photos
from PIL import Image
from test_report import CHROMIUM_FLAGS, chromium, probe_in_chromium  # noqa: F401  (the browser fixture)

from pipeline.artifacts.relabel import read_cell
from pipeline.audit import audit
from pipeline.cache.store import Cache
from pipeline.config import AuditConfig, ExtractConfig, FitHeadConfig
from pipeline.core.csvcells import safe_cell
from pipeline.data import SAMPLE_CATALOG
from pipeline.data.labels import LabelMap, apply_label_map
from pipeline.extract import extract
from pipeline.fit_head import fit_head
from pipeline.probe.crossfit import grouped_folds
from pipeline.probe.label_issues import find_label_issues
from pipeline.probe.neighbours import faiss_available, near_duplicate_pairs, unit

CLASSES = ("bag", "sneaker", "trouser", "dress", "sandal", "ankle_boot")
CJK = "运动鞋"  # "sneaker": half the sneakers are filed under it (a category split in two)
PER_CLASS = 20
ODD_NAME = "<i>astronaut&co.png"  # the non-product photo: its name must reach the report as text


def _read(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """EfficientNet-Lite0 cache of 120 real catalog photos with known problems, and its audit."""
    import skimage.data

    root = tmp_path_factory.mktemp("audit")
    images = copy_sample_photos(root / "images", per_class=PER_CLASS, classes=CLASSES)
    (images / CJK).mkdir()
    for p in sorted((images / "sneaker").glob("*.png"))[::2]:
        shutil.move(p, images / CJK / p.name)
    # Re-encoded copies of two photos, stored at a web catalog's size first (224 px): one copy in
    # its own class (JPEG 75), one filed under another class (resized to 160 px: the same product
    # listed twice).
    orig_a, orig_b = sorted((images / "trouser").glob("*.png"))[0], sorted((images / "dress").glob("*.png"))[0]
    for p in (orig_a, orig_b):
        Image.open(p).resize((224, 224), Image.Resampling.BICUBIC).save(p)
    _jpeg(Image.open(orig_a), 75).save(images / "trouser" / "copy-a.jpg", quality=95)
    Image.open(orig_b).resize((160, 160), Image.Resampling.BICUBIC).save(images / "ankle_boot" / "copy-b.png")
    rng = np.random.default_rng(7)
    flipped = {}  # path -> true class
    others = [c for c in CLASSES if c != "sneaker"]  # sneaker and 运动鞋 are one kind: no flips there
    for cls in others:
        p = rng.choice([q for q in sorted((images / cls).glob("fmnist*.png")) if q not in (orig_a, orig_b)])
        dst = rng.choice([c for c in others if c != cls])
        shutil.move(p, images / dst / p.name)
        flipped[f"{dst}/{p.name}"] = cls
    Image.fromarray(skimage.data.astronaut()).save(images / "bag" / ODD_NAME)
    # Unlabelled photos (beside the class folders): 6 of known classes, 3 coats (no class covers
    # them) and 2 re-encodings of one more coat.
    unl = []
    for cls in ("bag", "trouser", "sandal", "dress", "sneaker", "ankle_boot"):
        p = sorted((SAMPLE_CATALOG / "test" / cls).glob("*.png"))[0]
        shutil.copy(p, images / f"u-{cls}.png")
    coats = sorted((SAMPLE_CATALOG / "test" / "coat").glob("*.png"))
    for i, p in enumerate(coats[:3]):
        shutil.copy(p, images / f"u-coat{i}.png")
        unl.append(f"u-coat{i}.png")
    Image.open(coats[3]).save(images / "u-twin1.png")
    _jpeg(Image.open(coats[3]), 70).save(images / "u-twin2.jpg", quality=95)
    cache = root / "features.h5"
    extract(ExtractConfig(images=str(images), out=str(cache), workers=0, progress=False))
    summary = audit(AuditConfig(cache=str(cache), out=str(root / "audit"), progress=False, device="cpu", budget=4))
    return {
        "root": root,
        "images": images,
        "cache": cache,
        "out": root / "audit",
        "summary": summary,
        "flipped": flipped,
        "copies": {"trouser/copy-a.jpg": f"trouser/{orig_a.name}", "ankle_boot/copy-b.png": f"dress/{orig_b.name}"},
    }


def test_flipped_labels_rank_first(planted):
    rows = _read(planted["out"] / "label_issues.csv")
    flipped = planted["flipped"]
    top = [r["path"] for r in rows[: len(flipped) + 2]]
    found = [p for p in flipped if p in top]
    # Measured: all 5 flips in the top 5 (out-of-fold p of the given class <= 0.02); the copy filed
    # under the wrong class is a label issue too. One photo of slack, no more.
    assert len(found) >= len(flipped) - 1, (found, rows[:10])
    right = [r["path"] for r in rows if r["path"] in flipped and r["suggested"] == flipped[r["path"]]]
    assert len(right) >= len(flipped) - 1, rows[:10]  # the suggestion is the true class
    assert [int(r["rank"]) for r in rows] == list(range(1, len(rows) + 1))
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    # Not the whole catalog: measured 22 of 123 flagged, most of the rest between the two halves
    # of the split category (which overlaps.csv then suggests merging).
    assert len(rows) <= 40


def test_reencoded_copies_cluster_with_their_original(planted):
    rows = _read(planted["out"] / "duplicates.csv")
    cluster_of = {r["path"]: r["cluster"] for r in rows}
    for copy, original in planted["copies"].items():
        assert copy in cluster_of and cluster_of[copy] == cluster_of.get(original), (copy, rows)
    spans = {r["cluster"]: r["spans_categories"] for r in rows}
    assert spans[cluster_of["ankle_boot/copy-b.png"]] == "yes"  # the same product filed twice
    assert spans[cluster_of["trouser/copy-a.jpg"]] == "no"
    # Distinct catalog photos never cluster: the only catalog photos in clusters are the originals.
    catalog = {p for p in cluster_of if "fmnist" in p}
    assert catalog <= set(planted["copies"].values()), rows
    assert rows[0]["spans_categories"] == "yes"  # clusters across categories are listed first
    html = (planted["out"] / "report.html").read_text(encoding="utf-8")
    assert html.index("cluster 1 - across categories") < html.index("cluster 2 (")


def test_a_photo_that_is_not_a_product_is_the_top_outlier(planted):
    rows = _read(planted["out"] / "outliers.csv")
    assert rows and rows[0]["path"] == f"bag/{ODD_NAME}", rows
    # Measured: the astronaut at z 40, no catalog photo above 4 (threshold 5).
    assert len(rows) <= 2, rows


def test_a_category_split_in_two_is_the_top_overlap_and_its_rename_merges_it(planted):
    rows = _read(planted["out"] / "overlaps.csv")
    assert {rows[0]["class_a"], rows[0]["class_b"]} == {"sneaker", CJK}, rows[:3]
    assert rows[0]["merge"] == "yes" and float(rows[0]["share"]) >= 1 / 3
    assert all(r["merge"] == "no" for r in rows[1:]), rows[:5]
    # The rename line is valid TOML and, with the other classes, a label map that merges them.
    rename = tomllib.loads(rows[0]["rename"])
    assert len(rename) == 1 and {*rename, *rename.values()} == {"sneaker", CJK}
    keep = next(iter(rename.values()))
    with Cache(planted["cache"]) as c:
        names, labels = c.class_names, c.labels
    text = (
        "[classes]\n"
        + "".join(
            f"{json.dumps(n, ensure_ascii=False)} = {i}\n" for i, n in enumerate(n for n in names if n not in rename)
        )
        + "[rename]\n"
        + rows[0]["rename"]
        + "\n"
    )
    mapped = apply_label_map(LabelMap.from_dict(tomllib.loads(text)), names, labels)
    assert len(mapped.class_names) == len(names) - 1 and keep in mapped.class_names
    html = (planted["out"] / "report.html").read_text(encoding="utf-8")
    assert "[rename]" in html and CJK in html


def test_label_next_prefers_what_no_class_covers_and_never_two_copies(planted):
    rows = _read(planted["out"] / "label_next.csv")
    picked = [r["path"] for r in rows]
    assert len(picked) == 4 and len(set(picked)) == 4
    assert all("/" not in p for p in picked)  # unlabelled rows only
    assert not {"u-twin1.png", "u-twin2.jpg"} <= set(picked)
    # Measured: the first three picks are coats (one of them a twin); the known kinds come later.
    coats = [p for p in picked[:3] if "coat" in p or "twin" in p]
    assert len(coats) >= 2, rows


def test_summary_json_and_line(planted, run_cli, tmp_path):
    s = planted["summary"]
    counts = json.loads((planted["out"] / "summary.json").read_text(encoding="utf-8"))
    assert counts["label_issues"] == len(_read(planted["out"] / "label_issues.csv")) == s.counts["label_issues"]
    assert counts["labelled"] + counts["unlabelled"] == counts["rows"]
    assert counts["unlabelled"] == 11 and counts["classes"] == len(CLASSES) + 1
    assert counts["head"] == "logreg" and counts["C_swept"] and counts["folds"] == 5
    assert "label issues" in s.line() and "out-of-fold accuracy" in s.line()
    z = np.load(planted["out"] / "oof.npz", allow_pickle=False)
    assert z["proba"].shape == (counts["labelled"], counts["classes"])
    np.testing.assert_allclose(z["proba"].sum(1), 1, atol=1e-5)
    r = run_cli(
        "audit",
        planted["cache"],
        "--out",
        tmp_path / "a",
        "--json",
        "--no-progress",
        "--device",
        "cpu",
        "--budget",
        "4",
    )
    assert r.exit_code == 0, r.output
    again = json.loads(r.output)
    assert {k: again[k] for k in ("label_issues", "outliers", "duplicate_clusters", "C")} == {
        k: counts[k] for k in ("label_issues", "outliers", "duplicate_clusters", "C")
    }


def test_the_cross_fitted_head_is_the_one_fit_head_chooses(planted, tmp_path):
    fit_head(FitHeadConfig(cache=str(planted["cache"]), out=str(tmp_path / "head"), device="cpu"))
    chosen = json.loads((tmp_path / "head" / "head.json").read_text(encoding="utf-8"))
    assert chosen["kind"] == planted["summary"].counts["head"] == "logreg"
    assert chosen["C"] == planted["summary"].counts["C"]  # same split, same sweep, same C


def test_apply_writes_a_manifest_extract_relabels_from(planted, run_cli, tmp_path):
    """Accept the flipped rows of label_issues.csv; extract the manifest into a copy of the
    cache: their labels become the suggested ones, and no photo is extracted again."""
    work = tmp_path / "copy"
    work.mkdir()
    shutil.copy(planted["cache"], work / "features.h5")
    shutil.copytree(str(planted["cache"]) + ".segments", work / "features.h5.segments")
    rows = _read(planted["out"] / "label_issues.csv")
    accepted = [r for r in rows if r["path"] in planted["flipped"]]
    with open(tmp_path / "accepted.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(accepted)
    r = run_cli("audit", work / "features.h5", "--out", tmp_path / "rep", "--apply", tmp_path / "accepted.csv")
    assert r.exit_code == 0, r.output
    assert f"{len(accepted)} photos relabelled" in r.output
    manifest = _read(tmp_path / "rep" / "relabelled.csv")
    by_name = {Path(m["path"]).name: m["label"] for m in manifest}
    for a in accepted:
        assert by_name[Path(a["path"]).name] == a["suggested"]
    line = extract(
        ExtractConfig(
            images=str(tmp_path / "rep" / "relabelled.csv"), out=str(work / "features.h5"), workers=0, progress=False
        )
    ).line()
    assert "extracted 0," in line and f"relabelled {len(accepted)}" in line, line
    with Cache(work / "features.h5") as c:
        label = {Path(p).name: c.class_names[int(v)] for p, v in zip(c.paths, c.labels, strict=True) if v >= 0}
    for a in accepted:
        assert label[Path(a["path"]).name] == a["suggested"]
    assert sum(a["suggested"] == planted["flipped"][a["path"]] for a in accepted) >= len(accepted) - 1


def test_apply_refuses_paths_the_cache_does_not_have(planted, run_cli, tmp_path):
    (tmp_path / "acc.csv").write_text("path,suggested\nbag/nope.png,bag\n", encoding="utf-8")
    r = run_cli("audit", planted["cache"], "--out", tmp_path / "rep", "--apply", tmp_path / "acc.csv")
    assert r.exit_code == 1 and "Error:" in r.output and "bag/nope.png" in r.output
    (tmp_path / "bad.csv").write_text("file,label\nx,y\n", encoding="utf-8")
    r = run_cli("audit", planted["cache"], "--out", tmp_path / "rep", "--apply", tmp_path / "bad.csv")
    assert r.exit_code == 1 and "needs a 'path' column" in r.output


def test_formula_guard_is_undone_when_read_back():
    for text in ("=cmd|' -C calc'!A0.png", "+1", "-x", "@SUM(1)", "plain.png", "'quoted"):
        assert read_cell(safe_cell(text)) == text


@pytest.mark.must_run
def test_report_renders_in_headless_chromium(planted, chromium, tmp_path):  # noqa: F811
    out = planted["out"]
    html = (out / "report.html").read_text(encoding="utf-8")
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    expression = (
        "{images: [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth]),"
        " italics: document.querySelectorAll('i').length}"
    )
    dom, found = probe_in_chromium(chromium, flags, out / "report.html", expression)
    srcs = [s for s, _ in found["images"]]
    assert srcs and all(s.startswith("thumbs/") for s in srcs)
    assert not [s for s, w in found["images"] if w == 0], "thumbnails that did not load"
    assert found["italics"] == 0  # the odd file name is text, not markup
    assert "&lt;i&gt;astronaut&amp;co.png" in html and ODD_NAME not in html
    assert CJK in dom


# --------------------------------------------------------------------------- the concepts alone


def test_confident_learning_on_known_probabilities():
    # Class 0 photos at p0 0.9, class 1 at p1 0.8; photo 5 is given 0 but confidently 1.
    proba = np.array([[0.9, 0.1]] * 5 + [[0.1, 0.9]] + [[0.2, 0.8]] * 5)
    y = np.array([0] * 6 + [1] * 5)
    issues = find_label_issues(proba, y)
    assert np.flatnonzero(issues.flagged).tolist() == [5]
    assert issues.suggested[5] == 1 and issues.order[0] == 5
    assert issues.thresholds[0] == pytest.approx((0.9 * 5 + 0.1) / 6)
    pbnr = find_label_issues(proba, y, filter_by="prune_by_noise_rate")
    assert np.flatnonzero(pbnr.flagged).tolist() == [5]


def test_the_class_cut_keeps_a_hard_class_from_taking_another_class_s_flag():
    # Class 0 is hard: its honest photo 5 has p0 0.3 and no confident class. Photo 11, given 1, is
    # confidently 0: the confident joint counts one error, in class 1. The global cut alone spends
    # it on photo 5 (lower self-confidence); the class cut gives class 0 none and class 1 one.
    proba = np.array([[0.55, 0.45]] * 5 + [[0.3, 0.7]] + [[0.1, 0.9]] * 5 + [[0.6, 0.4]])
    y = np.array([0] * 6 + [1] * 6)
    assert np.flatnonzero(find_label_issues(proba, y, filter_by="self_confidence").flagged).tolist() == [5]
    assert np.flatnonzero(find_label_issues(proba, y, filter_by="by_class").flagged).tolist() == [11]
    both = find_label_issues(proba, y)  # the default: flagged only where both cuts agree
    assert not both.flagged.any() and both.order[0] == 5  # still ranked, by self-confidence


def test_label_next_takes_one_photo_per_uncertain_group_and_none_the_head_is_sure_of():
    from pipeline.probe.label_next import weighted_kmeans

    rng = np.random.default_rng(0)
    centres = unit(rng.normal(size=(3, 64)))
    groups = np.repeat(np.arange(3), [40, 25, 60])  # group 2, the largest, the head is sure of
    U = unit(centres[groups] + 0.05 * rng.normal(size=(len(groups), 64)))
    uncertainty = np.where(groups == 2, 0.02, 0.9) + 0.01 * rng.random(len(groups))
    picks, mass = weighted_kmeans(U, uncertainty, 2, seed=0, beta=40)
    assert sorted(groups[picks].tolist()) == [0, 1]  # one each, and the sure group none
    assert groups[picks[0]] == 0 and mass[0] > mass[1]  # the group that holds more uncertainty first
    again, _ = weighted_kmeans(U, uncertainty, 2, seed=0, beta=40)
    assert again.tolist() == picks.tolist()


def test_folds_keep_near_duplicate_groups_whole_and_every_class_in_two_folds():
    y = np.repeat(np.arange(3), 20)
    groups = np.arange(60)
    groups[[0, 1, 2]] = 0  # three near copies in class 0
    groups[[20, 21]] = 20
    folds = grouped_folds(y, groups, 5, seed=0)
    assert len(set(folds.fold[[0, 1, 2]])) == 1 and len(set(folds.fold[[20, 21]])) == 1
    for c in range(3):
        counts = np.bincount(folds.fold[y == c], minlength=5)
        assert counts.min() >= 3 and counts.max() <= 5, counts
    alike = grouped_folds(y, np.where(y == 1, 20, groups), 5, seed=0)  # class 1: one big group
    assert alike.ungrouped_classes == (1,) and len(set(alike.fold[y == 1])) == 5


@pytest.mark.parametrize("method", ["exact", "faiss"])
def test_near_duplicate_search_finds_exactly_the_pairs_above_the_threshold(method, monkeypatch):
    if method == "faiss" and not faiss_available():
        pytest.skip("faiss is an optional extra: pip install '.[faiss]'")
    from pipeline.probe import neighbours

    monkeypatch.setattr(neighbours, "BLOCK", 64)  # several blocks and column blocks
    monkeypatch.setattr(neighbours, "COLUMNS", 96)
    rng = np.random.default_rng(0)
    U = unit(rng.normal(size=(3000, 64)).astype(np.float32))
    U[2000:2030] = unit(U[:30] + rng.normal(0, 0.02, (30, 64)).astype(np.float32))
    pairs, used = near_duplicate_pairs(U.astype(np.float16), 0.95, method=method)
    assert used == method
    S = U.astype(np.float16).astype(np.float32) @ U.astype(np.float16).astype(np.float32).T
    want = {(int(a), int(b)) for a, b in zip(*np.nonzero(np.triu(S, 1) > 0.95), strict=True)}
    assert want == {(i, 2000 + i) for i in range(30)}
    assert {(int(a), int(b)) for a, b, _ in pairs} == want


def test_errors_name_the_fix(run_cli, tmp_path, tiny_head):
    one = copy_sample_photos(tmp_path / "one", per_class=4, classes=("bag",))
    extract(ExtractConfig(images=str(one), out=str(tmp_path / "one.h5"), backbone="tiny", workers=0, progress=False))
    r = run_cli("audit", tmp_path / "one.h5", "--out", tmp_path / "rep", "--device", "cpu")
    assert r.exit_code == 1 and "needs at least two" in r.output
    few = copy_sample_photos(tmp_path / "few", per_class=1, classes=("bag", "sneaker", "trouser"))
    extract(ExtractConfig(images=str(few), out=str(tmp_path / "few.h5"), backbone="tiny", workers=0, progress=False))
    r = run_cli("audit", tmp_path / "few.h5", "--out", tmp_path / "rep", "--device", "cpu")
    assert r.exit_code == 1 and "two or more photos each" in r.output
    lite = copy_sample_photos(tmp_path / "lite", per_class=2, classes=("bag", "sneaker"))
    extract(ExtractConfig(images=str(lite), out=str(tmp_path / "lite.h5"), workers=0, progress=False))
    r = run_cli("audit", tmp_path / "lite.h5", "--head", tiny_head, "--out", tmp_path / "rep", "--device", "cpu")
    assert r.exit_code == 1 and "fitted on tiny" in r.output


def test_head_dir_gives_the_kind_and_c(run_cli, tmp_path):
    images = copy_sample_photos(tmp_path / "images", per_class=8)
    extract(ExtractConfig(images=str(images), out=str(tmp_path / "f.h5"), backbone="tiny", workers=0, progress=False))
    fit_head(
        FitHeadConfig(cache=str(tmp_path / "f.h5"), out=str(tmp_path / "head"), c=0.05, near_duplicate_threshold=None)
    )
    r = run_cli(
        "audit",
        tmp_path / "f.h5",
        "--head",
        tmp_path / "head",
        "--out",
        tmp_path / "rep",
        "--json",
        "--no-progress",
        "--device",
        "cpu",
    )
    assert r.exit_code == 0, r.output
    s = json.loads(r.output)
    assert s["C"] == 0.05 and not s["C_swept"] and s["head"] == "logreg"


def test_auto_switches_to_faiss_above_the_measured_size_and_warns_without_it(monkeypatch):
    from pipeline.probe import neighbours

    monkeypatch.setattr(neighbours, "BRUTE_FORCE_ROWS", 500)
    U = unit(np.random.default_rng(1).normal(size=(2000, 32)).astype(np.float32))
    assert neighbours.near_duplicate_pairs(U[:400], 0.99)[1] == "exact"
    if faiss_available():
        assert neighbours.near_duplicate_pairs(U, 0.99)[1] == "faiss"
    monkeypatch.setattr(neighbours, "faiss_available", lambda: False)
    with pytest.warns(UserWarning, match=r"pip install '\.\[faiss\]'"):
        assert neighbours.near_duplicate_pairs(U, 0.99)[1] == "exact"
