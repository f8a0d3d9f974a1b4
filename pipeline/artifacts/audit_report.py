"""The audit report directory (``headstart audit``), and the manifest ``--apply`` writes.

``REPORT_DIR/`` holds, written into a staging folder and renamed into place (a crash leaves the
previous report whole; other files a user put there are carried over):

* ``label_issues.csv`` - ``rank, path, given, suggested, score, p_given, p_suggested``: the
  flagged photos, most likely mislabelled first (``score`` = 1 - out-of-fold p of the given
  class; :mod:`pipeline.probe.label_issues`);
* ``overlaps.csv`` - ``class_a, class_b, a_to_b, b_to_a, share, merge, rename``: pairs of classes
  photos move between out of fold, most confused first; ``merge`` is ``yes`` from
  ``share >= 1/3``; ``rename`` is the ``classes.toml`` line merging the smaller class into the
  larger (it goes under ``[rename]``);
* ``duplicates.csv`` - ``cluster, size, path, label, similarity, spans_categories``: one row per
  photo of each near-duplicate cluster (``similarity``: its highest cosine to another member),
  clusters that span categories first;
* ``outliers.csv`` - ``rank, path, label, nearest_class, score``: photos further from every
  class than the threshold (robust z-score), furthest first;
* ``label_next.csv`` - ``rank, path, predicted, uncertainty, gain``: unlabelled photos to label
  next, one per cluster of uncertain photos; ``gain`` is the summed uncertainty of the cluster the
  photo stands for, largest first;
* ``oof.npz`` - the out-of-fold probabilities for scripts: ``row`` (cache row), ``given``
  (class index), ``scored`` (False: a class of one photo), ``proba`` ``[N, K]`` float32 and
  ``class_names`` (read with ``np.load(..., allow_pickle=False)``);
* ``report.html`` (thumbnails in ``thumbs/``), ``summary.json`` (the ``--json`` summary) and
  ``config.json``.

Paths are the cache's (relative to the folder it was extracted from). Text cells get the
formula-injection guard (:mod:`pipeline.core.csvcells`) unless ``--raw-csv``;
:mod:`pipeline.artifacts.relabel` (``--apply``) undoes it when it reads ``label_issues.csv`` back.
"""

from __future__ import annotations

import csv
import html
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.atomic import replace_dir, stage_dir
from ..core.csvcells import safe_cell
from ..errors import InputError
from ..probe.label_issues import LabelIssues
from ..probe.label_next import margin_uncertainty
from .report import save_thumbnail

AUDIT_FILES = (
    "label_issues.csv",
    "overlaps.csv",
    "duplicates.csv",
    "outliers.csv",
    "label_next.csv",
    "oof.npz",
    "report.html",
    "thumbs",
    "summary.json",
    "config.json",
)
THUMB = 96


@dataclass
class AuditTables:
    """What the audit found, by cache row (``labelled[i]`` is the row of out-of-fold row ``i``;
    ``pool[j]`` the row of label-next candidate ``j``)."""

    paths: list[str]
    files: list[Path]
    hashes: list[str]
    class_names: list[str]
    label_of: np.ndarray  # [rows] class index after the label map, -1 none
    labelled: np.ndarray
    issues: LabelIssues
    oof: np.ndarray
    pairs: list[tuple[int, int, int, int, float]]
    merge_share: float
    dup_pairs: np.ndarray
    dup_clusters: list[np.ndarray]
    outlier_score: np.ndarray
    outlier_nearest: np.ndarray
    outlier_threshold: float
    pool: np.ndarray
    picks: np.ndarray
    gains: np.ndarray
    pool_proba: np.ndarray

    def label(self, row: int) -> str:
        c = int(self.label_of[row])
        return self.class_names[c] if c >= 0 else ""


def _issue_rows(t: AuditTables) -> list[dict[str, Any]]:
    out = []
    for i in t.issues.order:
        if not t.issues.flagged[i]:
            break  # flagged photos come first in the order
        y, s = int(t.label_of[t.labelled[i]]), int(t.issues.suggested[i])
        out.append(
            {
                "row": int(t.labelled[i]),
                "given": t.class_names[y],
                "suggested": t.class_names[s],
                "score": float(t.issues.score[i]),
                "p_given": float(t.oof[i, y]),
                "p_suggested": float(t.oof[i, s]),
            }
        )
    return out


def _overlap_rows(t: AuditTables) -> list[dict[str, Any]]:
    counts = np.bincount(t.label_of[t.labelled], minlength=len(t.class_names))
    out = []
    for a, b, ab, ba, share in t.pairs:
        keep, gone = (a, b) if counts[a] >= counts[b] else (b, a)
        rename = f"{_toml_str(t.class_names[gone])} = {_toml_str(t.class_names[keep])}"
        out.append(
            {
                "class_a": t.class_names[a],
                "class_b": t.class_names[b],
                "a_to_b": ab,
                "b_to_a": ba,
                "share": share,
                "merge": share >= t.merge_share,
                "rename": rename,
            }
        )
    return out


