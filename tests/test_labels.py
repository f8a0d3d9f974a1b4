"""Label maps: merge, rename, drop and add categories without touching the feature cache."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from conftest import copy_sample_photos

from pipeline.config import ExtractConfig, FitHeadConfig
from pipeline.data import SAMPLE_CATALOG
from pipeline.data.labels import LabelMap, apply_label_map
from pipeline.errors import InputError
from pipeline.extract import extract
from pipeline.fit_head import fit_head


def _map(text: str, tmp_path) -> LabelMap:
    p = tmp_path / "classes.toml"
    p.write_text(text, encoding="utf-8")
    return LabelMap.load(p)


def test_merge_rename_drop_and_stable_ids(tmp_path):
    m = _map(
        'drop = ["misc"]\n[classes]\nlipstick = 0\n"粉底" = 1\nperfume = 3\n'
        '[rename]\nlip_liner = "lipstick"\nfoundation = "粉底"\n',
        tmp_path,
    )
    cats = ["foundation", "lip_liner", "lipstick", "misc", "perfume"]
    labels = np.array([0, 1, 2, 3, 4, -1, 2])
    out = apply_label_map(m, cats, labels)
    assert out.class_names == ["lipstick", "粉底", "perfume"] and out.class_ids == [0, 1, 3]
    assert out.y.tolist() == [1, 0, 0, -1, 2, -1, 0]
    assert out.absent == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[classes]\na = 0\nb = 0\n", "both have id 0"),
        ('[classes]\na = 0\n[rename]\nx = "nope"\n', "maps 'x' to 'nope', which is not under [classes]"),
        ('drop = ["a"]\n[classes]\na = 0\n', "both dropped and used"),
        ("[classes]\na = -1\n", "ids are whole numbers >= 0"),
        ("drop = []\n", "needs a [classes] table"),
        ("[classes\n", "is not valid TOML"),
    ],
)
def test_bad_label_maps_say_what_to_do(tmp_path, text, message):
    with pytest.raises(InputError) as e:
        _map(text, tmp_path)
    assert message in str(e.value)


def test_unmapped_category_is_an_error_with_the_next_free_id(tmp_path):
    m = _map("[classes]\na = 0\nb = 4\n", tmp_path)
    with pytest.raises(InputError) as e:
        apply_label_map(m, ["a", "b", "c"], np.array([0, 1, 2]))
    assert "category 'c' is in the photos but not in label map" in str(e.value)
    assert "next free: 5" in str(e.value)


def _digest(path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_size


def test_merging_two_classes_and_adding_one_changes_nothing_in_the_cache(tmp_path, run_cli):
    """v1: bag, sneaker, sandal (the trouser photos are in the cache but dropped). v2: sneaker
    and sandal merged into 'shoes', trouser added. Only fit-head reruns; the cache file keeps
    its bytes, size and mtime."""
    root = copy_sample_photos(tmp_path / "images", 6, ("bag", "sneaker", "sandal", "trouser"))
    cache = tmp_path / "features.h5"
    extract(ExtractConfig(images=str(root), out=str(cache), backbone="tiny", workers=0, progress=False))
    before = _digest(cache)

    v1 = tmp_path / "v1.toml"
    v1.write_text('drop = ["trouser"]\n[classes]\nbag = 0\nsneaker = 1\nsandal = 2\n')
    v2 = tmp_path / "v2.toml"
    v2.write_text('[classes]\nbag = 0\nshoes = 3\ntrouser = 4\n[rename]\nsneaker = "shoes"\nsandal = "shoes"\n')
    common = ("--near-duplicate-threshold", "1", "--c", "0.1")
    r1 = run_cli("fit-head", cache, "--out", tmp_path / "head1", "--classes", v1, *common)
    r2 = run_cli("fit-head", cache, "--out", tmp_path / "head2", "--classes", v2, *common)
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output

    assert _digest(cache) == before
    assert not (tmp_path / "features.h5.journal").exists()
    h1 = json.loads((tmp_path / "head1" / "head.json").read_text())
    h2 = json.loads((tmp_path / "head2" / "head.json").read_text())
    assert h1["class_names"] == ["bag", "sneaker", "sandal"] and h1["class_ids"] == [0, 1, 2]
    assert h2["class_names"] == ["bag", "shoes", "trouser"] and h2["class_ids"] == [0, 3, 4]
    assert h2["metrics"]["per_class"]["shoes"]["support"] > h2["metrics"]["per_class"]["bag"]["support"]
    assert h2["label_map"]["text"] == v2.read_text() and len(h2["label_map"]["sha256"]) == 64
    with np.load(tmp_path / "head2" / "head.npz", allow_pickle=False) as z:
        assert z["weight"].shape[0] == 3

    # evaluate maps the cache's folder names through the head's label map: sneaker -> shoes.
    r = run_cli("evaluate", tmp_path / "head2", cache, "--out", tmp_path / "report")
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert list(m["per_class"]) == ["bag", "shoes", "trouser"] and m["n"] == 24
    assert m["per_class"]["shoes"]["support"] == 12
    r = run_cli("evaluate", tmp_path / "head1", cache, "--out", tmp_path / "report1")
    assert "6 photos of other categories left out" in r.output  # trouser was dropped in v1
    assert _digest(cache) == before


def test_a_new_folder_extracts_only_its_photos(tmp_path):
    """Adding a category = a new folder: extract runs the backbone on the new photos only."""
    root = copy_sample_photos(tmp_path / "images", 5, ("bag", "sneaker"))
    cache = tmp_path / "f.h5"
    kw = dict(images=str(root), out=str(cache), backbone="tiny", workers=0, progress=False)
    extract(ExtractConfig(**kw))
    (root / "sandal").mkdir()
    for p in sorted((SAMPLE_CATALOG / "train" / "sandal").glob("*.png"))[:5]:
        shutil.copy(p, root / "sandal" / p.name)
    s = extract(ExtractConfig(**kw))
    assert (s.extracted, s.reused) == (5, 10) and s.class_names == ["bag", "sandal", "sneaker"]
    fit = fit_head(FitHeadConfig(cache=str(cache), out=str(tmp_path / "head"), near_duplicate_threshold=None))
    assert json.loads((fit.path / "head.json").read_text())["class_names"] == ["bag", "sandal", "sneaker"]
