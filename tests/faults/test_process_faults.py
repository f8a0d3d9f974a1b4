"""Faults of processes rather than files (issue 18, items 7 and 8): a writer killed while its
forked children live on, a decoding worker killed mid-run, full disks and file-size limits in
the commands that write, read-only output folders."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import run_headstart

from pipeline.cache.store import writer_lock

HOLD_AND_FORK = """
import multiprocessing as mp, sys, time
from pathlib import Path
from pipeline.cache.store import writer_lock

def child():
    time.sleep(60)  # like a DataLoader worker that has not noticed its parent died yet

with writer_lock(Path(sys.argv[1])):
    p = mp.get_context("fork").Process(target=child)
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
"""


def test_a_killed_writers_forked_children_do_not_keep_its_lock(tmp_path):
    out = tmp_path / "f.h5"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_AND_FORK, str(out)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    child = int(holder.stdout.readline())
    try:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(child, 0)  # the child is still alive ...
        with writer_lock(out):  # ... and the lock is free at once
            pass
    finally:
        os.kill(child, signal.SIGKILL)
        with pytest.raises(ChildProcessError):
            os.waitpid(child, 0)  # not our child: reaped by init; just make sure it is gone
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and Path(f"/proc/{child}").exists():
            time.sleep(0.05)


# --------------------------------------------------------------------------- item 7: I/O errors

REPO = Path(__file__).resolve().parents[2]


def _headstart(*args, fsize: int | None = None, env=None, timeout=300) -> subprocess.CompletedProcess[str]:
    """``headstart ARGS``; ``fsize``: a file-size limit (``ulimit -f``) in bytes."""
    limits = {resource.RLIMIT_FSIZE: fsize} if fsize is not None else None
    return run_headstart(*args, limits=limits, env=env, cwd=REPO, timeout=timeout)


def _failed_cleanly(r: subprocess.CompletedProcess[str], *says: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for s in says:
        assert s in r.stderr, r.stderr[-3000:]


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_head):
    root = tmp_path_factory.mktemp("io_faults")
    r = _headstart("export", tiny_head, "--out", root / "model")
    assert r.returncode == 0, r.stderr[-3000:]
    return root / "model"


def test_predict_past_a_file_size_limit_keeps_the_previous_output(model, tiny_head, tmp_path):
    images = tiny_head.parent / "images"
    out = tmp_path / "predictions.csv"
    out.write_text("the previous predictions\n", encoding="utf-8")
    r = _headstart("predict", model, images, "--out", out, "--workers", "0", "--no-progress", fsize=300)
    _failed_cleanly(r, "File too large", "ulimit -f", "The previous output file, if any, is unchanged")
    assert out.read_text(encoding="utf-8") == "the previous predictions\n"  # not truncated
    assert sorted(p.name for p in tmp_path.iterdir()) == ["predictions.csv"]  # no temporary left


def test_predict_embeddings_past_a_file_size_limit_leave_nothing_half_written(model, tiny_head, tmp_path):
    images = tiny_head.parent / "images"
    emb = tmp_path / "emb.npy"
    r = _headstart("predict", model, images, "--out", "-", "--embeddings", emb, "--workers", "0", "--no-progress",
                   fsize=1000)  # fmt: skip
    _failed_cleanly(r, "File too large")
    assert list(tmp_path.iterdir()) == []


def test_fit_head_past_a_file_size_limit_keeps_the_previous_head(tiny_head, tmp_path):
    import shutil

    head = tmp_path / "head"
    shutil.copytree(tiny_head, head)
    before = {p.name: p.read_bytes() for p in head.iterdir()}
    cache = tiny_head.parent / "features.h5"
    r = _headstart("fit-head", cache, "--out", head, "--c", "0.5", "--near-duplicate-threshold", "1", fsize=2000)
    _failed_cleanly(r, "File too large", "The previous head, if any, is unchanged")
    assert {p.name: p.read_bytes() for p in head.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["head"]  # its staging folder is gone


def test_export_past_a_file_size_limit_keeps_the_previous_model(model, tiny_head, tmp_path):
    import shutil

    out = tmp_path / "model"
    shutil.copytree(model, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    r = _headstart("export", tiny_head, "--out", out, fsize=4000)
    _failed_cleanly(r, "File too large", "The previous model, if any, is unchanged")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


@pytest.mark.parametrize(
    ("command", "out"),
    [
        ("extract", "/proc/headstart/f.h5"),
        ("fit-head", "/proc/headstart/head"),
        ("finetune", "/proc/headstart/ft"),
        ("export", "/proc/headstart/model"),
        ("predict", "/proc/headstart/p.csv"),
        ("evaluate", "/proc/headstart/report"),
        ("demo", "/proc/headstart/demo"),
    ],
)
def test_an_unwritable_out_is_a_usage_error_in_every_writing_command(command, out, tiny_head, model, run_cli):
    images = tiny_head.parent / "images"
    cache = tiny_head.parent / "features.h5"
    inputs = {
        "extract": [images],
        "fit-head": [cache],
        "finetune": [images, "--head", tiny_head],
        "export": [tiny_head],
        "predict": [model, images],
        "evaluate": [model, images],
        "demo": [],
    }[command]
    r = run_cli(command, *inputs, "--out", out)
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    assert "cannot create files in /proc" in r.output, r.output


def test_a_killed_decoding_worker_is_an_error_and_the_next_run_resumes(tmp_path):
    from conftest import copy_sample_photos

    from pipeline.cache.store import Cache

    images = copy_sample_photos(tmp_path / "images")
    out = tmp_path / "f.h5"
    args = ("extract", images, "--out", out, "--backbone", "tiny", "--workers", "1", "--batch-size", "2",
            "--no-progress")  # fmt: skip
    r = _headstart(*args, env={"HEADSTART_CRASH_AT": "decode:15", "HEADSTART_COMMIT_ROWS": "2"})
    _failed_cleanly(r, "Error: a decoding worker process died", "the next run resumes")
    from pipeline.cache.store import segment_dir

    kept = 2 * len(list(segment_dir(out).glob("seg-*.h5")))  # rows finished before the worker died
    r = _headstart(*args)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"18 rows, 3 classes; extracted {18 - kept} " in r.stdout and f"reused {kept}," in r.stdout, r.stdout
    with Cache(out) as c:
        assert c.n_rows == 18
