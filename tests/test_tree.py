"""A category tree over the head's classes (``classes.toml`` [parents]): fit-head records it,
export carries it (native and ONNX), predict answers with the deepest node it is sure of and its
path, evaluate reports accuracy per level and the roll-up's accuracy and coverage. All through
the CLI on real Fashion-MNIST photos (the tiny backbone: the mechanics, not the accuracy)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_sample_photos

from pipeline.cli import cli
from pipeline.data import SAMPLE_CATALOG

CLASSES = ("sandal", "sneaker", "ankle_boot", "trouser", "bag")
# 服装 (clothing) > footwear > sandal | sneaker | ankle_boot; 服装 > bottoms > trouser; accessories > bag
TREE = (
    "[parents]\n"
    'sandal = "footwear"\nsneaker = "footwear"\nankle_boot = "footwear"\n'
    'trouser = "bottoms"\nfootwear = "服装"\nbottoms = "服装"\nbag = "accessories"\n'
)
PATHS = {
    "sandal": ["服装", "footwear", "sandal"],
    "sneaker": ["服装", "footwear", "sneaker"],
    "ankle_boot": ["服装", "footwear", "ankle_boot"],
    "trouser": ["服装", "bottoms", "trouser"],
    "bag": ["accessories", "bag"],
}
FIT = ("--near-duplicate-threshold", "1", "--c", "0.01")  # random tiny features: plain split, C fixed


def _cli(*args: object) -> str:
    r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def _predict(model: Path, images: Path, out: Path, *extra: object) -> Path:
    _cli("predict", model, images, "--out", out, "--no-progress", "--workers", "0", *extra)
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """A cache of 5 classes x 6 photos, a head with the tree (a file with only [parents]: the
    cache's categories are the classes), its native and ONNX models, 2 test photos per class."""
    root = tmp_path_factory.mktemp("tree")
    images = copy_sample_photos(root / "images", 6, CLASSES)
    test = root / "test"
    for c in CLASSES:
        (test / c).mkdir(parents=True)
        for p in sorted((SAMPLE_CATALOG / "test" / c).glob("*.png"))[:2]:
            shutil.copy(p, test / c / p.name)
    (root / "classes.toml").write_text(TREE, encoding="utf-8")
    # fp32 features whatever --precision auto picks here: native predict then runs fp32 as ONNX
    # does, so their nodes agree on any CPU (bf16 features on an AMX CPU differ by 1e-2)
    _cli("extract", images, "--out", root / "f.h5", "--backbone", "tiny", "--precision", "fp32", "--workers", "0",
         "--no-progress")  # fmt: skip
    _cli("fit-head", root / "f.h5", "--out", root / "head", "--classes", root / "classes.toml", *FIT)
    _cli("export", root / "head", "--out", root / "model")
    _cli("export", root / "head", "--out", root / "onnx", "--format", "onnx")
    return {"root": root, "test": test, "head": root / "head", "model": root / "model", "onnx": root / "onnx"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_tree_travels_with_the_head_and_both_exports(built):
    head = json.loads((built["head"] / "head.json").read_text(encoding="utf-8"))
    assert sorted(head["class_names"]) == sorted(CLASSES)  # only [parents]: classes = the cache's categories
    assert head["tree"]["parents"] == {
        "sandal": "footwear", "sneaker": "footwear", "ankle_boot": "footwear", "trouser": "bottoms",
        "footwear": "服装", "bottoms": "服装", "bag": "accessories",
    }  # fmt: skip
    for m in ("model", "onnx"):
        manifest = json.loads((built[m] / "manifest.json").read_text(encoding="utf-8"))
        assert manifest["tree"] == head["tree"] and manifest["parity"]["max_abs_diff"] <= 1e-3
    import onnx

    graph = onnx.load(str(built["onnx"] / "model.onnx")).graph
    probs = next(o for o in graph.output if o.name == "probabilities")
    assert probs.type.tensor_type.shape.dim[1].dim_value == len(CLASSES)  # still leaf probabilities
    meta = {p.key: p.value for p in onnx.load(str(built["onnx"] / "model.onnx")).metadata_props}
    assert json.loads(meta["tree"]) == head["tree"]  # the graph alone still says what it is


def test_predict_csv_and_jsonl_give_the_node_its_probability_and_path(built, tmp_path):
    rows = _jsonl(_predict(built["model"], built["test"], tmp_path / "p.jsonl", "--top-k", "5"))
    assert len(rows) == 10
    for row in rows:
        p = {t["label"]: t["probability"] for t in row["top_k"]}
        sums = {n: sum(p[c] for c in CLASSES if n in PATHS[c]) for n in {n for v in PATHS.values() for n in v}}
        # the deepest node at >= 0.5 on the greedy walk from the most probable top-level node
        want, here = [], sorted({v[0] for v in PATHS.values()}, key=lambda n: -sums[n])[:1]
        while here and sums[here[0]] >= 0.5:
            want.append(here[0])
            kids = {v[len(want)] for v in PATHS.values() if v[: len(want)] == want and len(v) > len(want)}
            here = sorted(kids, key=lambda n: -sums[n])[:1]
        t = row["tree"]
        assert [s["node"] for s in t["path"]] == want
        assert t["node"] == (want[-1] if want else None)
        for s in t["path"]:
            assert s["probability"] == pytest.approx(sums[s["node"]], abs=1e-6)
    with open(_predict(built["model"], built["test"], tmp_path / "p.csv"), encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[-4:] == ["node", "node_probability", "node_path", "error"]
    for row, jrow in zip(table, rows, strict=True):
        t = jrow["tree"]
        assert row["node"] == (t["node"] or "") and row["node_path"] == " > ".join(s["node"] for s in t["path"])
        assert row["node_probability"] == ("" if t["probability"] is None else f"{t['probability']:.6f}")


def test_a_photo_split_between_siblings_is_still_right_at_the_parent(built, tmp_path):
    """Pick a footwear photo whose best leaf is footwear but below the footwear total; a
    threshold between the two is above every leaf and below the parent: the answer is the
    parent "footwear" with path 服装 > footwear, and just below the leaf it is the leaf."""
    rows = _jsonl(_predict(built["model"], built["test"], tmp_path / "p.jsonl", "--top-k", "5"))
    feet = {"sandal", "sneaker", "ankle_boot"}
    chosen = None
    for row in rows:
        p = {t["label"]: t["probability"] for t in row["top_k"]}
        best = max(p, key=lambda c: p[c])
        if Path(row["path"]).parent.name in feet and best in feet:
            chosen = (row["path"], p[best], sum(p[c] for c in feet), best)
            break
    assert chosen is not None, "no footwear photo predicted as footwear"
    photo, leaf, parent, best = chosen
    assert leaf < parent  # the siblings share the mass (always: each has some)
    t = (leaf + parent) / 2
    (row,) = _jsonl(_predict(built["model"], photo, tmp_path / "one.jsonl", "--min-confidence", t))
    assert row["tree"]["node"] == "footwear" and row["label"] == best  # the leaf answer is unchanged
    assert [s["node"] for s in row["tree"]["path"]] == ["服装", "footwear"]
    assert row["tree"]["probability"] == pytest.approx(parent, abs=1e-6) and parent >= t > leaf
    (row,) = _jsonl(_predict(built["model"], photo, tmp_path / "two.jsonl", "--min-confidence", leaf * 0.999))
    assert row["tree"]["node"] == best and len(row["tree"]["path"]) == 3
    # the Python API says the same
    from pipeline.predict import Predictor

    (api,) = Predictor.load(built["model"], device="cpu").predict([photo], min_confidence=t, workers=0)
    assert api["node"] == "footwear" and [n for n, _ in api["node_path"]] == ["服装", "footwear"]


def test_onnx_predicts_the_same_nodes_as_native(built, tmp_path):
    a = _jsonl(_predict(built["model"], built["test"], tmp_path / "a.jsonl", "--top-k", "5"))
    b = _jsonl(_predict(built["onnx"], built["test"], tmp_path / "b.jsonl", "--top-k", "5"))
    for x, y in zip(a, b, strict=True):
        assert x["tree"]["node"] == y["tree"]["node"]
        assert x["tree"]["probability"] == pytest.approx(y["tree"]["probability"], abs=1e-4)


def test_evaluate_reports_per_level_accuracy_as_computed_by_hand(built, tmp_path):
    rows = _jsonl(_predict(built["model"], built["test"], tmp_path / "p.jsonl", "--top-k", "5"))
    t = 0.4
    _cli("evaluate", built["model"], built["test"], "--out", tmp_path / "r", "--min-confidence", t, "--workers", "0")
    m = json.loads((tmp_path / "r" / "metrics.json").read_text(encoding="utf-8"))["tree"]
    truth = [Path(r["path"]).parent.name for r in rows]
    probs = [{x["label"]: x["probability"] for x in r["top_k"]} for r in rows]
    for level in (1, 2, 3):

        def group(c: str, level: int = level) -> str:
            return PATHS[c][min(level, len(PATHS[c])) - 1]

        hits = []
        for c, p in zip(truth, probs, strict=True):
            mass: dict[str, float] = {}
            for leaf, q in p.items():
                mass[group(leaf)] = mass.get(group(leaf), 0.0) + q
            hits.append(max(mass, key=lambda g: mass[g]) == group(c))
        assert m["levels"][level - 1] == {
            "level": level, "n_nodes": len({group(c) for c in CLASSES}), "accuracy": pytest.approx(np.mean(hits))
        }  # fmt: skip
    assert m["leaf_accuracy"] == pytest.approx(
        np.mean([max(p, key=lambda c: p[c]) == c for c, p in zip(truth, probs, strict=True)])
    )
    assert m["leaf_accuracy"] == m["levels"][-1]["accuracy"]
    # the roll-up at t, from predict's own answers at the same threshold
    at_t = _jsonl(_predict(built["model"], built["test"], tmp_path / "t.jsonl", "--min-confidence", t))
    nodes = [r["tree"]["node"] for r in at_t]
    covered = [n is not None for n in nodes]
    right = [n in PATHS[c] for n, c in zip(nodes, truth, strict=True) if n is not None]
    assert m["min_confidence"] == t and m["rollup"]["coverage"] == pytest.approx(np.mean(covered))
    assert m["rollup"]["accuracy"] == (pytest.approx(np.mean(right)) if right else None)
    html = (tmp_path / "r" / "report.html").read_text(encoding="utf-8")
    assert 'id="tree-levels"' in html and "--min-confidence 0.4" in html


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('[parents]\nsandal = "footwear"\nfootwear = "shoes"\nshoes = "footwear"\n', "has a cycle: "),
        ('[parents]\nsnekaer = "footwear"\n', "'snekaer', which is not a class nor the parent of one (did you mean"),
        ('[parents]\nsandal = "bag"\n', "makes 'bag' a parent, but it is a class"),
    ],
)
def test_invalid_trees_are_an_error_naming_what_is_wrong(built, tmp_path, extra, message):
    (tmp_path / "c.toml").write_text(extra, encoding="utf-8")
    r = CliRunner().invoke(
        cli,
        [
            "fit-head",
            str(built["root"] / "f.h5"),
            "--out",
            str(tmp_path / "h"),
            "--classes",
            str(tmp_path / "c.toml"),
            *FIT,
        ],
    )
    assert r.exit_code == 1 and r.output.startswith("Error: "), r.output
    assert message in r.output and "Traceback" not in r.output
    if "snekaer" in message:
        assert "the classes are: " in r.output and "sneaker" in r.output
    assert not (tmp_path / "h").exists()


def test_a_tree_with_classes_and_renames(built, tmp_path):
    """With [classes], the tree names output classes (after [rename]); a class left out of
    [parents] is a top-level node of its own."""
    (tmp_path / "c.toml").write_text(
        '[classes]\nshoes = 0\ntrouser = 1\nbag = 2\n[rename]\nsandal = "shoes"\nsneaker = "shoes"\n'
        'ankle_boot = "shoes"\n[parents]\nshoes = "服装"\ntrouser = "服装"\n',
        encoding="utf-8",
    )
    _cli("fit-head", built["root"] / "f.h5", "--out", tmp_path / "h", "--classes", tmp_path / "c.toml", *FIT)
    head = json.loads((tmp_path / "h" / "head.json").read_text(encoding="utf-8"))
    assert head["class_names"] == ["shoes", "trouser", "bag"]
    assert head["tree"] == {"parents": {"shoes": "服装", "trouser": "服装"}}
    _cli("evaluate", tmp_path / "h", built["root"] / "f.h5", "--out", tmp_path / "r")
    m = json.loads((tmp_path / "r" / "metrics.json").read_text(encoding="utf-8"))["tree"]
    assert [lv["n_nodes"] for lv in m["levels"]] == [2, 3]  # {服装, bag}, then the three classes


def test_a_damaged_tree_in_head_json_is_refused_on_export(built, tmp_path):
    shutil.copytree(built["head"], tmp_path / "h")
    meta = json.loads((tmp_path / "h" / "head.json").read_text(encoding="utf-8"))
    meta["tree"]["parents"]["服装"] = "footwear"
    (tmp_path / "h" / "head.json").write_text(json.dumps(meta), encoding="utf-8")
    r = CliRunner().invoke(cli, ["export", str(tmp_path / "h"), "--out", str(tmp_path / "m")])
    assert r.exit_code == 1 and "has a cycle" in r.output and "re-run `headstart fit-head`" in r.output, r.output


def test_a_head_without_a_tree_predicts_as_before(tiny_head, tmp_path):
    _cli("export", tiny_head, "--out", tmp_path / "m")
    assert "tree" not in json.loads((tmp_path / "m" / "manifest.json").read_text())
    images = copy_sample_photos(tmp_path / "img", 1, ("bag",))
    with open(_predict(tmp_path / "m", images, tmp_path / "p.csv"), encoding="utf-8", newline="") as f:
        header = next(csv.reader(f))
    assert header == ["path", "label", "best_guess", "probability", "label_2", "probability_2",
                      "label_3", "probability_3", "error"]  # fmt: skip
    (row,) = _jsonl(_predict(tmp_path / "m", images, tmp_path / "p.jsonl"))
    assert "tree" not in row


def test_the_readme_deploy_script_rolls_up_like_predict(built, tmp_path):
    """The README's numpy roll-up over manifest.json's tree (no headstart, no torch) gives the
    same paths as ``headstart predict`` on the ONNX model."""
    from test_onnx_deploy import run_snippet

    photos = sorted(built["test"].rglob("*.png"))
    deployed = run_snippet(tmp_path, built["onnx"], photos)
    predicted = _jsonl(_predict(built["onnx"], built["test"], tmp_path / "p.jsonl"))
    by_path = {r["path"]: [s["node"] for s in r["tree"]["path"]] for r in predicted}
    assert [d["node_path"] for d in deployed] == [by_path[str(p)] for p in photos]
    assert any(len(d["node_path"]) >= 2 for d in deployed)  # the walk went below the top level


def test_a_fine_tuned_model_keeps_the_tree_label_map_and_threshold(built, tmp_path):
    """finetune records what the head had beyond its weights - the tree, the label map (here
    three folders merged into "shoes"), the class ids and --unknown-threshold - so the exported
    fine-tune rolls up like the head's model, and evaluate maps the folder names as the head did.
    A fine-tune directory written before it recorded them still exports, without a tree."""
    from pipeline.config import FinetuneConfig
    from pipeline.finetune.stage import finetune
    from pipeline.predict import Predictor

    (tmp_path / "c.toml").write_text(
        '[classes]\nshoes = 0\ntrouser = 1\nbag = 2\n[rename]\nsandal = "shoes"\nsneaker = "shoes"\n'
        'ankle_boot = "shoes"\n[parents]\nshoes = "服装"\ntrouser = "服装"\n',
        encoding="utf-8",
    )
    _cli("fit-head", built["root"] / "f.h5", "--out", tmp_path / "h", "--classes", tmp_path / "c.toml",
         "--unknown-threshold", 0.2, *FIT)  # fmt: skip
    head = json.loads((tmp_path / "h" / "head.json").read_text(encoding="utf-8"))
    ft = tmp_path / "ft"
    cfg = dict(epochs=1, batch_size=4, workers=0, precision="fp32", device="cpu", stages=2, progress=False)
    finetune(FinetuneConfig(images=str(built["root"] / "images"), head=str(tmp_path / "h"), out=str(ft), **cfg))
    _cli("export", ft, "--out", tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["provenance"]["source"] == "finetune" and manifest["head"]["estimator"] == "finetuned"
    assert manifest["tree"] == head["tree"] == {"parents": {"shoes": "服装", "trouser": "服装"}}
    for key in ("class_ids", "label_map", "unknown_threshold"):
        assert manifest["head"][key] == head[key] and head[key] is not None, key
    assert "temperature" not in manifest["head"]  # the probe's, not the fine-tuned network's
    assert Predictor.load(tmp_path / "m", device="cpu").unknown_threshold == 0.2

    with open(_predict(tmp_path / "m", built["test"], tmp_path / "p.csv"), encoding="utf-8", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[-4:] == ["node", "node_probability", "node_path", "error"] and len(table) == 10
    rows = _jsonl(_predict(tmp_path / "m", built["test"], tmp_path / "p.jsonl", "--top-k", "3"))
    under = {"服装": ("shoes", "trouser"), "shoes": ("shoes",), "trouser": ("trouser",), "bag": ("bag",)}
    for row, cells in zip(rows, table, strict=True):
        p = {t["label"]: t["probability"] for t in row["top_k"]}
        top = "服装" if p["shoes"] + p["trouser"] >= p["bag"] else "bag"
        want = [top] if sum(p[c] for c in under[top]) >= 0.5 else []
        if top == "服装":
            kid = max(("shoes", "trouser"), key=lambda c: p[c])
            want += [kid] if want and p[kid] >= 0.5 else []
        assert [s["node"] for s in row["tree"]["path"]] == want
        for s in row["tree"]["path"]:
            assert s["probability"] == pytest.approx(sum(p[c] for c in under[s["node"]]), abs=1e-6)
        assert cells["node_path"] == " > ".join(want) and cells["node"] == (want[-1] if want else "")
    assert any(r["tree"]["node"] for r in rows)
    # ONNX: the tree in the manifest and the graph's metadata, the same nodes
    _cli("export", ft, "--out", tmp_path / "o", "--format", "onnx")
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "o" / "model.onnx")).metadata_props}
    assert json.loads(meta["tree"]) == head["tree"]
    assert json.loads((tmp_path / "o" / "manifest.json").read_text(encoding="utf-8"))["tree"] == head["tree"]
    onnx_rows = _jsonl(_predict(tmp_path / "o", built["test"], tmp_path / "o.jsonl"))
    assert [r["tree"]["node"] for r in onnx_rows] == [r["tree"]["node"] for r in rows]

    # evaluate on the class folders: sandal/sneaker/ankle_boot count as shoes through the label map
    _cli("evaluate", tmp_path / "m", built["test"], "--out", tmp_path / "r", "--workers", "0")
    m = json.loads((tmp_path / "r" / "metrics.json").read_text(encoding="utf-8"))
    assert m["n"] == 10 and m["meta"]["excluded_other_categories"] == 0, m.get("meta")
    assert [lv["n_nodes"] for lv in m["tree"]["levels"]] == [2, 3]

    # a fine-tune from before: no tree, no ids, no label map in finetune.json
    old = tmp_path / "old_ft"
    shutil.copytree(ft, old)
    doc = json.loads((old / "finetune.json").read_text(encoding="utf-8"))
    doc.pop("tree")
    doc["head"] = {k: doc["head"][k] for k in ("kind", "init")}
    (old / "finetune.json").write_text(json.dumps(doc), encoding="utf-8")
    _cli("export", old, "--out", tmp_path / "m_old")
    assert "tree" not in json.loads((tmp_path / "m_old" / "manifest.json").read_text(encoding="utf-8"))
    with open(_predict(tmp_path / "m_old", built["test"], tmp_path / "old.csv"), encoding="utf-8", newline="") as f:
        assert "node" not in next(csv.reader(f))

    # a damaged tree in finetune.json is an error naming the file, not a model without a tree
    doc = json.loads((ft / "finetune.json").read_text(encoding="utf-8"))
    doc["tree"]["parents"]["服装"] = "shoes"
    (old / "finetune.json").write_text(json.dumps(doc), encoding="utf-8")
    r = CliRunner().invoke(cli, ["export", str(old), "--out", str(tmp_path / "m_bad")])
    assert r.exit_code == 1 and "finetune.json" in r.output and "re-run `headstart finetune`" in r.output, r.output


