"""An unchanged re-run keeps the committed index without rebuilding it (scan.inputs_digest):
what it keeps must be exactly what a rebuild would write, and any change to what the index is
made from must take the full path."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import pytest
from conftest import age_files, copy_sample_photos, extract_config

import pipeline.extract as extract_mod
from pipeline.cache.inspection import verify
from pipeline.cache.previous import PreviousIndex
from pipeline.cache.store import Cache
from pipeline.extract import extract


def _awkward_folder(root: Path) -> Path:
    """Class folders with what makes an index more than one row per file: identical bytes under
    two labels, a duplicate within a class, a file that does not decode, a stray unlabelled
    file, a file that is not a photo and a Chinese class name."""
    copy_sample_photos(root, per_class=4, classes=("bag", "口红"))
    bag = sorted((root / "bag").glob("*.png"))
    shutil.copy(bag[0], root / "口红" / "same-bytes.png")  # a label conflict
    shutil.copy(bag[1], root / "bag" / "copy.png")  # a plain duplicate
    (root / "bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    shutil.copy(bag[2], root / "stray.png")  # beside the class folders: unlabelled
    (root / "notes.txt").write_text("not a photo")
    age_files(root)
    return root


def _manifest(images: Path, path: Path) -> Path:
    rows = []
    for i, p in enumerate(sorted(images.rglob("*.png"))):
        finish = "matte" if i % 2 else "glossy"
        rows.append([p.relative_to(path.parent).as_posix(), p.parent.name, finish, "sale" if i % 3 == 0 else ""])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "category", "finish", "tags"])
        w.writerows(rows)
    age_files(path.parent)
    return path


@pytest.fixture
def assembled(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times a run rebuilt the index's contents (0: it kept the committed index)."""
    calls: list[int] = []
    real = extract_mod.index_contents

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(1)
        return real(*a, **kw)

    monkeypatch.setattr(extract_mod, "index_contents", counting)
    return calls


def _summary(s: extract_mod.ExtractSummary) -> tuple:
    return s.rows, s.extracted, s.reused, sorted(s.skipped), s.class_names, s.known_bad, s.removed, s.relabelled


@pytest.mark.parametrize("layout", ["folders", "manifest"])
def test_the_kept_index_is_what_a_rebuild_writes(tmp_path, monkeypatch, assembled, layout):
    images = _awkward_folder(tmp_path / "images")
    source = images if layout == "folders" else _manifest(images, tmp_path / "catalog.csv")
    out = tmp_path / "features.h5"
    extract(extract_config(source, out))  # extracts; the index records what it was made from
    before = out.stat()
    assembled.clear()
    with monkeypatch.context() as m:  # nothing new: the network is never built, no weights are read

        def refuse(*a, **kw):  # type: ignore[no-untyped-def]
            raise AssertionError("the backbone was loaded")

        m.setattr(extract_mod, "load_backbone", refuse)
        kept = extract(extract_config(source, out))
    assert assembled == [] and kept.extracted == 0 and kept.known_bad == 1
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    # The same run made to rebuild the contents: the digest of what it would write equals the
    # committed one (the index is not rewritten), and it reports the same.
    monkeypatch.setattr(PreviousIndex, "inputs", property(lambda self: None))
    rebuilt = extract(extract_config(source, out))
    assert assembled == [1] and _summary(rebuilt) == _summary(kept)
    assert (out.stat().st_ino, out.stat().st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert any("identical bytes" in why for _, why in kept.skipped)


def _settled(tmp_path: Path) -> tuple[Path, Path]:
    images = copy_sample_photos(tmp_path / "images", per_class=3)
    age_files(images)
    manifest = _manifest(images, tmp_path / "catalog.csv")
    out = tmp_path / "features.h5"
    extract(extract_config(manifest, out))
    return manifest, out


def test_a_changed_cell_a_touched_file_or_new_limits_take_the_full_path(tmp_path, assembled):
    manifest, out = _settled(tmp_path)
    assert extract(extract_config(manifest, out)).extracted == 0 and assembled == [1]  # kept

    text = manifest.read_text(encoding="utf-8").replace(",matte,", ",satin,", 1)  # one attribute cell
    manifest.write_text(text, encoding="utf-8")
    age_files(manifest.parent)
    s = extract(extract_config(manifest, out))
    assert assembled == [1, 1] and s.relabelled == 1
    extract(extract_config(manifest, out))
    assert len(assembled) == 2  # kept again

    photo = sorted((manifest.parent / "images" / "bag").glob("*.png"))[0]
    st = photo.stat()
    os.utime(photo, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))  # touched: the stat differs
    extract(extract_config(manifest, out))
    assert len(assembled) == 3

    extract(extract_config(manifest, out, max_pixels=10**7))  # other decode limits: known-bad files are tried again
    assert len(assembled) == 4


def test_a_removed_photo_or_a_segment_left_by_a_killed_run_take_the_full_path(tmp_path, assembled):
    manifest, out = _settled(tmp_path)
    segments = out.with_name(out.name + ".segments")
    spare = tmp_path / "spare.h5"
    shutil.copy(sorted(segments.glob("seg-*.h5"))[0], spare)

    lines = manifest.read_text(encoding="utf-8").splitlines()
    manifest.write_text("\n".join(lines[:-1]) + "\n", encoding="utf-8")  # one photo fewer
    age_files(manifest.parent)
    s = extract(extract_config(manifest, out))
    assert assembled == [1, 1] and s.removed == 1
    extract(extract_config(manifest, out))
    assert assembled == [1, 1]  # kept

    left = segments / "seg-99999999-left-by-a-killed-run.h5"
    shutil.copy(spare, left)  # a finished segment outside the index
    extract(extract_config(manifest, out))
    assert assembled == [1, 1, 1] and not verify(out)
    with Cache(out) as c:
        assert {p.name for p in segments.glob("seg-*.h5")} == set(c.segments)


def test_a_damaged_segment_outside_the_index_is_set_aside_and_the_index_kept(tmp_path, assembled):
    manifest, out = _settled(tmp_path)
    rows = extract(extract_config(manifest, out)).rows
    junk = out.with_name(out.name + ".segments") / "seg-99999999-junk.h5"
    junk.write_bytes(b"not an HDF5 file")
    s = extract(extract_config(manifest, out))
    assert assembled == [1] and s.rows == rows and s.set_aside and not junk.exists()
    assert junk.with_name(junk.name + ".damaged").exists() and not verify(out)