def _toml_str(name: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's; Chinese stays as it is)."""
    return json.dumps(name, ensure_ascii=False)


def _duplicate_rows(t: AuditTables) -> list[dict[str, Any]]:
    best: dict[int, float] = {}
    for i, j, s in t.dup_pairs.tolist():
        for r in (int(i), int(j)):
            best[r] = max(best.get(r, -1.0), float(s))
    groups = []
    for members in t.dup_clusters:
        labels = {int(t.label_of[r]) for r in members if t.label_of[r] >= 0}
        groups.append((len(labels) > 1, members))
    groups.sort(key=lambda g: (not g[0], -len(g[1]), int(g[1][0])))
    out = []
    for n, (spans, members) in enumerate(groups, 1):
        for r in members.tolist():
            out.append(
                {
                    "cluster": n,
                    "size": len(members),
                    "row": r,
                    "label": t.label(r),
                    "similarity": best.get(r, 1.0),
                    "spans_categories": spans,
                }
            )
    return out


def _outlier_rows(t: AuditTables) -> list[dict[str, Any]]:
    rows = np.flatnonzero(t.outlier_score > t.outlier_threshold)
    rows = rows[np.argsort(-t.outlier_score[rows], kind="stable")]
    return [
        {
            "row": int(r),
            "label": t.label(int(r)),
            "nearest_class": t.class_names[int(t.outlier_nearest[r])],
            "score": float(t.outlier_score[r]),
        }
        for r in rows
    ]


def _next_rows(t: AuditTables) -> list[dict[str, Any]]:
    out = []
    for j, gain in zip(t.picks.tolist(), t.gains.tolist(), strict=True):
        p = t.pool_proba[j]
        out.append(
            {
                "row": int(t.pool[j]),
                "predicted": t.class_names[int(p.argmax())],
                "uncertainty": float(margin_uncertainty(p[None])[0]),
                "gain": float(gain),
            }
        )
    return out


def summarise(t: AuditTables) -> dict[str, int]:
    dups = _duplicate_rows(t)
    return {
        "label_issues": int(t.issues.flagged.sum()),
        "overlaps": len(t.pairs),
        "merge_suggestions": sum(1 for p in t.pairs if p[4] >= t.merge_share),
        "duplicate_clusters": len(t.dup_clusters),
        "spanning_clusters": len({d["cluster"] for d in dups if d["spans_categories"]}),
        "outliers": int((t.outlier_score > t.outlier_threshold).sum()),
        "label_next": len(t.picks),
    }


# --------------------------------------------------------------------------- files

_COLUMNS = {
    "label_issues.csv": ["rank", "path", "given", "suggested", "score", "p_given", "p_suggested"],
    "overlaps.csv": ["class_a", "class_b", "a_to_b", "b_to_a", "share", "merge", "rename"],
    "duplicates.csv": ["cluster", "size", "path", "label", "similarity", "spans_categories"],
    "outliers.csv": ["rank", "path", "label", "nearest_class", "score"],
    "label_next.csv": ["rank", "path", "predicted", "uncertainty", "gain"],
}


def _cell(v: Any, raw: bool) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4f}"
    return safe_cell(v, raw) if isinstance(v, str) else str(v)


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]], paths: list[str], raw: bool) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for rank, r in enumerate(rows, 1):
            full = {"rank": rank, **r, "path": paths[r["row"]] if "row" in r else ""}
            w.writerow([_cell(full[c], raw) for c in columns])


def write_audit(
    out: Path,
    t: AuditTables,
    facts: dict[str, Any],
    warnings: list[str],
    *,
    examples: int,
    raw_csv: bool = False,
    write_more: Callable[[Path], None] | None = None,
) -> None:
    """Write ``out/`` as a whole (staged, then renamed into place); ``write_more(stage)`` adds
    the caller's files (summary, config) before the rename."""
    out = out.absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder; choose another --out")
    tables = {
        "label_issues.csv": _issue_rows(t),
        "overlaps.csv": _overlap_rows(t),
        "duplicates.csv": _duplicate_rows(t),
        "outliers.csv": _outlier_rows(t),
        "label_next.csv": _next_rows(t),
    }
    stage = stage_dir(out)
    try:
        for name, rows in tables.items():
            _write_csv(stage / name, _COLUMNS[name], rows, t.paths, raw_csv)
        np.savez(
            stage / "oof.npz",
            row=t.labelled,
            given=t.label_of[t.labelled],
            scored=~np.isnan(t.issues.score),
            proba=t.oof.astype(np.float32),
            class_names=np.array(t.class_names, dtype=str),
        )
        thumbs = _thumbnails(stage / "thumbs", t, tables, examples)
        (stage / "report.html").write_text(_html(t, tables, thumbs, facts, warnings, examples), encoding="utf-8")
        if write_more is not None:
            write_more(stage)
        replace_dir(stage, out, owned=AUDIT_FILES)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _thumbnails(folder: Path, t: AuditTables, tables: dict[str, list[dict[str, Any]]], n: int) -> dict[int, str]:
    """One PNG per row shown in the report (a row shown twice is made once)."""
    folder.mkdir(parents=True, exist_ok=True)
    done: dict[int, str] = {}
    for rows in tables.values():
        for r in rows[:n]:
            row = r.get("row")
            if row is None or row in done:
                continue
            name = f"{len(done):04d}.png"
            if save_thumbnail(t.files[row], folder / name, THUMB):
                done[row] = f"thumbs/{name}"
    return done