def test_the_tree_benchmark_compares_roll_up_and_leaf_on_the_same_unsure_photos(monkeypatch):
    """bench/tree_rollup.py's figures on five photos worked by hand: four are unsure at 0.5; the
    roll-up answers three (the bag photo's best top-level node, accessories, is only 0.4), all
    right at the parent, where the leaf head is right on one of the three."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    import tomllib

    from tree_rollup import CLASSES_TOML, on_unsure

    from pipeline.data.tree import Tree
    from pipeline.probe.hierarchy import TreeIndex, tree_metrics

    names = ["t-shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot"]
    index = TreeIndex.build(Tree.parse(tomllib.loads(CLASSES_TOML)["parents"], "bench"), names)
    assert index.depth == 2 and len(index.level_groups(0)) == 10 and len(set(index.level_groups(0))) == 5

    def photo(**p: float) -> list[float]:
        return [p.get(n, 0.0) for n in names]

    proba = np.array([
        photo(**{"t-shirt_top": 0.35, "shirt": 0.3, "pullover": 0.15, "coat": 0.1, "bag": 0.1}),  # shirt
        photo(sneaker=0.45, sandal=0.4, bag=0.15),  # sneaker
        photo(bag=0.4, sandal=0.35, **{"t-shirt_top": 0.25}),  # bag
        photo(coat=0.9, shirt=0.1),  # coat: sure
        photo(dress=0.45, coat=0.35, pullover=0.2),  # pullover
    ])  # fmt: skip
    y = np.array([names.index(n) for n in ("shirt", "sneaker", "bag", "coat", "pullover")])
    u = on_unsure(index, proba, y, 0.5)
    assert [index.nodes[i] if i >= 0 else None for i in u["nodes"]] == ["tops", "footwear", None, "coat", "tops"]
    assert u["n"] == 4 and u["leaf_accuracy"] == 0.5 and u["rollup_coverage"] == 0.75
    assert u["rollup_accuracy"] == 1.0 and u["leaf_accuracy_where_rollup_answers"] == pytest.approx(1 / 3)
    assert u["parent_accuracy"] == 1.0
    same = tree_metrics(index, proba, y, 0.5)["unsure"]  # what evaluate reports
    assert {k: same[k] for k in same} == {k: u[k] for k in same}
