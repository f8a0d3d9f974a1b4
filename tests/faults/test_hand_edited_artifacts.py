"""Hand-edited head and model directories (issue 18 item 10), and reports of a catalog whose
category names are mathtext (item 12).

Each fault is made on a copy of a real artifact (a head fitted here, its native and ONNX
exports) and met as a user meets it: ``export``, ``evaluate`` and ``predict`` through the click
CLI, or a subprocess where the fault would cost memory or needs a kill. The promise is one
``Error:`` (exit 1) naming the file and the field and saying what to do, never a traceback,
and nothing read from outside the artifact's folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import copy_sample_photos, run_headstart

from pipeline.config import ExportConfig, ExtractConfig, FitHeadConfig
from pipeline.export import export
from pipeline.extract import extract
from pipeline.fit_head import fit_head

onnx = pytest.importorskip("onnx")

TINY = dict(backbone="tiny", precision="fp32", workers=0, progress=False)
PREDICT = ["--workers", "0", "--no-progress"]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _head(root: Path, classes: tuple[str, ...]) -> Path:
    images = copy_sample_photos(root / "images", per_class=4, classes=classes)
    extract(ExtractConfig(images=str(images), out=str(root / "f.h5"), **TINY))  # type: ignore[arg-type]
    fit_head(FitHeadConfig(cache=str(root / "f.h5"), out=str(root / "head"), c=0.01, near_duplicate_threshold=None))
    return root / "head"


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A 3-class head with its native and ONNX models, and an ONNX model of a 2-class head."""
    root = tmp_path_factory.mktemp("artifacts")
    head = _head(root / "three", ("bag", "sneaker", "trouser"))
    export(ExportConfig(head=str(head), out=str(root / "model")))
    export(ExportConfig(head=str(head), out=str(root / "onnx"), format="onnx"))
    other = _head(root / "two", ("bag", "sneaker"))
    export(ExportConfig(head=str(other), out=str(root / "onnx2"), format="onnx"))
    return {
        "head": head,
        "model": root / "model",
        "onnx": root / "onnx",
        "onnx2": root / "onnx2",
        "images": root / "three" / "images",
    }


def _edited(src: Path, dst: Path, name: str, edit: Callable[[dict[str, Any], Path], Any]) -> Path:
    """A copy of the artifact ``src`` whose JSON ``name`` went through ``edit`` (which changes
    the dict in place, or returns raw text to write instead)."""
    shutil.copytree(src, dst)
    data = json.loads((dst / name).read_text(encoding="utf-8"))
    raw = edit(data, dst)
    (dst / name).write_text(raw if isinstance(raw, str) else json.dumps(data, indent=2), encoding="utf-8")
    return dst


def _error(r, *needles: str) -> None:  # type: ignore[no-untyped-def]
    assert r.exit_code == 1, r.output
    assert r.output.startswith("Error: ") and "Traceback" not in r.output, r.output
    for n in needles:
        assert n in r.output, (n, r.output)


def _use_head(run_cli, head: Path, made: dict[str, Path], tmp_path: Path, *needles: str) -> None:  # type: ignore[no-untyped-def]
    _error(run_cli("export", head, "--out", tmp_path / "exported"), *needles)
    _error(run_cli("evaluate", head, made["images"], "--out", tmp_path / "report", "--workers", "0"), *needles)
    assert not (tmp_path / "exported").exists() and not (tmp_path / "report").exists()


def _use_model(run_cli, model: Path, made: dict[str, Path], tmp_path: Path, *needles: str) -> None:  # type: ignore[no-untyped-def]
    _error(run_cli("predict", model, made["images"], "--out", tmp_path / "p.csv", *PREDICT), *needles)
    _error(run_cli("evaluate", model, made["images"], "--out", tmp_path / "report", "--workers", "0"), *needles)
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "report").exists()


# --------------------------------------------------------------------------- head.json


def test_head_json_files_as_a_string(made, tmp_path, run_cli):
    head = _edited(made["head"], tmp_path / "h", "head.json", lambda m, d: m.__setitem__("files", "head.npz"))
    _use_head(run_cli, head, made, tmp_path, "head.json 'files' is str", "re-run `headstart fit-head`")


def test_head_json_empty_fingerprint(made, tmp_path, run_cli):
    head = _edited(made["head"], tmp_path / "h", "head.json", lambda m, d: m.__setitem__("fingerprint", {}))
    _use_head(run_cli, head, made, tmp_path, "head.json 'fingerprint' is incomplete", "no backbone", "fit-head")


