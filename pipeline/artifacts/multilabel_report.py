"""The evaluation report of a multi-label attribute (``evaluate --attribute TAGS``): per-label
numbers at the head's thresholds, as ``metrics.json``, ``per_label.csv`` and ``report.html``."""

from __future__ import annotations

import csv
import html
import json
import shutil
from pathlib import Path
from typing import Any

from ..core.atomic import replace_dir, stage_dir
from ..core.csvcells import safe_cell
from ..errors import InputError
from .report import REPORT_FILES


def write_multilabel_report(
    out: Path, metrics: dict[str, Any], meta: dict[str, Any], *, warnings: list[str], raw_csv: bool = False
) -> dict[str, Any]:
    """The report of a multi-label attribute (``evaluate --attribute TAGS``): ``metrics.json``
    (:func:`pipeline.probe.multilabel.multilabel_metrics`), ``per_label.csv`` and a
    ``report.html`` table, staged and renamed into place as :func:`write_report` does."""
    out = Path(out)
    marker = any((out / name).is_file() for name in ("report.html", "metrics.json"))
    if out.exists() and not (out.is_dir() and (marker or not any(out.iterdir()))):
        raise InputError(f"{out} exists and is not a headstart report directory; choose another --out")
    metrics = {**metrics, "warnings": list(warnings), "meta": meta}
    stage = stage_dir(out.absolute())
    try:
        (stage / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        with open(stage / "per_label.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["label", "precision", "recall", "f1", "average_precision", "threshold", "support"])
            for name, r in metrics["per_label"].items():
                ap = "" if r["average_precision"] is None else f"{r['average_precision']:.4f}"
                w.writerow([safe_cell(name, raw_csv), f"{r['precision']:.4f}", f"{r['recall']:.4f}",
                            f"{r['f1']:.4f}", ap, f"{r['threshold']:.4f}", r["support"]])  # fmt: skip
        e = html.escape
        rows = "\n".join(
            f"<tr><td>{e(n)}</td><td>{r['precision']:.3f}</td><td>{r['recall']:.3f}</td><td>{r['f1']:.3f}</td>"
            f"<td>{'-' if r['average_precision'] is None else format(r['average_precision'], '.3f')}</td>"
            f"<td>{r['threshold']:.3f}</td><td>{r['support']}</td></tr>"
            for n, r in metrics["per_label"].items()
        )
        notes = "".join(f'<p class="warning"><b>Warning:</b> {e(w)}</p>' for w in warnings)
        facts = "".join(f"<li>{e(str(k))}: {e(str(v))}</li>" for k, v in meta.items() if not isinstance(v, dict | list))
        (stage / "report.html").write_text(
            f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>headstart evaluation report: {e(str(meta.get("attribute")))}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}td,th{{padding:2px 8px;text-align:right}}
td:first-child{{text-align:left}}.warning{{color:#a40}}</style></head><body>
<h1>Multi-label attribute <code>{e(str(meta.get("attribute")))}</code></h1>{notes}
<p>micro-F1 <b>{metrics["micro_f1"]:.3f}</b> (precision {metrics["micro_precision"]:.3f}, recall
{metrics["micro_recall"]:.3f}), macro-F1 {metrics["macro_f1"]:.3f}, mean average precision
{metrics["macro_average_precision"]:.3f}, exact match {metrics["exact_match"]:.3f} on {metrics["n"]} photos;
each label at the threshold fit-head chose on validation.</p>
<table><tr><th>label</th><th>precision</th><th>recall</th><th>F1</th><th>AP</th><th>threshold</th><th>photos</th></tr>
{rows}</table><ul>{facts}</ul></body></html>
""",
            encoding="utf-8",
        )
        replace_dir(stage, out.absolute(), owned=REPORT_FILES)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return metrics
