"""What a new user hits in the first hour (issue 17), each through the CLI as a user runs it:
wrong kinds of --out, file permissions, tiny classes, unknown rows, ONNX evaluate, evaluating on
the training photos, typos and ranges, FIFOs, corrupted features, CSV formula injection,
staging folders left by kill -9."""

from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_sample_photos
from PIL import Image

from pipeline.data import SAMPLE_CATALOG

REPO = Path(__file__).resolve().parents[1]
TINY = ("--backbone", "tiny", "--workers", "0", "--no-progress")


def _ok(r):
    assert r.exit_code == 0, r.output
    return r.output


def _usage(r) -> str:
    assert r.exit_code == 2, r.output
    assert "Traceback" not in r.output
    return r.output


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Photos, a tiny-backbone cache, a head and a native model - built with the CLI."""
    from click.testing import CliRunner

    from pipeline.cli import cli

    root = tmp_path_factory.mktemp("first_hour")
    images = copy_sample_photos(root / "images")

    def run(*args):
        r = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert r.exit_code == 0, r.output

    run("extract", images, "--out", root / "f.h5", *TINY)
    run("fit-head", root / "f.h5", "--out", root / "head", "--near-duplicate-threshold", "1")
    run("export", root / "head", "--out", root / "model")
    return root


# --------------------------------------------------------------------------- 3: output paths


@pytest.fixture
def a_file(tmp_path) -> Path:
    p = tmp_path / "some.csv"
    p.write_text("x\n")
    return p


def test_fit_head_out_is_a_file(chain, run_cli, a_file):
    out = _usage(run_cli("fit-head", chain / "f.h5", "--out", a_file))
    assert f"--out {a_file} is a file; --out takes a directory" in out


def test_evaluate_out_is_a_file(chain, run_cli, a_file):
    out = _usage(run_cli("evaluate", chain / "head", chain / "f.h5", "--out", a_file))
    assert "is a file; --out takes a directory" in out


def test_finetune_out_is_a_file(chain, run_cli, a_file):
    out = _usage(run_cli("finetune", chain / "images", "--head", chain / "head", "--out", a_file, "--epochs", "1"))
    assert "is a file; --out takes a directory" in out


def test_export_out_is_a_file(chain, run_cli, a_file):
    assert "is a file; --out takes a directory" in _usage(run_cli("export", chain / "head", "--out", a_file))


def test_demo_out_is_a_file(run_cli, a_file):
    assert "is a file; --out takes a directory" in _usage(run_cli("demo", "--out", a_file, "--backbone", "tiny"))


def test_predict_out_is_a_directory(chain, run_cli, tmp_path):
    out = _usage(run_cli("predict", chain / "model", chain / "images", "--out", chain / "head"))
    assert "is a directory; --out takes a file path, e.g. --out" in out and "predictions.csv" in out
    out = _usage(run_cli("predict", chain / "model", chain / "images", "--out", "-", "--embeddings", tmp_path))
    assert "--embeddings" in out and "is a directory" in out


def test_extract_out_is_a_directory_or_unwritable(chain, run_cli, tmp_path):
    (tmp_path / "artifacts").mkdir()
    for out in (tmp_path / "artifacts", f"{tmp_path / 'new'}/"):
        text = _usage(run_cli("extract", chain / "images", "--out", out, *TINY))
        assert "--out takes a file path, e.g. --out" in text and "features.h5" in text
        assert "does not exist" not in text
    text = _usage(run_cli("extract", chain / "images", "--out", "/proc/x.h5", *TINY))
    assert "cannot create files in /proc" in text
    text = _usage(run_cli("extract", chain / "images", "--out", chain / "f.h5" / "x.h5", *TINY))
    assert "is a file, not a directory" in text


def test_similar_cache_is_a_directory(chain, run_cli):
    query = next((chain / "images" / "bag").glob("*.png"))
    out = _usage(run_cli("similar", query, "--cache", chain / "head"))
    assert "is a directory" in out
    r = run_cli("similar", chain / "images", "--cache", chain / "f.h5")
    assert r.exit_code == 1 and "is not a regular file" in r.output and "does not exist" not in r.output


# --------------------------------------------------------------------------- 4: permissions


def test_finetune_files_follow_the_umask(chain, run_cli, tmp_path):
    old = os.umask(0o022)
    try:
        _ok(run_cli("finetune", chain / "images", "--head", chain / "head", "--out", tmp_path / "ft", "--epochs", "1",
                    "--batch-size", "6", "--workers", "0", "--device", "cpu", "--no-progress"))  # fmt: skip
    finally:
        os.umask(old)
    for name in ("model.pt", "finetune.json"):
        assert stat.S_IMODE((tmp_path / "ft" / name).stat().st_mode) == 0o644, name


# --------------------------------------------------------------------------- 6: tiny classes


def test_class_with_one_photo_is_warned_about_and_left_out_of_macro_f1(tmp_path, run_cli):
    images = copy_sample_photos(tmp_path / "images")
    (images / "hat").mkdir()
    shutil.copy(sorted((SAMPLE_CATALOG / "train" / "pullover").glob("*.png"))[0], images / "hat" / "one.png")
    _ok(run_cli("extract", images, "--out", tmp_path / "f.h5", *TINY))
    out = _ok(run_cli("fit-head", tmp_path / "f.h5", "--out", tmp_path / "head", "--near-duplicate-threshold", "1"))
    assert "warning: 1 class(es) too small to validate: hat (1 photo)" in out
    head = json.loads((tmp_path / "head" / "head.json").read_text(encoding="utf-8"))
    assert any("too small to validate" in w for w in head["warnings"])
    m = head["metrics"]
    assert m["classes_without_photos"] == ["hat"] and m["macro_f1_classes"] == 3
    others = [m["per_class"][c]["f1"] for c in ("bag", "sneaker", "trouser")]
    assert m["macro_f1"] == pytest.approx(np.mean(others))


# --------------------------------------------------------------------------- 7: unknown rows


def test_unknown_row_keeps_its_best_guess(chain, run_cli, tmp_path):
    out = tmp_path / "p.csv"
    _ok(run_cli("predict", chain / "model", chain / "images", "--out", out, "--unknown-threshold", "1",
                "--top-k", "2", "--workers", "0", "--no-progress"))  # fmt: skip
    with open(out, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:4] == ["path", "label", "best_guess", "probability"]
    assert all(r["label"] == "unknown" for r in rows)
    assert all(r["best_guess"] in ("bag", "sneaker", "trouser") and r["best_guess"] != r["label_2"] for r in rows)
    jl = tmp_path / "p.jsonl"
    _ok(run_cli("predict", chain / "model", chain / "images", "--out", jl, "--unknown-threshold", "1",
                "--workers", "0", "--no-progress"))  # fmt: skip
    lines = [json.loads(x) for x in jl.read_text(encoding="utf-8").splitlines()]
    assert [x["best_guess"] for x in lines] == [r["best_guess"] for r in rows]


# --------------------------------------------------------------------------- 9, 10: evaluate


def test_evaluate_takes_an_onnx_model(chain, run_cli, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    _ok(run_cli("export", chain / "head", "--out", tmp_path / "onnx", "--format", "onnx"))
    _ok(run_cli("evaluate", tmp_path / "onnx", chain / "images", "--out", tmp_path / "r1", "--workers", "0",
                "--no-progress"))  # fmt: skip
    _ok(run_cli("evaluate", chain / "model", chain / "images", "--out", tmp_path / "r2", "--workers", "0",
                "--no-progress"))  # fmt: skip
    m1, m2 = (json.loads((tmp_path / r / "metrics.json").read_text()) for r in ("r1", "r2"))
    assert m1["accuracy"] == pytest.approx(m2["accuracy"]) and m1["n"] == m2["n"] == 18
    assert m1["log_loss"] == pytest.approx(m2["log_loss"], abs=1e-3)
    r = run_cli("evaluate", tmp_path / "onnx", chain / "f.h5", "--out", tmp_path / "r3")
    assert r.exit_code == 1 and "scores photos, not cached features" in r.output


def test_evaluating_on_the_training_photos_is_warned_about(chain, run_cli, tmp_path):
    out = _ok(run_cli("evaluate", chain / "head", chain / "f.h5", "--out", tmp_path / "r"))
    assert "warning: all 18 evaluated photos were used to fit" in out
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["meta"]["photos_the_head_was_fitted_on"] == 18
    out = _ok(run_cli("evaluate", chain / "model", chain / "images", "--out", tmp_path / "r2", "--workers", "0",
                      "--no-progress"))  # fmt: skip
    assert "all 18 evaluated photos were used to fit" in out
    # New photos of the same classes: no warning.
    fresh = tmp_path / "fresh"
    for cls in ("bag", "sneaker", "trouser"):
        (fresh / cls).mkdir(parents=True)
        for p in sorted((SAMPLE_CATALOG / "train" / cls).glob("*.png"))[6:9]:
            shutil.copy(p, fresh / cls / p.name)
    mixed = fresh / "bag" / "seen.png"
    shutil.copy(next((chain / "images" / "bag").glob("*.png")), mixed)
    out = _ok(run_cli("evaluate", chain / "model", fresh, "--out", tmp_path / "r3", "--workers", "0", "--no-progress"))
    assert "warning: 1 of 10 evaluated photos were used to fit" in out


def test_backbone_mismatch_error_is_readable(chain, run_cli, tmp_path):
    other = tmp_path / "lite.h5"
    (tmp_path / "one" / "bag").mkdir(parents=True)
    shutil.copy(next((chain / "images" / "bag").glob("*.png")), tmp_path / "one" / "bag" / "a.png")
    _ok(run_cli("extract", tmp_path / "one", "--out", other, "--backbone", "efficientnet_lite0", "--workers", "0",
                "--no-progress"))  # fmt: skip
    r = run_cli("evaluate", chain / "head", other, "--out", tmp_path / "rep")
    assert r.exit_code == 1 and "expects tiny" in r.output
    assert max(len(line) for line in r.output.splitlines()) <= 160


# --------------------------------------------------------------------------- 14: small things


def test_drop_of_a_category_that_does_not_exist(chain, run_cli, tmp_path):
    classes = tmp_path / "classes.toml"
    classes.write_text('drop = ["seurm", "sneaker"]\n[classes]\nbag = 0\ntrouser = 1\n', encoding="utf-8")
    r = run_cli("fit-head", chain / "f.h5", "--out", tmp_path / "head", "--classes", classes)
    assert r.exit_code == 1 and "drop lists 'seurm', which is not a category" in r.output
    assert "bag, sneaker, trouser" in r.output


@pytest.mark.parametrize(
    "args",
    [
        ("--val-fraction", "1.5"),
        ("--val-fraction", "0"),
        ("--c", "-1"),
        ("--c", "0"),
        ("--c", "nan"),
        ("--c", "inf"),
        ("--hidden", "100000000"),
        ("--unknown-threshold", "nan"),
    ],
)
def test_numeric_options_out_of_range_are_usage_errors(chain, run_cli, tmp_path, args):
    out = _usage(run_cli("fit-head", chain / "f.h5", "--out", tmp_path / "head", *args))
    assert f"Invalid value for '{args[0]}'" in out


def test_out_of_range_value_in_a_config_file_is_a_usage_error(chain, run_cli, tmp_path):
    cfg = tmp_path / "h.toml"
    cfg.write_text("[fit-head]\nval-fraction = 1.5\n", encoding="utf-8")
    out = _usage(run_cli("fit-head", chain / "f.h5", "--out", tmp_path / "head", "--config", cfg))
    assert "val-fraction" in out and str(cfg) in out


def test_one_file_could_not_be_read_is_singular(chain, run_cli, tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    out = _ok(run_cli("predict", chain / "model", bad, "--out", tmp_path / "p.csv", "--workers", "0", "--no-progress"))
    assert "1 predictions, 1 file could not be read" in out


def test_stdin_paths_come_back_as_given(chain, run_cli, monkeypatch):
    monkeypatch.chdir(chain)
    rel = sorted(Path("images/bag").glob("*.png"))[:2]
    r = run_cli("predict", "model", "-", "--out", "-", "--format", "jsonl", "--workers", "0", "--no-progress",
                input="\n".join(map(str, rel)))  # fmt: skip
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert [x["path"] for x in rows] == [str(p) for p in rel]
    r = run_cli("predict", "model", "images/bag", "--out", "-", "--format", "jsonl", "--workers", "0", "--no-progress")
    assert json.loads(r.stdout.splitlines()[0])["path"] == str(sorted(Path("images/bag").glob("*.png"))[0])


def test_similar_exclude_self(chain, run_cli):
    query = sorted((chain / "images" / "sneaker").glob("*.png"))[0]
    r = run_cli("similar", query, "--cache", chain / "f.h5", "-k", "3", "--json")
    assert json.loads(_ok(r))[0]["path"] == f"sneaker/{query.name}"
    r = run_cli("similar", query, "--cache", chain / "f.h5", "-k", "3", "--json", "--exclude-self")
    got = json.loads(_ok(r))
    assert len(got) == 3 and f"sneaker/{query.name}" not in [m["path"] for m in got]


def test_export_help_says_how_to_install_onnx_from_the_clone(run_cli):
    out = " ".join(_ok(run_cli("export", "--help")).split())
    assert "pip install '.[onnx]'" in out and "headstart[onnx]" not in out


# --------------------------------------------------------------------------- 15: FIFOs


def test_predict_skips_a_fifo_in_a_folder_and_refuses_one_given(chain, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(next((chain / "images" / "bag").glob("*.png")), photos / "a.png")
    os.mkfifo(photos / "x.jpg")
    cmd = [sys.executable, "-m", "pipeline", "predict", str(chain / "model"), str(photos), "--out", "-",
           "--workers", "0", "--no-progress"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    assert "a.png" in r.stdout and "x.jpg" not in r.stdout
    cmd[5] = str(photos / "x.jpg")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 1 and "is not a regular file" in r.stderr


# --------------------------------------------------------------------------- 16: corrupted rows


def test_non_finite_features_are_an_error_naming_the_rows(chain, run_cli, tmp_path, monkeypatch):
    from pipeline.cache.store import Cache

    real = Cache.features

    def damaged(self, *args, **kw):
        x = np.array(real(self, *args, **kw), dtype=np.float32)
        x[1] = np.nan
        return x

    monkeypatch.setattr(Cache, "features", damaged)
    real_iter = Cache.iter_features

    def damaged_iter(self, *args, **kw):
        for start, chunk in real_iter(self, *args, **kw):
            chunk = np.array(chunk, dtype=np.float32)
            if start == 0:
                chunk[1] = np.nan
            yield start, chunk

    monkeypatch.setattr(Cache, "iter_features", damaged_iter)
    query = tmp_path / "new.png"  # not in the cache: embedded, then compared with every row
    Image.open(sorted((SAMPLE_CATALOG / "train" / "bag").glob("*.png"))[20]).save(query)
    for args in (
        ("fit-head", chain / "f.h5", "--out", tmp_path / "h"),
        ("evaluate", chain / "head", chain / "f.h5", "--out", tmp_path / "r"),
        ("similar", query, "--cache", chain / "f.h5"),
    ):
        r = run_cli(*args)
        assert r.exit_code == 1 and "Traceback" not in r.output, r.output
        assert "1 row(s) have features that are not finite" in r.output and "headstart cache verify" in r.output


# --------------------------------------------------------------------------- 17: CSV injection


HOSTILE = ["=cmd|' -C calc'!A0.png", "@SUM(1+1)*cmd.png", "+1.png"]  # "-..." is guarded too (not a CLI arg)


def test_csv_cells_are_guarded_against_formula_injection(chain, run_cli, tmp_path, monkeypatch):
    photos = tmp_path / "photos"
    photos.mkdir()
    src = next((chain / "images" / "bag").glob("*.png"))
    for name in HOSTILE:
        shutil.copy(src, photos / name)
    out = tmp_path / "p.csv"
    _ok(run_cli("predict", chain / "model", *[photos / n for n in HOSTILE], "--out", out, "--workers", "0",
                "--no-progress"))  # fmt: skip
    cells = [row[0] for row in csv.reader(out.open(encoding="utf-8"))][1:]
    assert cells == [f"{photos / n}" for n in HOSTILE]  # absolute paths start with /: harmless
    rel = tmp_path / "rel.csv"
    monkeypatch.chdir(photos)
    _ok(run_cli("predict", chain / "model", *HOSTILE, "--out", rel, "--workers", "0", "--no-progress"))
    _ok(run_cli("predict", chain / "model", *HOSTILE, "--out", tmp_path / "raw.csv", "--raw-csv", "--workers", "0",
                "--no-progress"))  # fmt: skip
    _ok(run_cli("predict", chain / "model", *HOSTILE, "--out", tmp_path / "p.jsonl", "--workers", "0",
                "--no-progress"))  # fmt: skip
    cells = [row[0] for row in csv.reader(rel.open(encoding="utf-8"))][1:]
    assert cells == ["'" + n for n in HOSTILE]
    assert [row[0] for row in csv.reader((tmp_path / "raw.csv").open(encoding="utf-8"))][1:] == HOSTILE
    assert [json.loads(x)["path"] for x in (tmp_path / "p.jsonl").read_text().splitlines()] == HOSTILE


def test_class_names_in_evaluation_csv_and_html_are_harmless(tmp_path, run_cli):
    images = copy_sample_photos(tmp_path / "images", classes=("bag", "sneaker"))
    hostile = '=HYPERLINK("x")<script>alert(1)</script>'
    shutil.move(images / "sneaker", images / hostile.replace("/", "_"))
    name = hostile.replace("/", "_")
    _ok(run_cli("extract", images, "--out", tmp_path / "f.h5", *TINY))
    _ok(run_cli("fit-head", tmp_path / "f.h5", "--out", tmp_path / "head", "--near-duplicate-threshold", "1"))
    _ok(run_cli("evaluate", tmp_path / "head", tmp_path / "f.h5", "--out", tmp_path / "rep"))
    rows = list(csv.reader((tmp_path / "rep" / "per_class.csv").open(encoding="utf-8")))
    assert "'" + name in [r[0] for r in rows]
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html


# --------------------------------------------------------------------------- 18: staging folders


def test_fit_head_removes_staging_folders_of_a_killed_run(chain, run_cli, tmp_path):
    head = tmp_path / "head"
    _ok(run_cli("fit-head", chain / "f.h5", "--out", head, "--near-duplicate-threshold", "1"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [tmp_path / f".head.partial-{dead.pid}-0123456789ab", tmp_path / f".head.old-{dead.pid}-x1y2"]
    live = tmp_path / f".head.partial-{os.getpid()}-ba9876543210"
    for d in (*stale, live):
        d.mkdir()
        (d / "head.npz").write_bytes(b"half")
    _ok(run_cli("fit-head", chain / "f.h5", "--out", head, "--near-duplicate-threshold", "1"))
    assert not any(d.exists() for d in stale)
    assert live.exists()  # a writer that is still running keeps its folder
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "head"])
