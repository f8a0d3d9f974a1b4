"""Evaluation report: metrics -> ``metrics.json``, ``per_class.csv``, figures and ``report.html``.

Pure functions of (probabilities, true classes, class names, photo paths); ``evaluate.py`` gets
those from a model or a head. Plots use matplotlib's Agg backend (no display needed). The HTML
references its images by relative path, so the report directory can be zipped or served as is.
"""

from __future__ import annotations

import csv
import html
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import replace_dir, stage_dir
from ..core.csvcells import safe_cell
from ..errors import InputError
from ..probe.calibration import calibration_error, mean_log_loss
from ..probe.hierarchy import TreeIndex, tree_metrics
from ..probe.metrics import at_threshold, classification_metrics

# What a report directory consists of: replaced by the next report, while other files a user
# put there stay. config.json is written by evaluate after the report is in place.
REPORT_FILES = (
    "metrics.json",
    "per_class.csv",
    "per_label.csv",
    "confusion.png",
    "reliability.png",
    "thumbs",
    "report.html",
    "config.json",
)
COVERAGE_STEPS = 20
RELIABILITY_BINS = 10
THUMB = 112


@dataclass
class Scored:
    """What a report is made of. ``y`` indexes ``class_names``."""

    proba: np.ndarray  # [N, K], rows sum to 1
    y: np.ndarray  # [N]
    class_names: list[str]
    paths: list[str]  # shown in the report
    files: list[Path | None]  # readable image files for thumbnails (None: not available)


# --------------------------------------------------------------------------- numbers


