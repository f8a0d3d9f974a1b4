"""Reading a CSV manifest (``path,label``, or ``path`` plus one column per attribute) as people
really save them.

Encodings: UTF-8 (with or without the BOM Excel writes), and UTF-16 or UTF-32 *with* a BOM (Excel's
"Unicode Text", PowerShell's default), are read. Anything else is an ``Error:`` naming the line,
on purpose not a latin-1 fallback: latin-1 decodes every byte sequence, so a GBK, Shift-JIS or
cp1252 manifest would load "successfully" with mojibake labels, i.e. silently wrong classes -
the one outcome worse than an error for a catalog whose category names are often Chinese.

A field over ``csv.field_size_limit()`` (131,072 characters) is an ``Error:`` too rather than a
raised limit: no path or label is that long, and the usual cause is an unclosed quote that
swallowed the rows after it, which a raised limit would turn into silently lost rows.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import InputError

# Longest physical line read: bounds memory on a file that is not a manifest at all (one
# multi-gigabyte line), far above any path,label row.
MAX_LINE_CHARS = 1 << 20
# Longest BOM first: the UTF-32-LE mark starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_SAVE_AS_UTF8 = 'save it as UTF-8 (Excel: "CSV UTF-8"; or iconv -f LATIN1 -t UTF-8 old.csv > new.csv) and run again'


def _encoding(manifest: Path, head: bytes) -> str:
    for bom, encoding in _BOMS:
        if head.startswith(bom):
            return encoding
    first = head.split(b"\n", 1)[0]
    if b"\0" in first:  # no header of a UTF-8 CSV holds a NUL
        if any(half and half.count(0) >= 0.9 * len(half) for half in (first[0::2], first[1::2])):
            # Every other byte NUL: ASCII text in UTF-16.
            raise InputError(f"{manifest} looks like UTF-16 without a byte-order mark; {_SAVE_AS_UTF8}")
        raise InputError(
            f"{manifest} is not a text file (it holds NUL bytes); a manifest is a CSV file with a header row path,label"
        )
    return "utf-8-sig"


def _lines(manifest: Path, text: io.TextIOWrapper, encoding: str) -> Iterator[str]:
    """Physical lines, each checked: an undecodable byte stops at its own line number."""
    n = 0
    while True:
        try:
            line = text.readline(MAX_LINE_CHARS)
        except UnicodeDecodeError as e:  # UTF-16/32 only (UTF-8 reads with surrogateescape)
            raise InputError(
                f"{manifest} is not valid {encoding.upper()} at or after line {n + 1} ({e.reason}); {_SAVE_AS_UTF8}"
            ) from None
        if not line:
            return
        n += 1
        if len(line) == MAX_LINE_CHARS and not line.endswith(("\n", "\r")):
            raise InputError(
                f"{manifest} line {n} is longer than {MAX_LINE_CHARS:,} characters: not a path,label manifest?"
            )
        bad = next((c for c in line if "\udc80" <= c <= "\udcff"), None)
        if bad is not None:
            raise InputError(
                f"{manifest} line {n} is not valid UTF-8 (byte 0x{ord(bad) - 0xDC00:02x}; latin-1 or another "
                f"legacy encoding?); {_SAVE_AS_UTF8}"
            )
        yield line


def read_manifest(manifest: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """``(path, cells)`` per row with a non-empty path: ``cells`` maps every other named column
    (in header order: the attributes, :mod:`.attributes`) to its text, stripped ("" = empty)."""
    try:
        with open(manifest, "rb") as raw:
            encoding = _encoding(manifest, raw.read(4096))
            raw.seek(0)
            # surrogateescape keeps a bad UTF-8 byte visible to _lines, which names its line.
            errors = "surrogateescape" if encoding == "utf-8-sig" else "strict"
            text = io.TextIOWrapper(raw, encoding=encoding, errors=errors, newline="")
            reader = csv.DictReader(_lines(manifest, text, encoding))
            start = 1  # the line the record being read starts on: where a broken quote begins
            try:
                if reader.fieldnames is None or "path" not in reader.fieldnames:
                    raise InputError(
                        f"{manifest} needs a header row with a 'path' column (and optionally 'label', or one "
                        f"column per attribute: path,category,finish,tags); found {reader.fieldnames}"
                    )
                columns = _attribute_columns(manifest, reader.fieldnames)
                start = reader.line_num + 1
                for row in reader:
                    path = (row.get("path") or "").strip()
                    if path:
                        yield path, {name: (row.get(raw_name) or "").strip() for raw_name, name in columns}
                    start = reader.line_num + 1
            except csv.Error as e:
                raise InputError(_csv_error(manifest, start, e)) from None
    except OSError as e:
        raise InputError(f"cannot read {manifest}: {e.strerror or e}") from None


def _attribute_columns(manifest: Path, fieldnames: Sequence[str]) -> list[tuple[str, str]]:
    """The header's columns other than ``path``, as (name in the header, stripped name); an
    unnamed one (a trailing comma) is ignored. A name is also an HDF5 group name in the cache,
    so '/' is refused, and a repeated name would silently lose one of the columns."""
    columns = [(c, c.strip()) for c in fieldnames if c is not None and c.strip() and c.strip() != "path"]
    names = [name for _, name in columns]
    for c in names:
        if "/" in c or c.startswith("."):
            raise InputError(f"{manifest}: column name {c!r} may not contain '/' or start with '.'; rename it")
    twice = sorted({c for c in names if names.count(c) > 1})
    if twice:
        raise InputError(f"{manifest}: the header names column {twice[0]!r} more than once; rename one of them")
    return columns


def _csv_error(manifest: Path, line: int, e: csv.Error) -> str:
    msg = f"{manifest}, the row starting on line {line}: {e}"
    if "field larger than field limit" in str(e):
        return (
            f'{msg}. No path or label is that long: usually an unclosed quote (") in that line '
            "swallowed the rows after it; fix the quoting (or remove long extra columns) and run again"
        )
    return f"{msg}; fix the file (columns path,label, fields with commas in double quotes) and run again"
