"""A damaged segment file (issue 18, item 6, for the segmented store): one that a killed run
left outside the index and that was then damaged on disk is set aside (renamed, reported) and
its rows are extracted again; the re-run equals an uninterrupted run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import copy_sample_photos

from pipeline.cache.store import Cache, segment_dir
from pipeline.config import ExtractConfig
from pipeline.extract import extract

OPTS = ["--backbone", "tiny", "--precision", "fp32", "--workers", "0", "--batch-size", "4", "--no-progress"]


def _rows(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    with Cache(path) as c:
        feats = c.features()
        return {h: (p, feats[i]) for i, (h, p) in enumerate(zip(c.content_hash, c.paths, strict=True))}


def test_a_damaged_unindexed_segment_is_set_aside_and_its_rows_extracted_again(tmp_path, run_cli):
    images = copy_sample_photos(tmp_path / "images")
    out = tmp_path / "f.h5"
    env = {**os.environ, "HEADSTART_COMMIT_ROWS": "4", "HEADSTART_CRASH_AT": "segment-written:2"}
    r = subprocess.run(
        [sys.executable, "-m", "pipeline", "extract", str(images), "--out", str(out), *OPTS],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == -9, r.stderr[-2000:]
    segments = sorted(segment_dir(out).glob("seg-*.h5"))
    assert len(segments) == 2 and not out.exists()
    data = segments[1].read_bytes()
    segments[1].write_bytes(data[: len(data) // 2])  # a disk that lost the end of a file

    result = run_cli("extract", images, "--out", out, *OPTS)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert f"set aside damaged segment {segments[1].name} as {segments[1].name}.damaged" in result.output
    assert "extracted 14 (" in result.output and "reused 4," in result.output  # the sound segment: 4 rows
    assert (segment_dir(out) / (segments[1].name + ".damaged")).is_file()  # kept for a post-mortem

    reference = tmp_path / "reference.h5"
    extract(ExtractConfig(images=str(images), out=str(reference), backbone="tiny", precision="fp32",
                          workers=0, batch_size=4, progress=False))  # fmt: skip
    got, want = _rows(out), _rows(reference)
    assert got.keys() == want.keys()
    for h, (path, feats) in want.items():
        assert got[h][0] == path and np.array_equal(got[h][1], feats)
    assert run_cli("cache", "verify", out).exit_code == 0
