"""The manifest ``headstart audit --apply ACCEPTED.csv`` writes: ``OUT/relabelled.csv``.

``ACCEPTED.csv`` is ``label_issues.csv`` (:mod:`pipeline.artifacts.audit_report`) with the rows a
person rejected deleted: its ``path`` column, and the new label from ``label`` where that column
is given and not empty, else ``suggested``. The output lists every file of the cache, one
``path,label`` row each (absolute paths; duplicate files with their row's label; unlabelled
ones with an empty label), the accepted photos with their new labels: the CSV manifest
``headstart extract`` reads (:func:`pipeline.data.images.discover`). Extracting it into the same
cache changes the labels and runs no photo through the backbone again (rows are keyed by
content). Labels are the audit's class names, which are the cache's categories unless a label
map renamed them.

``relabelled.csv`` is never formula-guarded (:mod:`pipeline.core.csvcells`): extract reads it,
and a guarded path would name no file. The guard of the accepted file is undone on reading.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from ..cache.store import Cache
from ..core.atomic import atomic_file
from ..core.csvcells import FORMULA_STARTS
from ..errors import InputError


def read_cell(text: str) -> str:
    """Undo the formula guard: ``'=x`` -> ``=x`` (a cell that starts with ``'`` for another
    reason is kept)."""
    return text[1:] if text.startswith("'") and text[1:].startswith(FORMULA_STARTS) else text


def apply_accepted(
    cache_path: Path, accepted: Path, out: Path, attribute: str | None = None
) -> tuple[Path, dict[str, int]]:
    """``out/relabelled.csv``: every file of the cache as ``path,label`` (absolute paths) with
    the accepted rows' new labels (the ``label`` column where given, else ``suggested``). A
    cache from a manifest with several columns keeps all of them (``path,category,finish,...``),
    the new labels going to ``attribute`` (default: the label column)."""
    try:
        with open(accepted, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            columns = rows[0].keys() if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"cannot read {accepted} ({e}); pass the rows of label_issues.csv you accept") from None
    if rows and ("path" not in columns or not {"suggested", "label"} & set(columns)):
        raise InputError(f"{accepted} needs a 'path' column and a 'suggested' or 'label' column; found {list(columns)}")
    with Cache(cache_path) as cache:
        columns = cache.columns()
        target_column = attribute or cache.label_column
        given = columns.get(target_column) or cache.column(target_column)  # the latter: its error
        paths = cache.paths
        row_of_hash = {h: i for i, h in enumerate(cache.content_hash)}
        duplicates = cache.duplicates
        root = Path(str(cache.attrs.get("image_root", "")))
    row_of = {p: i for i, p in enumerate(paths)}
    new: dict[int, str] = {}
    unknown = []
    for r in rows:
        path = read_cell((r.get("path") or "").strip())
        label = read_cell((r.get("label") or "").strip() or (r.get("suggested") or "").strip())
        if not path:
            continue
        if path not in row_of:
            unknown.append(path)
        elif not label:
            raise InputError(f"{accepted}: the row of {path} has no label; give it one or delete the row")
        else:
            new[row_of[path]] = label
    if unknown:
        raise InputError(
            f"{accepted}: {len(unknown)} path(s) are not in {cache_path}, e.g. {unknown[0]}; "
            "use label_issues.csv of an audit of this cache"
        )

    def cells_of(row: int) -> list[str]:
        cells = []
        for name, col in columns.items():
            old = col.values[int(col.labels[row])] if col.labels[row] >= 0 else ""
            cells.append(new.get(row) or old if name == target_column else old)
        return cells

    listed = [(p, cells_of(i)) for i, p in enumerate(paths)]
    listed += [(p, cells_of(row_of_hash[h])) for p, h in duplicates if h in row_of_hash]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["path", *columns])
    for p, cells in listed:
        w.writerow([str(root / p), *cells])
    target = out / "relabelled.csv"
    with atomic_file(target) as fh:
        fh.write(buf.getvalue().encode("utf-8"))
    changed = sum(1 for i, lab in new.items() if given.labels[i] < 0 or given.values[int(given.labels[i])] != lab)
    return target, {"relabelled": changed, "rows": len(listed)}