def test_head_json_class_names_as_a_string_is_not_three_classes(made, tmp_path, run_cli):
    head = _edited(made["head"], tmp_path / "h", "head.json", lambda m, d: m.__setitem__("class_names", "abc"))
    _use_head(run_cli, head, made, tmp_path, "head.json 'class_names' is str, not a list of names")


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.txt"])
def test_head_json_files_outside_the_folder_are_refused(name, made, tmp_path, run_cli):
    (tmp_path / "outside.txt").write_text("not part of any head\n")

    def edit(m: dict[str, Any], d: Path) -> None:
        m["files"][name] = _sha(d / name) if name.startswith("..") else _sha(Path(name))

    head = _edited(made["head"], tmp_path / "h", "head.json", edit)
    _use_head(run_cli, head, made, tmp_path, f"'files' names '{name}', which is not a file in")


# --------------------------------------------------------------------------- manifest.json


# A regression would build a 100000 px image: fail with MemoryError, not the OOM killer.
LIMITED_MEMORY = {resource.RLIMIT_AS: 6 << 30}


@pytest.mark.parametrize(("key", "value"), [("resize", 100_000), ("crop", 100_000), ("resize", 4)])
def test_manifest_sizes_are_bounded(key, value, made, tmp_path):
    model = _edited(
        made["model"], tmp_path / "m", "manifest.json", lambda m, d: m["preprocessing"].__setitem__(key, value)
    )
    r = run_headstart("predict", model, made["images"], "--out", tmp_path / "p.csv", *PREDICT, limits=LIMITED_MEMORY)
    assert r.returncode == 1, r.stderr[-2000:]
    assert r.stderr.startswith("Error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"preprocessing {key} is {value}, not a size in 8..4096 px" in r.stderr
    assert not (tmp_path / "p.csv").exists()


def test_head_json_huge_resize_is_refused_before_export_builds_anything(made, tmp_path):
    def edit(m: dict[str, Any], d: Path) -> None:
        prep = json.loads(m["fingerprint"]["preprocessing"])
        prep["resize"] = 200_000
        m["fingerprint"]["preprocessing"] = json.dumps(prep)

    head = _edited(made["head"], tmp_path / "h", "head.json", edit)
    r = run_headstart("export", head, "--out", tmp_path / "m", limits=LIMITED_MEMORY)
    assert r.returncode == 1 and r.stderr.startswith("Error: "), r.stderr[-2000:]
    assert "preprocessing resize is 200000, not a size in 8..4096 px" in r.stderr


def test_manifest_class_names_as_a_string(made, tmp_path, run_cli):
    model = _edited(made["model"], tmp_path / "m", "manifest.json", lambda m, d: m.__setitem__("class_names", "abc"))
    _use_model(run_cli, model, made, tmp_path, "manifest.json 'class_names' is str, not a list of names")


@pytest.mark.parametrize("opener", ["[", '{"a":'])
def test_manifest_nested_100k_deep(opener, made, tmp_path, run_cli):
    closer = "]" if opener == "[" else "}"
    deep = opener * 100_000 + ("1" if opener != "[" else "") + closer * 100_000
    model = _edited(made["model"], tmp_path / "m", "manifest.json", lambda m, d: deep)
    _use_model(run_cli, model, made, tmp_path, "manifest.json is nested too deeply")


@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.txt", ""])
def test_manifest_files_outside_the_folder_are_refused(name, made, tmp_path, run_cli):
    (tmp_path / "outside.txt").write_text("not part of any model\n")

    def edit(m: dict[str, Any], d: Path) -> None:
        m["files"][name] = _sha(d / name) if name.startswith("..") else _sha(Path(name or "/etc/hostname"))

    model = _edited(made["model"], tmp_path / "m", "manifest.json", edit)
    _use_model(run_cli, model, made, tmp_path, f"'files' names '{name}', which is not a file in")


# --------------------------------------------------------------------------- a swapped model.onnx


def _swap_graph(made: dict[str, Path], tmp_path: Path, graph: Path) -> Path:
    """The 3-class ONNX model with ``graph`` as its model.onnx, the sha256 re-recorded by hand
    (so the checksum, which catches accidents, passes)."""
    model = tmp_path / "swapped"
    shutil.copytree(made["onnx"], model)
    shutil.copy(graph, model / "model.onnx")
    m = json.loads((model / "manifest.json").read_text(encoding="utf-8"))
    m["files"]["model.onnx"] = _sha(model / "model.onnx")
    (model / "manifest.json").write_text(json.dumps(m), encoding="utf-8")
    return model


def test_a_swapped_onnx_graph_with_another_class_count(made, tmp_path, run_cli):
    model = _swap_graph(made, tmp_path, made["onnx2"] / "model.onnx")
    _use_model(
        run_cli, model, made, tmp_path, "model.onnx does not match its manifest.json",
        "output 'probabilities' is float [?, 2], not float [N, 3] (3 classes, as class_names lists)",
    )  # fmt: skip


def test_a_swapped_onnx_graph_with_another_output_name(made, tmp_path, run_cli):
    proto = onnx.load(str(made["onnx"] / "model.onnx"))
    for node in proto.graph.node:
        node.output[:] = ["probs" if o == "probabilities" else o for o in node.output]
    for out in proto.graph.output:
        if out.name == "probabilities":
            out.name = "probs"
    onnx.save(proto, str(tmp_path / "renamed.onnx"))
    model = _swap_graph(made, tmp_path, tmp_path / "renamed.onnx")
    _use_model(run_cli, model, made, tmp_path, "it has no output 'probabilities' (its outputs: probs, features)")


def test_a_swapped_graph_is_caught_without_the_onnx_package(made, tmp_path, run_cli, monkeypatch):
    """A serving install may have onnxruntime only: the interface then comes from a session."""
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    model = _swap_graph(made, tmp_path, made["onnx2"] / "model.onnx")
    _use_model(run_cli, model, made, tmp_path, "output 'probabilities' is float [?, 2], not float [N, 3]")


def test_the_exported_onnx_model_still_loads(made, tmp_path, run_cli):
    r = run_cli("predict", made["onnx"], made["images"], "--out", tmp_path / "p.csv", *PREDICT)
    assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------- item 12: reports


@pytest.fixture(scope="module")
def mathtext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A head fitted on a catalog whose category folders are mathtext: ``$\\foo$``, ``a$b``."""
    root = tmp_path_factory.mktemp("mathtext")
    images = copy_sample_photos(root / "images", per_class=4)
    for old, new in (("bag", "$\\foo$"), ("sneaker", "a$b")):
        (images / old).rename(images / new)
    extract(ExtractConfig(images=str(images), out=str(root / "f.h5"), **TINY))  # type: ignore[arg-type]
    fit_head(FitHeadConfig(cache=str(root / "f.h5"), out=str(root / "head"), c=0.01, near_duplicate_threshold=None))
    return root


def test_report_of_mathtext_category_names(mathtext, tmp_path, run_cli):
    out = tmp_path / "report"
    r = run_cli("evaluate", mathtext / "head", mathtext / "f.h5", "--out", out)
    assert r.exit_code == 0, r.output
    for name in ("metrics.json", "per_class.csv", "confusion.png", "reliability.png", "report.html"):
        assert (out / name).is_file(), name
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "<td>$\\foo$</td>" in html and "<td>a$b</td>" in html
    assert set(json.loads((out / "metrics.json").read_text())["per_class"]) == {"$\\foo$", "a$b", "trouser"}


@pytest.mark.slow  # 8-15 s: a real kill mid-plot
def test_a_report_killed_while_plotting_leaves_the_previous_one_whole(mathtext, tmp_path, run_cli):
    out = tmp_path / "report"
    assert run_cli("evaluate", mathtext / "head", mathtext / "f.h5", "--out", out).exit_code == 0
    (out / "notes.txt").write_text("mine\n")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "evaluate", str(mathtext / "head"), str(mathtext / "f.h5"),
         "--out", str(out), "--worst", "3"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HEADSTART_CRASH_AT": "report-writing"},
    )  # fmt: skip
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-2000:])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before  # untouched
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".report.partial-")]  # the half report
    # the next report replaces the old one, keeps the user's file and removes the killed run's folder
    assert run_cli("evaluate", mathtext / "head", mathtext / "f.h5", "--out", out, "--worst", "3").exit_code == 0
    assert json.loads((out / "metrics.json").read_text())["meta"] and (out / "notes.txt").read_text() == "mine\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report.")]


def test_a_report_never_replaces_a_folder_that_is_not_a_report(mathtext, tmp_path, run_cli):
    busy = tmp_path / "artifacts"
    busy.mkdir()
    (busy / "features.h5").write_bytes(b"precious")
    _error(run_cli("evaluate", mathtext / "head", mathtext / "f.h5", "--out", busy), "is not a headstart report")
    assert (busy / "features.h5").read_bytes() == b"precious"
