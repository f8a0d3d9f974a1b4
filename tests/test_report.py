"""headstart evaluate: metrics.json, per_class.csv and a report.html that a real browser
(headless Chromium) renders with all its images."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import copy_sample_photos
from PIL import Image

from pipeline.artifacts.report import coverage_curve
from pipeline.config import ExportConfig, ExtractConfig, FitHeadConfig
from pipeline.export import export
from pipeline.extract import extract
from pipeline.fit_head import fit_head
from pipeline.probe.metrics import at_threshold

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


INSTALL_CHROMIUM = "apt-get install -y --no-install-recommends chromium"


def _find_chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium. As root (CI) it is installed when missing; without root the test
    skips and says how to install it (CI, which must run it, turns that skip into a failure)."""
    exe = _find_chromium()
    if exe is not None:
        return exe
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip(f"the report is rendered in Debian's chromium, which is missing: run `sudo {INSTALL_CHROMIUM}`")
    log = ""
    for cmd in (INSTALL_CHROMIUM, "apt-get update -q", INSTALL_CHROMIUM):  # a fresh machine has no lists
        r = subprocess.run(cmd.split(), capture_output=True, text=True, check=False)
        log = r.stderr[-500:]
        if cmd.startswith("apt-get install") and r.returncode == 0:
            break
    exe = _find_chromium()
    if exe is None:
        pytest.skip(f"chromium is missing and `{INSTALL_CHROMIUM}` failed: {log}")
    return exe


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Tiny backbone: cache, head (with an unknown threshold), exported model."""
    root = tmp_path_factory.mktemp("report")
    images = copy_sample_photos(root / "images", per_class=8)
    kw = dict(backbone="tiny", workers=0, progress=False)
    extract(ExtractConfig(images=str(images), out=str(root / "f.h5"), **kw))
    fit_head(
        FitHeadConfig(
            cache=str(root / "f.h5"), out=str(root / "head"), near_duplicate_threshold=None, unknown_threshold=0.4
        )
    )
    export(ExportConfig(head=str(root / "head"), out=str(root / "model")))
    return root


def test_evaluate_head_on_cache_writes_the_report(chain, run_cli, tmp_path):
    r = run_cli("evaluate", chain / "head", chain / "f.h5", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert "report.html: accuracy" in r.output
    m = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert m["n"] == 24 and set(m["per_class"]) == {"bag", "sneaker", "trouser"}
    assert np.asarray(m["confusion"]).sum() == 24
    assert m["unknown"]["threshold"] == 0.4  # the head's recorded threshold
    assert sum(b["n"] for b in m["reliability"]) == 24
    with open(tmp_path / "rep" / "per_class.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert [r["class"] for r in rows] == ["bag", "sneaker", "trouser"]
    wrong = sum(m["per_class"][c]["support"] - m["confusion"][i][i] for i, c in enumerate(m["per_class"]))
    assert len(m["worst_mistakes"]) == min(24, wrong)
    if m["worst_mistakes"]:
        ps = [w["p_predicted"] for w in m["worst_mistakes"]]
        assert ps == sorted(ps, reverse=True)
        assert len(list((tmp_path / "rep" / "thumbs").glob("*.png"))) == len(m["worst_mistakes"])


def test_evaluate_model_on_images_agrees_with_the_head_on_the_cache(chain, run_cli, tmp_path):
    r1 = run_cli("evaluate", chain / "model", chain / "images", "--out", tmp_path / "a", "--workers", "0")
    r2 = run_cli("evaluate", chain / "head", chain / "f.h5", "--out", tmp_path / "b")
    assert r1.exit_code == 0 and r2.exit_code == 0, r1.output + r2.output
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert a["n"] == b["n"] == 24 and a["meta"]["data_kind"] == "images"
    assert a["unknown"]["threshold"] == 0.4  # carried from head.json through the exported manifest
    # float16 cache vs recomputed features. Measured (fp32 / bf16): accuracy 1.0 on both sides, every
    # photo's top class at p >= 0.9985 (top-2 gap >= 0.997), probabilities moved by at most 3e-6 / 6e-10:
    # no photo can flip, so the confusion matrices are equal (the old |difference| <= 1/24 was one photo
    # of slack with no noise behind it).
    assert a["confusion"] == b["confusion"] and a["accuracy"] == b["accuracy"]


def test_evaluate_refuses_a_cache_from_another_backbone(chain, run_cli, tmp_path, small_catalog):
    other = tmp_path / "lite.h5"
    img = next((small_catalog / "bag").glob("*.png"))
    (tmp_path / "one" / "bag").mkdir(parents=True)
    shutil.copy(img, tmp_path / "one" / "bag" / img.name)
    extract(ExtractConfig(images=str(tmp_path / "one"), out=str(other), backbone="efficientnet_lite0", workers=0,
                          progress=False))  # fmt: skip
    r = run_cli("evaluate", chain / "head", other, "--out", tmp_path / "rep")
    assert r.exit_code == 1 and "Error:" in r.output and "expects tiny" in r.output


def test_coverage_and_threshold_numbers():
    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45]])
    y = np.array([0, 1, 0, 1])
    cov = coverage_curve(proba, y, steps=4)
    assert [c["accuracy"] for c in cov] == [1.0, 0.5, 2 / 3, 0.5]
    u = at_threshold(proba, y, 0.7)
    assert u["coverage"] == 0.5 and u["accuracy_answered"] == 0.5 and u["n_unknown"] == 2


CJK = "口红"  # lipstick: a category name the plot fonts of a bare machine have no glyphs for


@pytest.fixture(scope="module")
def cjk_chain(tmp_path_factory):
    """Like ``chain``, with the sneaker photos in a folder with a Chinese name."""
    root = tmp_path_factory.mktemp("report_cjk")
    images = copy_sample_photos(root / "images", per_class=8)
    shutil.move(images / "sneaker", images / CJK)
    extract(ExtractConfig(images=str(images), out=str(root / "f.h5"), backbone="tiny", workers=0, progress=False))
    fit_head(FitHeadConfig(cache=str(root / "f.h5"), out=str(root / "head"), near_duplicate_threshold=None))
    return root


def probe_in_chromium(chromium: str, flags: list[str], page: Path, expression: str) -> tuple[str, Any]:
    """Load ``page`` (a copy beside it, so its relative links work) in headless Chromium with a
    probe that, once the page loaded, writes the JSON of the JavaScript ``expression`` into it;
    return the rendered DOM and the probe's value."""
    probe = page.read_text(encoding="utf-8").replace(
        "</body>",
        "<script>window.addEventListener('load', () => { const p = document.createElement('pre');"
        f" p.id = 'probe'; p.textContent = JSON.stringify({expression}); document.body.appendChild(p); }});"
        "</script></body>",
    )
    copy = page.with_name("probe.html")
    copy.write_text(probe, encoding="utf-8")
    dom = subprocess.run(
        [chromium, *flags, "--dump-dom", copy.as_uri()], capture_output=True, text=True, timeout=120
    ).stdout
    start = dom.index('<pre id="probe">') + len('<pre id="probe">')
    return dom, json.loads(dom[start : dom.index("</pre>", start)].replace("&quot;", '"'))


