"""Fault corpus, discovery (issue 18 items 4 and 11): file names that are not UTF-8, NULs in a
manifest, manifests in other encodings or with runaway fields. Each is a recorded skip or one
``Error:`` naming the file and line, never a traceback; the CLI runs as a real process."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.data.catalog import discover, escape_name
from pipeline.errors import InputError

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data" / "images"


def headstart(*args: object, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``headstart ARGS`` as a user runs it: a fresh process of this checkout's package."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )


def unescape(shown: str) -> bytes:
    """The reverse of the escaping docs/formats.md documents: ``\\xNN`` -> byte NN."""
    return re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m[1], 16)]), shown.encode("utf-8"))


# --------------------------------------------------------------------------- item 4: names


@pytest.fixture
def bad_names(tmp_path: Path) -> Path:
    """Class folders with good photos, one file and one class folder named in latin-1 bytes."""
    root = tmp_path / "images"
    for cls, photo in (("bag", "hopper.jpg"), ("shoe", "pil_sample_rgb.jpg")):
        (root / cls).mkdir(parents=True)
        shutil.copy(DATA / photo, root / cls / "ok.jpg")
    shutil.copy(DATA / "hopper_gray.jpg", root / "bag" / "good.jpg")
    broot = os.fsencode(root)
    with open(broot + b"/bag/caf\xe9.jpg", "wb") as f:  # not UTF-8: os.walk gives 'caf\udce9.jpg'
        f.write((DATA / "orientation_rectangle.jpg").read_bytes())
    os.mkdir(broot + b"/d\xe9cor")
    shutil.copy(DATA / "hopper.gif", broot + b"/d\xe9cor/x.gif")
    return root


def test_name_not_utf8_is_skipped_with_an_escaped_name(bad_names):
    cat = discover(bad_names)
    assert sorted(i.rel for i in cat.items) == ["bag/good.jpg", "bag/ok.jpg", "shoe/ok.jpg"]
    skipped = {s.rel: s.reason for s in cat.skipped}
    assert set(skipped) == {"bag/caf\\xe9.jpg", "d\\xe9cor/x.gif"}
    assert all("not valid UTF-8" in r and "rename it" in r for r in skipped.values()), skipped
    for shown in skipped:
        shown.encode("utf-8")  # storable as it is: HDF5, CSV and JSON take it
        assert os.path.exists(os.fsencode(bad_names) + b"/" + unescape(shown))  # and reversible


def test_escape_name_reverses():
    for raw in (b"plain.jpg", b"caf\xe9.jpg", "口红/a.jpg".encode(), b"\xff\xfe/x.png", b"nul\x00.jpg"):
        assert unescape(escape_name(os.fsdecode(raw))) == raw


def test_name_not_utf8_never_stops_extract(bad_names, tmp_path):
    """Before: every run (and every re-run) died with UnicodeEncodeError writing the cache."""
    out = tmp_path / "f.h5"
    args = ["extract", bad_names, "--out", out, "--backbone", "tiny", "--workers", "0", "--no-progress"]
    for _ in range(2):  # the re-run too
        r = headstart(*args)
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "skipped bag/caf\\xe9.jpg: file name is not valid UTF-8" in r.stderr, r.stderr
    from pipeline.cache.store import Cache

    with Cache(out) as c:
        assert sorted(c.paths) == ["bag/good.jpg", "bag/ok.jpg", "shoe/ok.jpg"]
        assert {p for p, _ in c.skipped} >= {"bag/caf\\xe9.jpg", "d\\xe9cor/x.gif"}


def test_nul_in_a_manifest_path_or_label_is_skipped(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for n in ("a.jpg", "c.jpg"):
        shutil.copy(DATA / "hopper.jpg", photos / n)
    manifest = tmp_path / "list.csv"
    manifest.write_text('path,label\nphotos/a.jpg,bag\n"photos/b\0.jpg",bag\nphotos/c.jpg,"sh\0oe"\n', encoding="utf-8")
    cat = discover(manifest)
    assert [(i.rel, i.label) for i in cat.items] == [("photos/a.jpg", "bag")]
    skipped = {s.rel: s.reason for s in cat.skipped}
    assert set(skipped) == {"photos/b\\x00.jpg", "photos/c.jpg"}
    assert skipped["photos/b\\x00.jpg"].startswith("path contains a NUL character")
    assert skipped["photos/c.jpg"].startswith("label 'sh\\\\x00oe' contains a NUL character")
    r = headstart(
        "extract", manifest, "--out", tmp_path / "m.h5", "--backbone", "tiny", "--workers", "0", "--no-progress"
    )
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "1 rows" in r.stdout + r.stderr


# --------------------------------------------------------------------------- item 11: manifests


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    (tmp_path / "photos").mkdir()
    for n in ("a.jpg", "b.jpg", "c.jpg"):
        shutil.copy(DATA / "hopper.jpg", tmp_path / "photos" / n)
    return tmp_path


ROWS = "path,label\nphotos/a.jpg,口红\nphotos/b.jpg,café\r\nphotos/c.jpg,\n"


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig", "utf-16", "utf-16-be-bom", "utf-32"])
def test_manifest_in_unicode_encodings_is_read(photos, encoding):
    """UTF-8 with or without BOM, and UTF-16/32 with their BOM (Excel's "Unicode Text",
    PowerShell's default). Before: UnicodeDecodeError for all but UTF-8."""
    manifest = photos / "list.csv"
    if encoding == "utf-16-be-bom":
        manifest.write_bytes(b"\xfe\xff" + ROWS.encode("utf-16-be"))
    else:
        manifest.write_bytes(ROWS.encode(encoding))
    cat = discover(manifest)
    assert [(i.rel, i.label) for i in cat.items] == [
        ("photos/a.jpg", "口红"),
        ("photos/b.jpg", "café"),
        ("photos/c.jpg", None),
    ]


def test_manifest_in_latin1_is_an_error_naming_the_line(photos):
    """Not a latin-1 fallback (docs/formats.md says why): that would turn a GBK or cp1252 file
    into wrong labels silently."""
    manifest = photos / "list.csv"
    manifest.write_bytes(ROWS.encode("utf-8").replace("café".encode(), "café".encode("latin-1")))
    with pytest.raises(InputError, match=r"list\.csv line 3 is not valid UTF-8 \(byte 0xe9.*save it as UTF-8"):
        discover(manifest)
    r = headstart("extract", manifest, "--out", photos / "f.h5", "--backbone", "tiny", "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "Error: " in r.stderr and "line 3 is not valid UTF-8" in r.stderr


def test_manifest_in_utf16_without_bom_is_an_error(photos):
    manifest = photos / "list.csv"
    manifest.write_bytes(ROWS.encode("utf-16-le"))
    with pytest.raises(InputError, match="looks like UTF-16 without a byte-order mark; save it as UTF-8"):
        discover(manifest)


def test_bad_utf16_is_an_error_not_a_traceback(photos):
    manifest = photos / "list.csv"
    manifest.write_bytes(
        b"\xff\xfe" + "path,label\nphotos/a.jpg,x\n".encode("utf-16-le") + b"\x00\xd8"
    )  # lone surrogate
    with pytest.raises(InputError, match=r"not valid UTF-16 at or after line 3"):
        discover(manifest)


def test_runaway_field_is_an_error_naming_where_it_starts(photos):
    """An unclosed quote swallows every row after it into one field; past csv's 131,072-character
    limit that was `_csv.Error`. Now the message names the row where the quote opens."""
    manifest = photos / "list.csv"
    rest = "".join(f"photos/a.jpg,bag{i}\n" for i in range(10_000))
    manifest.write_text(f'path,label\nphotos/a.jpg,bag\nphotos/b.jpg,"shoe\n{rest}', encoding="utf-8")
    with pytest.raises(InputError, match=r"the row starting on line 3: field larger than field limit .*unclosed quote"):
        discover(manifest)
    r = headstart("extract", manifest, "--out", photos / "f.h5", "--backbone", "tiny", "--no-progress")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "Error: " in r.stderr and "unclosed quote" in r.stderr


def test_long_field_and_long_path(photos):
    """A 200,000-character label is the same Error; a path too long for the filesystem (but
    within csv's limit) is a recorded skip, not an OSError traceback."""
    manifest = photos / "list.csv"
    manifest.write_text(f"path,label\nphotos/a.jpg,{'x' * 200_000}\n", encoding="utf-8")
    with pytest.raises(InputError, match="line 2: field larger than field limit"):
        discover(manifest)
    long = "photos/" + "d" * 5000 + ".jpg"
    manifest.write_text(f"path,label\nphotos/a.jpg,bag\n{long},bag\n", encoding="utf-8")
    cat = discover(manifest)
    assert [i.rel for i in cat.items] == ["photos/a.jpg"]
    assert [(s.rel, s.reason) for s in cat.skipped] == [(long, "cannot use this path: File name too long")]


def test_binary_file_named_csv_is_an_error(photos):
    manifest = photos / "list.csv"
    manifest.write_bytes((DATA / "hopper.jpg").read_bytes())
    with pytest.raises(InputError, match=r"list\.csv is not a text file \(it holds NUL bytes\)"):
        discover(manifest)