def reliability(proba: np.ndarray, y: np.ndarray, bins: int = RELIABILITY_BINS) -> list[dict[str, float]]:
    conf, correct = proba.max(1), proba.argmax(1) == y
    which = np.minimum((conf * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        m = which == b
        if m.any():
            out.append(
                {
                    "lo": b / bins,
                    "hi": (b + 1) / bins,
                    "n": int(m.sum()),
                    "confidence": float(conf[m].mean()),
                    "accuracy": float(correct[m].mean()),
                }
            )
    return out


def coverage_curve(proba: np.ndarray, y: np.ndarray, steps: int = COVERAGE_STEPS) -> list[dict[str, float]]:
    """Accuracy on the photos answered when the least confident are left 'unknown': keep the
    top ``coverage`` share by confidence; ``threshold`` is the confidence that achieves it."""
    conf, correct = proba.max(1), proba.argmax(1) == y
    order = np.argsort(-conf, kind="stable")
    out = []
    for i in range(1, steps + 1):
        n = max(1, round(len(y) * i / steps))
        keep = order[:n]
        out.append(
            {"coverage": n / len(y), "accuracy": float(correct[keep].mean()), "threshold": float(conf[keep].min())}
        )
    return out


def compute_metrics(s: Scored, unknown_threshold: float | None) -> dict[str, Any]:
    pred = s.proba.argmax(1)
    m = classification_metrics(s.y, pred, s.class_names)
    k = len(s.class_names)
    m["log_loss"] = mean_log_loss(s.proba, s.y)
    m["ece"] = calibration_error(s.proba, s.y)
    m["confusion"] = np.bincount(s.y * k + pred, minlength=k * k).reshape(k, k).tolist()
    m["reliability"] = reliability(s.proba, s.y)
    m["coverage"] = coverage_curve(s.proba, s.y)
    m["unknown"] = at_threshold(s.proba, s.y, unknown_threshold) if unknown_threshold is not None else None
    return m


def worst_mistakes(s: Scored, n: int) -> list[dict[str, Any]]:
    """The most confident wrong answers first: what a reviewer should look at."""
    pred = s.proba.argmax(1)
    wrong = np.flatnonzero(pred != s.y)
    wrong = wrong[np.argsort(-s.proba[wrong, pred[wrong]], kind="stable")][:n]
    return [
        {
            "index": int(i),
            "path": s.paths[i],
            "true": s.class_names[int(s.y[i])],
            "predicted": s.class_names[int(pred[i])],
            "p_predicted": float(s.proba[i, pred[i]]),
            "p_true": float(s.proba[i, s.y[i]]),
        }
        for i in wrong
    ]


# --------------------------------------------------------------------------- files


def write_report(
    out: Path,
    s: Scored,
    meta: dict[str, Any],
    *,
    unknown_threshold: float | None,
    worst: int,
    warnings: list[str] | tuple[str, ...] = (),
    raw_csv: bool = False,
    tree: TreeIndex | None = None,
    min_confidence: float = 0.5,
) -> dict:
    """``warnings`` are shown at the top of the report and kept in ``metrics.json``; ``raw_csv``
    turns off the formula-injection guard of ``per_class.csv`` (:mod:`pipeline.core.csvcells`).
    With a category ``tree``, ``metrics["tree"]`` holds accuracy per level and the roll-up's
    accuracy and coverage at ``min_confidence`` (:func:`pipeline.probe.hierarchy.tree_metrics`).

    Written into a staging folder beside ``out`` and renamed into place (``core.atomic``), so a
    failure or a kill while plotting leaves the previous report whole, never a ``metrics.json``
    without its ``report.html``. Other files in an existing report folder are kept."""
    from ..core.faults import crash_point

    out = Path(out)
    # A folder with other contents is refused, not replaced: replace_dir moves it aside for a
    # moment, and a kill then would leave the user's files under a name the next run deletes.
    marker = any((out / name).is_file() for name in ("report.html", "metrics.json"))
    if out.exists() and not (out.is_dir() and (marker or not any(out.iterdir()))):
        raise InputError(f"{out} exists and is not a headstart report directory; choose another --out")
    metrics = compute_metrics(s, unknown_threshold)
    if tree is not None:
        metrics["tree"] = tree_metrics(tree, s.proba, s.y, min_confidence)
    mistakes = worst_mistakes(s, worst)
    metrics["worst_mistakes"] = mistakes
    metrics["warnings"] = list(warnings)
    metrics["meta"] = meta
    stage = stage_dir(out.absolute())
    try:
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        _per_class_csv(stage / "per_class.csv", metrics, raw_csv)
        figures = _figures(stage, s, metrics)
        crash_point("report-writing")  # the kill test: half a report, in the staging folder only
        thumbs = _thumbnails(stage / "thumbs", s, mistakes)
        (stage / "report.html").write_text(_html(metrics, figures, mistakes, thumbs, meta), encoding="utf-8")
        replace_dir(stage, out.absolute(), owned=REPORT_FILES)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return metrics


def _per_class_csv(path: Path, m: dict[str, Any], raw: bool) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["class", "precision", "recall", "f1", "support"])
        for name, r in m["per_class"].items():
            cells = [f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1']:.4f}", r["support"]]
            w.writerow([safe_cell(name, raw), *cells])


def _plot_fonts_cover(names: list[str]) -> bool:
    """Whether the plot fonts matplotlib finds have a glyph for every character of ``names``
    (a Chinese name on a machine without a CJK font would render as boxes, with warnings)."""
    chars = {c for n in names for c in n if not c.isspace() and ord(c) >= 128}
    if not chars:
        return True
    import matplotlib.pyplot as plt
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    fonts = []
    for family in plt.rcParams["font.sans-serif"]:
        try:
            path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=False)
        except ValueError:
            continue
        fonts.append(FT2Font(path))
    return all(any(f.get_char_index(ord(c)) for f in fonts) for c in chars)


def _figures(out: Path, s: Scored, m: dict[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window (and no display on servers)
    import matplotlib.pyplot as plt

    # CJK category names (口红) are drawn if the machine has a CJK font; otherwise the axes are
    # numbered and the HTML report's key (always there) names each number.
    plt.rcParams["font.sans-serif"] = ["Noto Sans CJK SC", "WenQuanYi Zen Hei", "DejaVu Sans"]
    # Category names are literal text: a matplotlibrc with usetex would send them through LaTeX.
    plt.rcParams["text.usetex"] = False
    k = len(s.class_names)
    ticks = s.class_names if _plot_fonts_cover(s.class_names) else [str(i + 1) for i in range(k)]
    cm = np.asarray(m["confusion"], float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(4 + 0.45 * k, 24)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    # parse_math=False: a class named $\foo$ is drawn as those characters. Mathtext would
    # parse it as a formula and raise on the unknown symbol (no report at all).
    ax.set_xticks(range(k), ticks, rotation=60, ha="right", parse_math=False)
    ax.set_yticks(range(k), ticks, parse_math=False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if k <= 30:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(
                        j, i, str(int(cm[i, j])), ha="center", va="center", color="white" if norm[i, j] > 0.5 else "k"
                    )
    fig.colorbar(im, ax=ax, fraction=0.046, label="share of the true class")
    ax.set_title("Confusion matrix (counts; colour = row share)")
    fig.tight_layout()
    fig.savefig(out / "confusion.png", dpi=100)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4.2))
    rel = m["reliability"]
    a1.plot([0, 1], [0, 1], ls="--", color="grey", label="perfect calibration")
    a1.bar([r["lo"] for r in rel], [r["accuracy"] for r in rel], width=1 / RELIABILITY_BINS, align="edge",
           alpha=0.7, edgecolor="k", label="accuracy in bin")  # fmt: skip
    a1.plot([r["confidence"] for r in rel], [r["accuracy"] for r in rel], "o", color="C3", label="mean confidence")
    a1.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy")
    a1.set_title(f"Reliability (ECE {m['ece']:.3f})")
    a1.legend(loc="upper left", fontsize=8)
    cov = m["coverage"]
    a2.plot([c["coverage"] for c in cov], [c["accuracy"] for c in cov], "-o", ms=3)
    if m["unknown"]:
        u = m["unknown"]
        if u["accuracy_answered"] is not None:
            a2.plot([u["coverage"]], [u["accuracy_answered"]], "s", color="C3", label=f"threshold {u['threshold']:g}")
            a2.legend(loc="lower left", fontsize=8)
    a2.set(xlim=(0, 1.02), xlabel="coverage (share answered, rest 'unknown')", ylabel="accuracy on answered")
    a2.set_title("Accuracy against coverage")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    plt.close(fig)
    return {"confusion": "confusion.png", "reliability": "reliability.png"}


def _thumbnails(folder: Path, s: Scored, mistakes: list[dict[str, Any]]) -> dict[int, str]:
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[int, str] = {}
    for rank, mk in enumerate(mistakes):
        src = s.files[mk["index"]]
        if src is None:
            continue
        name = f"{rank:03d}.png"
        if save_thumbnail(src, folder / name, THUMB):
            out[mk["index"]] = f"thumbs/{name}"
    return out


def save_thumbnail(src: Any, path: Path, side: int) -> bool:
    """A PNG of the photo at ``src`` whose longer side is ``side`` px; False when the file moved
    or became unreadable since extraction (the report still lists its path)."""
    from PIL import Image

    from ..data.images import open_rgb

    try:
        img = open_rgb(src)
    except Exception:
        return False
    scale = side / max(img.size)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    # Small catalog photos (28 px) are enlarged with NEAREST so their pixels stay honest.
    img = img.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
    img.save(path)
    return True


def _tree_html(t: dict[str, Any] | None) -> str:
    if not t:
        return ""
    levels = "".join(
        f"<tr><td>level {lv['level']}{' (leaves)' if lv['level'] == t['depth'] else ''}</td>"
        f"<td>{lv['n_nodes']}</td><td>{lv['accuracy']:.3f}</td></tr>"
        for lv in t["levels"]
    )
    r, u = t["rollup"], t["unsure"]

    def num(v: float | None, pct: bool = False) -> str:
        return "-" if v is None else f"{v:.1%}" if pct else f"{v:.3f}"

    return (
        '<h2>Category tree</h2><table id="tree-levels"><thead><tr><th>level</th><th>nodes</th>'
        f"<th>accuracy</th></tr></thead><tbody>{levels}</tbody></table>"
        f"<p>Roll-up at <code>--min-confidence {t['min_confidence']:g}</code> (the deepest node at least that "
        f"sure): coverage {r['coverage']:.1%}, accuracy {num(r['accuracy'])} (right = the node is on the true "
        f"path), {r['at_leaf']:.1%} answered with a leaf. On the {u['n']} photos whose leaf is below the "
        f"threshold: leaf accuracy {num(u['leaf_accuracy'])}, roll-up accuracy {num(u['rollup_accuracy'])} "
        f"at coverage {num(u['rollup_coverage'], pct=True)}.</p>"
    )


def _html(m: dict[str, Any], figs: dict[str, str], mistakes: list[dict], thumbs: dict[int, str], meta: dict) -> str:
    e = html.escape
    rows = "\n".join(
        f"<tr><td>{e(n)}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td>"
        f"<td>{r['f1']:.3f}</td><td>{r['support']}</td></tr>"
        for n, r in m["per_class"].items()
    )
    cards = "\n".join(
        '<figure class="mistake">'
        + (f'<img src="{e(thumbs[mk["index"]])}" alt="{e(mk["path"])}">' if mk["index"] in thumbs else "")
        + f"<figcaption><b>{e(mk['predicted'])}</b> {mk['p_predicted']:.2f}<br>"
        f"true: {e(mk['true'])} ({mk['p_true']:.2f})<br><code>{e(mk['path'])}</code></figcaption></figure>"
        for mk in mistakes
    )
    u = m["unknown"]
    unknown = (
        f"<p>With <code>--unknown-threshold {u['threshold']:g}</code>: {u['coverage']:.1%} of photos answered, "
        f"accuracy on them {u['accuracy_answered'] or 0:.3f}; {u['n_unknown']} labelled unknown.</p>"
        if u
        else ""
    )
    facts = "".join(f"<li>{e(str(k))}: {e(str(v))}</li>" for k, v in meta.items() if not isinstance(v, (dict, list)))
    warnings = "".join(f'<p class="warning"><b>Warning:</b> {e(w)}</p>' for w in m.get("warnings", []))
    if m.get("classes_without_photos"):
        absent = ", ".join(m["classes_without_photos"])
        warnings += (
            f"<p>Macro-F1 averages the {m['macro_f1_classes']} classes with photos; no photos of: {e(absent)}.</p>"
        )
    key = "".join(f"<tr><td>{i + 1}</td><td>{e(n)}</td></tr>" for i, n in enumerate(m["per_class"]))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>headstart evaluation report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; text-align: right; }}
td:first-child {{ text-align: left; }} img.plot {{ max-width: 100%; }}
.mistakes {{ display: flex; flex-wrap: wrap; gap: 12px; }}
.mistake {{ width: 180px; margin: 0; font-size: 12px; }}
.mistake img {{ width: {THUMB}px; image-rendering: pixelated; }}
code {{ word-break: break-all; }} .warning {{ color: #a40; }}
</style></head><body>
<h1>Evaluation report</h1>
<p><b>accuracy {m["accuracy"]:.3f}</b>, macro-F1 {m["macro_f1"]:.3f}, log-loss {m["log_loss"]:.3f},
ECE {m["ece"]:.3f} on {m["n"]} photos, {len(m["per_class"])} classes.</p>
{warnings}
{unknown}
{_tree_html(m.get("tree"))}
<ul>{facts}</ul>
<h2>Per class</h2>
<table><thead><tr><th>class</th><th>precision</th><th>recall</th><th>F1</th><th>support</th></tr></thead>
<tbody>
{rows}
</tbody></table>
<h2>Confusion matrix</h2>
<img class="plot" id="confusion" src="{e(figs["confusion"])}" alt="confusion matrix">
<table id="confusion-key"><thead><tr><th>#</th><th>class (axis order)</th></tr></thead><tbody>{key}</tbody></table>
<h2>Calibration and coverage</h2>
<img class="plot" id="reliability" src="{e(figs["reliability"])}" alt="reliability and coverage plots">
<h2>Worst mistakes ({len(mistakes)}, most confident first)</h2>
<div class="mistakes">
{cards}
</div>
</body></html>
"""
