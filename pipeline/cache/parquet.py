"""``headstart cache export CACHE --format parquet DIR``: the cache as Parquet for other tools
(DuckDB, polars, LanceDB, FAISS users). No torch here; pyarrow is imported only when called.

Columns: ``content_hash`` (string), ``path`` (string), ``label`` (the class name, null when
unlabelled), ``label_id`` (int32 index into the class names, null when unlabelled) and
``features`` (fixed-size list of ``D`` float16 or float32: the cache's dtype unless asked
otherwise); then one string column per further attribute of a manifest (its cell as written,
``vegan;refillable`` for a multi-label one, null when empty), named as the attribute or
``attribute_<name>`` where that name is taken. Rows are in the cache's order. The rows are streamed: a chunk of about
:data:`_CHUNK_BYTES` of features is read, written as one row group and dropped, so memory
does not grow with the catalog. ``DIR`` gets ``part-00000.parquet``, ... of ``rows_per_file``
rows each; it is built in a staging folder beside ``DIR`` and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .. import __version__
from ..core.atomic import replace_dir, stage_dir
from ..errors import InputError
from ..models.fingerprint import KEYS as FINGERPRINT_KEYS
from .store import Cache

FORMATS = ("parquet",)
DEFAULT_ROWS_PER_FILE = 1_000_000
_CHUNK_BYTES = 64 << 20  # feature bytes per row group (26,214 rows at 1280 float16)
_PART = "part-{:05d}.parquet"


@dataclass(frozen=True)
class ExportSummary:
    out: Path
    rows: int
    feature_dim: int
    dtype: str
    files: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return (
            f"{self.out}: {self.rows} rows x {self.feature_dim} ({self.dtype}) in {self.files} Parquet file(s), "
            f"{self.bytes / 1e6:.1f} MB, in {self.seconds:.1f} s"
        )


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise InputError(
            "cache export --format parquet needs pyarrow: install the extra, `pip install '.[parquet]'` in the clone "
            "(or `pip install 'pyarrow>=15'`)"
        ) from None
    if int(pa.__version__.split(".")[0]) < 15:
        raise InputError(
            f"cache export --format parquet needs pyarrow 15 or newer (Parquet float16), not {pa.__version__}: "
            "`pip install '.[parquet]'`"
        )
    return pa, pq


def _is_previous_export(d: Path) -> bool:
    return all(p.is_file() and p.name.startswith("part-") and p.suffix == ".parquet" for p in d.iterdir())


def export_parquet(
    cache: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    dtype: str | None = None,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
) -> ExportSummary:
    """Write ``cache`` as Parquet files in the folder ``out`` (replacing an earlier export there)."""
    t0 = time.perf_counter()
    cache, out = Path(cache), Path(out)
    if rows_per_file < 1:
        raise InputError(f"--rows-per-file must be at least 1, not {rows_per_file}")
    if dtype not in (None, "float16", "float32"):
        raise InputError(f"--dtype must be float16 or float32, not {dtype!r}")
    if out.exists() and (not out.is_dir() or not _is_previous_export(out)):
        raise InputError(
            f"{out} exists and is not an earlier Parquet export (only part-*.parquet files); give a new or empty folder"
        )
    pa, pq = _pyarrow()
    with Cache(cache) as c:
        n, d = c.n_rows, c.feature_dim
        want = np.dtype(dtype or c.dtype)
        names = c.class_names
        meta = {
            "format": "headstart-features-parquet",
            "schema_version": 1,
            "cache": str(cache.resolve()),
            "class_names": names,
            "fingerprint": {k: c.attrs.get(k) for k in FINGERPRINT_KEYS},
            "cache_dtype": c.dtype,
            "headstart_version": __version__,
        }
        value = pa.float16() if want == np.float16 else pa.float32()
        columns = {_column_name(a): c.attribute(a) for a in c.attribute_names}
        schema = pa.schema(
            [
                pa.field("content_hash", pa.string(), nullable=False),
                pa.field("path", pa.string(), nullable=False),
                pa.field("label", pa.string()),
                pa.field("label_id", pa.int32()),
                pa.field("features", pa.list_(value, d), nullable=False),
                *(pa.field(name, pa.string()) for name in columns),
            ],
            metadata={"headstart": json.dumps(meta, ensure_ascii=False, default=str)},
        )
        chunk = max(1, min(rows_per_file, _CHUNK_BYTES // max(1, d * want.itemsize)))
        label_names = pa.array(names, pa.string())
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = stage_dir(out)
        try:
            attributes = [(pa.array(col.values, pa.string()), col.labels) for col in columns.values()]
            files = _write_parts(pa, pq, c, stage, schema, label_names, want, chunk, rows_per_file, attributes)
            written = sum(p.stat().st_size for p in stage.iterdir())
            replace_dir(stage, out)
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return ExportSummary(out, n, d, str(want), files, written, time.perf_counter() - t0)


def _write_parts(
    pa: Any,
    pq: Any,
    c: Cache,
    stage: Path,
    schema: Any,
    label_names: Any,
    want: np.dtype,
    chunk: int,
    rows_per_file: int,
    attributes: Sequence[tuple[Any, np.ndarray]] = (),
) -> int:
    """Stream ``c`` into ``stage/part-*.parquet``, one row group per chunk of ``chunk`` rows and
    whole row groups per file, at most ``rows_per_file`` rows. Returns the file count."""
    d = c.feature_dim
    writer = None
    files = in_file = 0

    def new_file() -> Any:
        return pq.ParquetWriter(
            stage / _PART.format(files),
            schema,
            compression="zstd",
            use_dictionary=["label"],
            write_statistics=["content_hash", "path", "label", "label_id"],  # not 1280 feature columns
        )

    # The per-row datasets (public names) are read in the same slices as the features, so no
    # list of every path is ever held.
    with h5py.File(c.path, "r") as f:
        hashes, paths, labels = f["content_hash"], f["paths"], f["labels"]
        for start, feats in c.iter_features(chunk, dtype=want):
            stop = start + len(feats)
            if writer is None or in_file + len(feats) > rows_per_file:
                if writer is not None:
                    writer.close()
                writer, in_file = new_file(), 0
                files += 1
            lab = np.asarray(labels[start:stop], dtype=np.int32)
            ids = pa.array(lab, pa.int32(), mask=lab < 0)
            table = pa.Table.from_arrays(
                [
                    pa.array(_text(hashes[start:stop]), pa.string()),
                    pa.array(_text(paths[start:stop]), pa.string()),
                    label_names.take(ids),
                    ids,
                    pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(feats).reshape(-1)), d),
                    *(
                        values.take(pa.array(ids[start:stop], pa.int32(), mask=ids[start:stop] < 0))
                        for values, ids in attributes
                    ),
                ],
                schema=schema,
            )
            writer.write_table(table, row_group_size=len(table))
            in_file += len(feats)
    if writer is None:  # an empty cache: one file with the schema and no rows
        writer = new_file()
        files = 1
    writer.close()
    return files


_TAKEN = frozenset({"content_hash", "path", "label", "label_id", "features"})


def _column_name(attribute: str) -> str:
    return f"attribute_{attribute}" if attribute in _TAKEN else attribute


def _text(values: np.ndarray) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]
