"""A file name that is not valid UTF-8 (issue 18, item 4, the output side): predict writes it
reversibly in CSV (the original bytes) and JSON Lines (``\\udcXX`` escapes), never a traceback."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest

TINY = ("--workers", "0", "--no-progress")
BAD = b"l\xe8vres-\xff.png"  # latin-1 bytes: not UTF-8


@pytest.fixture(scope="module")
def model_and_photos(tmp_path_factory, tiny_head):
    from click.testing import CliRunner

    from pipeline.cli import cli

    root = tmp_path_factory.mktemp("bad_names")
    r = CliRunner().invoke(cli, ["export", str(tiny_head), "--out", str(root / "model")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    photos = root / "photos"
    photos.mkdir()
    src = next((tiny_head.parent / "images" / "bag").glob("*.png"))
    shutil.copy(src, photos / "good.png")
    shutil.copy(src, os.path.join(os.fsencode(photos), BAD))
    return root / "model", photos


def test_predict_csv_keeps_the_original_bytes(model_and_photos, run_cli, tmp_path):
    model, photos = model_and_photos
    out = tmp_path / "p.csv"
    r = run_cli("predict", model, photos, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(f)}
    names = {os.fsencode(n) for n in rows}
    assert names == {b"good.png", BAD}
    assert all(row["label"] and not row["error"] for row in rows.values())


def test_predict_jsonl_escapes_them_as_valid_json(model_and_photos, run_cli, tmp_path):
    model, photos = model_and_photos
    out = tmp_path / "p.jsonl"
    r = run_cli("predict", model, photos, "--out", out, *TINY)
    assert r.exit_code == 0, r.output
    text = out.read_bytes().decode("utf-8")  # strictly valid UTF-8
    rows = [json.loads(line) for line in text.splitlines()]
    assert {os.fsencode(Path(row["path"]).name) for row in rows} == {b"good.png", BAD}
