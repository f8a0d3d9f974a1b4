"""The extract summary counts what happened (issue 17, item 12): skips as skips, a skip of an
unchanged file remembered (keyed by its content and the decode limits) so it is not decoded
every run, and rows removed or relabelled since the last run."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
from conftest import copy_sample_photos
from PIL import Image

import pipeline.data.loader as loader_mod

TINY = ("--backbone", "tiny", "--workers", "0", "--no-progress")


@pytest.fixture
def catalog(tmp_path):
    images = copy_sample_photos(tmp_path / "images")
    (images / "bag" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 40)
    Image.new("RGB", (80, 80), (200, 30, 60)).save(images / "bag" / "large.png")  # 6400 px
    return images


@pytest.fixture
def decodes(monkeypatch):
    """The files the loader reads to decode, in this process (--workers 0)."""
    seen: list[str] = []
    real = loader_mod.read_image_bytes

    def spy(src, *a, **kw):
        seen.append(str(src))
        return real(src, *a, **kw)

    monkeypatch.setattr(loader_mod, "read_image_bytes", spy)
    return seen


def _summary(r) -> str:
    assert r.exit_code == 0, r.output
    return r.output.strip().splitlines()[-1]


def test_skips_are_counted_as_skips_and_not_decoded_again(catalog, tmp_path, run_cli, decodes):
    out = tmp_path / "f.h5"
    limit = ("--max-pixels", "5000")
    first = _summary(run_cli("extract", catalog, "--out", out, *TINY, *limit))
    assert re.search(r"18 rows, 3 classes; extracted 18 \(.*\), reused 0, skipped 2$", first), first
    assert len(decodes) == 20

    decodes.clear()
    again = _summary(run_cli("extract", catalog, "--out", out, *TINY, *limit))
    assert again.endswith("extracted 0, reused 18, skipped 2 (2 known from earlier runs, not decoded again)"), again
    assert decodes == []  # neither the truncated file nor the large one was opened

    # Other limits are another question: both are tried again, and the large photo now gives a row.
    raised = _summary(run_cli("extract", catalog, "--out", out, *TINY, "--max-pixels", "100000"))
    assert sorted(p.rsplit("/", 1)[-1] for p in decodes) == ["large.png", "truncated.jpg"]
    assert re.search(r"19 rows, 3 classes; extracted 1 \(.*\), reused 18, skipped 1$", raised), raised


def test_a_repaired_file_is_decoded_again(catalog, tmp_path, run_cli, decodes):
    out = tmp_path / "f.h5"
    run_cli("extract", catalog, "--out", out, *TINY)
    shutil.copy(catalog / "bag" / "large.png", catalog / "bag" / "truncated.jpg")  # new bytes, new key
    decodes.clear()
    line = _summary(run_cli("extract", catalog, "--out", out, *TINY))
    assert decodes == []  # its bytes are now large.png's: a duplicate of a row, nothing to decode
    assert line.endswith("skipped 0"), line


def test_removed_and_relabelled_rows_are_reported(catalog, tmp_path, run_cli):
    out = tmp_path / "f.h5"
    run_cli("extract", catalog, "--out", out, *TINY)
    bags = sorted(p for p in (catalog / "bag").glob("*.png") if p.name != "large.png")
    bags[0].unlink()
    bags[1].rename(catalog / "sneaker" / bags[1].name)
    line = _summary(run_cli("extract", catalog, "--out", out, *TINY))
    assert ", removed 1, relabelled 1, skipped 1" in line, line


def test_relabel_counts_match_a_per_row_comparison_of_every_label():
    """scan.label_changes (a sorted intersection and shared codes) against the plain meaning:
    per content key, (label name, every attribute cell) before and after, with unlabelled and
    conflict cells, renamed and added classes, removed and new rows."""
    from pipeline.cache.h5io import Column
    from pipeline.cache.index import IndexContents
    from pipeline.cache.scan import LabelColumns, label_changes

    rng = np.random.default_rng(0)
    keys = [f"{i:032x}" for i in rng.permutation(400)]

    def side(rows, names, colours):
        labels = rng.integers(-1, len(names), len(rows)).astype(np.int32)
        cells = rng.integers(-2, len(colours), len(rows)).astype(np.int32)
        return [keys[i] for i in rows], labels, names, {"colour": Column(cells, colours)}

    def plain(hashes, labels, names, attrs):
        col = attrs["colour"]
        return {
            h: (names[a] if a >= 0 else None, col.values[b] if b >= 0 else None)
            for h, a, b in zip(hashes, labels.tolist(), col.labels.tolist(), strict=True)
        }

    before = side(range(0, 300), ["bag", "lipstick", "mascara"], ["red", "nude"])
    after = side(range(50, 400), ["bag", "lip", "mascara", "口红"], ["nude", "red", "rose"])
    old, new = plain(*before), plain(*after)
    want = (len(old.keys() - new.keys()), sum(old[h] != new[h] for h in old.keys() & new.keys()))
    contents = IndexContents(
        content_hash=after[0], paths=after[0], labels=after[1], class_names=after[2], attrs={},
        location=[], segment_rows={}, dtype="float16", feature_dim=1, attributes=after[3],
    )  # fmt: skip
    got = label_changes(LabelColumns.of(np.array(before[0], dtype="S32"), *before[1:]), contents)
    assert got == want and want[0] == 50 and 0 < want[1] < 250
    assert label_changes(LabelColumns.of(before[0], before[1], before[2]), contents) == (50, 250)  # a column added