def _card(t: AuditTables, thumbs: dict[int, str], row: int, caption: str) -> str:
    e = html.escape
    img = f'<img src="{e(thumbs[row])}" alt="{e(t.paths[row])}">' if row in thumbs else ""
    return f'<figure class="card">{img}<figcaption>{caption}<br><code>{e(t.paths[row])}</code></figcaption></figure>'


def _html(
    t: AuditTables,
    tables: dict[str, list[dict[str, Any]]],
    thumbs: dict[int, str],
    facts: dict[str, Any],
    warnings: list[str],
    n: int,
) -> str:
    e = html.escape
    issues = "".join(
        _card(
            t,
            thumbs,
            r["row"],
            f"filed as <b>{e(r['given'])}</b> ({r['p_given']:.2f})<br>"
            f"more likely <b>{e(r['suggested'])}</b> ({r['p_suggested']:.2f})",
        )
        for r in tables["label_issues.csv"][:n]
    )
    overlaps = "".join(
        f"<tr><td>{e(r['class_a'])}</td><td>{e(r['class_b'])}</td><td>{r['a_to_b']}</td><td>{r['b_to_a']}</td>"
        f"<td>{r['share']:.1%}</td><td>{'merge' if r['merge'] else ''}</td></tr>"
        for r in tables["overlaps.csv"][:50]
    )
    merges = [r["rename"] for r in tables["overlaps.csv"] if r["merge"]]
    snippet = f'<pre id="rename">[rename]\n{e(chr(10).join(merges))}</pre>' if merges else "<p>No pair to merge.</p>"
    by_cluster: dict[int, list[dict[str, Any]]] = {}  # the first n rows (as thumbnailed), in cluster order
    for r in tables["duplicates.csv"][:n]:
        by_cluster.setdefault(r["cluster"], []).append(r)
    dups = "".join(
        f'<div class="cluster{" spans" if rows[0]["spans_categories"] else ""}"><h3>cluster {c}'
        f"{' - across categories' if rows[0]['spans_categories'] else ''} ({rows[0]['size']} photos)</h3>"
        + "".join(_card(t, thumbs, r["row"], f"{e(r['label'] or 'unlabelled')} ({r['similarity']:.3f})") for r in rows)
        + "</div>"
        for c, rows in by_cluster.items()
    )
    outliers = "".join(
        _card(
            t,
            thumbs,
            r["row"],
            f"{e(r['label'] or 'unlabelled')}; nearest {e(r['nearest_class'])} (z {r['score']:.1f})",
        )
        for r in tables["outliers.csv"][:n]
    )
    nxt = "".join(
        _card(t, thumbs, r["row"], f"#{k} {e(r['predicted'])}? (uncertainty {r['uncertainty']:.2f})")
        for k, r in enumerate(tables["label_next.csv"][:n], 1)
    )
    facts_html = "".join(
        f"<li>{e(str(k))}: {e(f'{v:.4g}' if isinstance(v, float) else str(v))}</li>" for k, v in facts.items()
    )
    warn = "".join(f'<p class="warning"><b>Warning:</b> {e(w)}</p>' for w in warnings)
    counts = {name: len(rows) for name, rows in tables.items()}
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>headstart audit report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 2px 8px; }}
.cards, .cluster {{ display: flex; flex-wrap: wrap; gap: 10px; }} .cluster h3 {{ width: 100%; margin: 8px 0 0; }}
.spans h3 {{ color: #a40; }} .card {{ width: 170px; margin: 0; font-size: 12px; }}
.card img {{ width: {THUMB}px; image-rendering: pixelated; }} code {{ word-break: break-all; }}
.warning {{ color: #a40; }}
</style></head><body>
<h1>Audit report</h1>
{warn}
<ul>{facts_html}</ul>
<h2 id="label-issues">Likely mislabelled ({counts["label_issues.csv"]}; label_issues.csv)</h2>
<div class="cards">{issues}</div>
<h2 id="overlaps">Categories the head confuses ({counts["overlaps.csv"]} pairs; overlaps.csv)</h2>
<table><thead><tr><th>class a</th><th>class b</th><th>a as b</th><th>b as a</th><th>share</th><th></th></tr></thead>
<tbody>{overlaps}</tbody></table>
<p>Pairs swapping a third of their photos or more could be one class; add to classes.toml:</p>
{snippet}
<h2 id="duplicates">Near duplicates ({len(t.dup_clusters)} clusters; duplicates.csv)</h2>
{dups}
<h2 id="outliers">Far from every category ({counts["outliers.csv"]}; outliers.csv)</h2>
<div class="cards">{outliers}</div>
<h2 id="label-next">Label next ({counts["label_next.csv"]}; label_next.csv)</h2>
<div class="cards">{nxt}</div>
</body></html>
"""