@pytest.mark.must_run
def test_report_renders_in_headless_chromium(cjk_chain, run_cli, tmp_path, chromium, recwarn):
    chain = cjk_chain
    out = tmp_path / "rep"
    assert run_cli("evaluate", chain / "head", chain / "f.h5", "--out", out).exit_code == 0
    # Without a CJK font matplotlib would draw boxes and warn "Glyph ... missing": the axes are
    # numbered then, and the HTML key names the numbers (the browser has the fonts).
    assert not [w for w in recwarn if "Glyph" in str(w.message)]
    # The report itself, plus a probe that lists every image's decoded size once the page loaded.
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    images_js = "[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth, i.naturalHeight])"
    dom, images = probe_in_chromium(chromium, flags, out / "report.html", images_js)
    srcs = [s for s, _, _ in images]
    assert "confusion.png" in srcs and "reliability.png" in srcs
    m = json.loads((out / "metrics.json").read_text())
    assert len([s for s in srcs if s.startswith("thumbs/")]) == len(m["worst_mistakes"])
    broken = [s for s, w, h in images if w == 0 or h == 0]
    assert not broken, f"images that did not load: {broken}"
    key = dom[dom.index('<table id="confusion-key">') :]
    key = key[: key.index("</table>")]
    assert f"<td>{CJK}</td>" in key and "<td>bag</td>" in key

    shot = tmp_path / "shot.png"
    subprocess.run(
        [chromium, *flags, f"--screenshot={shot}", "--window-size=1000,1400", (out / "report.html").as_uri()],
        capture_output=True,
        timeout=120,
    )
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    assert pixels.shape[:2] == (1400, 1000)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text, table and plots, not a blank page
