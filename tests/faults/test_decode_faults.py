"""Fault corpus, decoding (issue 18 items 1, 2, 3, 14): hostile files against every decode road.

Memory and hangs are proved in real child processes: a hang is a ``timeout`` that expires, a
memory bound is ``RLIMIT_AS`` set in the child once its imports are done (so the budget is what
the decode itself may add, whatever the machine's import footprint), and a CLI run under a
``preexec_fn`` limit. Files are real, made in ``tmp_path``.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_headstart
from PIL import Image

from pipeline.core.hashing import hash_file
from pipeline.data.gpu_decode import fits_gpu_resize, probe_jpeg
from pipeline.data.images import DEFAULT_MAX_PIXELS, load_pixels, preprocess
from pipeline.data.loader import CHANGED, PixelDataset, RawJpeg, make_loader
from pipeline.data.preprocessing import Preprocessing

REPO = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
DATA = REPO / "tests" / "data" / "images"
LITE0 = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic")  # efficientnet_lite0's recipe
LETTERBOX = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic", letterbox=True)
# Fewer threads and malloc arenas: the child's address space then depends less on the machine.
CHILD_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MALLOC_ARENA_MAX": "2"}

PRELUDE = r"""
import json, os, resource, sys
def limit_memory(budget_mb):
    # RLIMIT_AS = what the process maps now + the budget: the decode may add at most that.
    with open("/proc/self/status") as f:
        size_kb = next(int(line.split()[1]) for line in f if line.startswith("VmSize:"))
    limit = size_kb * 1024 + budget_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
def done(**result):
    print(json.dumps(result))
"""


def child(code: str, *args: object, timeout: float = 120) -> dict:
    """Run ``code`` (after :data:`PRELUDE`) in a fresh Python; its last stdout line is JSON."""
    try:
        r = subprocess.run(
            [sys.executable, "-c", PRELUDE + code, *map(str, args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, **CHILD_ENV},
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"the child blocked: no answer within {timeout} s")
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- item 2: aspect ratio


DECODE_IN_BUDGET = r"""
import dataclasses
from pipeline.data.images import load_pixels
from pipeline.data.preprocessing import Preprocessing
path, letterbox, budget = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
prep = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic", letterbox=letterbox)
limit_memory(budget)
x = load_pixels(path, prep)
red = (x[0] == 200) & (x[1] == 10) & (x[2] == 10)
white = (x == 255).all(axis=0)
done(shape=list(x.shape), red=int(red.sum()), white=int(white.sum()), centre_red=bool(red[110:114, 110:114].any()))
"""


@pytest.mark.parametrize("letterbox", [False, True], ids=["crop", "letterbox"])
@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1)], ids=["tall", "wide"])
def test_aspect_ratio_bomb_decodes_in_bounded_memory(tmp_path, size, letterbox):
    """A ~475-byte 1 x 100,000 PNG passes the pixel limit; resizing its short side to 256 would
    build 256 x 25,600,000 pixels (26 GB), letterboxing a 100,000^2 canvas. Now it decodes within
    256 MB beyond the imports, with the crop's geometry."""
    path = tmp_path / "line.png"
    Image.new("RGB", size, (200, 10, 10)).save(path)
    assert path.stat().st_size < 1000 and size[0] * size[1] < DEFAULT_MAX_PIXELS
    r = child(DECODE_IN_BUDGET, path, int(letterbox), 256)
    assert r["shape"] == [3, 224, 224] and r["centre_red"]
    if letterbox:  # the whole line, 224 pixels long and 1 wide, across the middle of a white square
        assert (r["red"], r["white"]) == (224, 224 * 224 - 224), r
    else:  # the crop is all line
        assert r["red"] == 224 * 224, r


def test_bounded_resize_keeps_the_crop_geometry():
    """The bounded road (taken beyond the limit) resizes only the crop's region: on a real photo
    it gives what the plain road gives, to within the rounding of 8-bit intermediates."""
    photo = Image.open(DATA / "flower_q85_420.jpg").convert("RGB")  # a real photo, 2268 x 1512
    strip = photo.crop((0, 700, 2268, 712))  # 2268 x 12: a strip, 189:1
    prep = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bilinear")
    plain = preprocess(strip, prep).astype(int)
    assert prep.work_pixels(*strip.size) > 10_000  # so max_pixels=10_000 forces the bounded road
    bounded = preprocess(strip, prep, max_pixels=10_000).astype(int)
    assert np.abs(plain - bounded).max() <= 1
    lb = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bilinear", letterbox=True)
    plain_lb, bounded_lb = preprocess(strip, lb), preprocess(strip, lb, max_pixels=10_000)
    # Same framing: the strip's rows in the middle, white above and below.
    assert abs(_photo_rows(plain_lb).mean() - _photo_rows(bounded_lb).mean()) <= 1
    assert (plain_lb[:, :100] == 255).all() and (bounded_lb[:, :100] == 255).all()


def _photo_rows(x: np.ndarray) -> np.ndarray:
    return np.flatnonzero((x != 255).any(axis=(0, 2)))


def _cli_under_limit(args: list[object], limit_gib: float, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    limit = int(limit_gib * 2**30)
    return run_headstart(*args, limits={resource.RLIMIT_AS: limit}, env=CHILD_ENV, timeout=timeout)


@pytest.mark.parametrize("letterbox", [False, True], ids=["crop", "letterbox"])
def test_aspect_ratio_bomb_in_extract_gets_its_row(tmp_path, letterbox):
    """The user's view: `headstart extract` under a 5 GiB address-space limit (the tiny backbone
    resizes to 40: a 1 x 1,000,000 PNG would need 40 x 40,000,000 pixels, 6.4 GB, or a 10^12
    canvas). Before: "cannot decode: MemoryError" (the OOM killer without a limit). Now a row."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (1, 1_000_000), (200, 10, 10)).save(images / "line.png")
    shutil.copy(DATA / "hopper.jpg", images / "hopper.jpg")
    out = tmp_path / "f.h5"
    args = ["extract", images, "--out", out, "--backbone", "tiny", "--workers", "0", "--no-progress"]
    r = _cli_under_limit([*args, *(["--letterbox"] if letterbox else [])], 5)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "skipped" not in r.stderr and "2 rows" in r.stdout + r.stderr, r.stdout + r.stderr


def test_gpu_resize_bound_is_the_cpu_one():
    """--decode gpu cannot run here; its bound is plain arithmetic, shared with the CPU road."""
    assert LITE0.work_pixels(1, 100_000) == 256 * 25_600_000
    assert LITE0.work_pixels(640, 480) == 256 * 341
    assert LETTERBOX.work_pixels(1, 100_000) == 100_000**2
    assert not fits_gpu_resize(1, 100_000, LITE0) and not fits_gpu_resize(1, 100_000, LETTERBOX)
    assert fits_gpu_resize(6000, 4000, LITE0) and fits_gpu_resize(6000, 4000, LETTERBOX)  # a 24 MP photo
    assert not fits_gpu_resize(6000, 4000, LETTERBOX, max_pixels=30_000_000)  # the canvas is 36 MP


def test_probe_jpeg_sends_an_aspect_bomb_to_the_cpu(tmp_path):
    path = tmp_path / "line.jpg"
    Image.new("RGB", (1, 65_000), (200, 10, 10)).save(path, quality=90)  # JPEG's sides stop at 65,535
    assert isinstance(probe_jpeg(path), RawJpeg)  # a plain RGB JPEG within the pixel limit ...
    assert probe_jpeg(path, prep=LITE0) is None  # ... that the GPU resize must not take
    assert isinstance(probe_jpeg(DATA / "hopper.jpg", prep=LITE0), RawJpeg)


DECODE_BATCH_IN_BUDGET = r"""
import torch
from pipeline.data.gpu_decode import decode_batch, probe_jpeg
from pipeline.data.preprocessing import Preprocessing
prep = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic")
raw = probe_jpeg(sys.argv[1])  # no prep: as if the header check had been skipped
limit_memory(int(sys.argv[2]))
(x,) = decode_batch([raw], prep, torch.device("cpu"))
done(shape=list(x.shape), centre=x[:, 112, 112].tolist())
"""


def test_decode_batch_checks_what_nvjpeg_decoded(tmp_path):
    """decode_batch's own check (torchvision's JPEG decoder runs on the CPU too): a 1 x 65,000
    JPEG that reached it is resized by the CPU's bounded road, not by torch's interpolate of
    256 x 16,640,000 float pixels (51 GB)."""
    path = tmp_path / "line.jpg"
    Image.new("RGB", (1, 65_000), (200, 10, 10)).save(path, quality=90)
    r = child(DECODE_BATCH_IN_BUDGET, path, 1024, timeout=180)
    assert r["shape"] == [3, 224, 224]
    assert np.abs(np.array(r["centre"]) - [200, 10, 10]).max() <= 8  # JPEG colour noise


# --------------------------------------------------------------------------- item 3: FIFOs

SWAP_THEN_READ = r"""
from pipeline.data.catalog import discover
from pipeline.data.preprocessing import Preprocessing
root, reader = sys.argv[1], sys.argv[2]
catalog = discover(root)
victim = next(i.path for i in catalog.items if i.rel == "b.jpg")
os.unlink(victim)
os.mkfifo(victim)  # after the scan: discovery saw a regular file here
prep = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic")
try:
    if reader == "hash_file":
        from pipeline.core.hashing import hash_file
        hash_file(victim)
    elif reader == "probe_jpeg":
        from pipeline.data.gpu_decode import probe_jpeg
        probe_jpeg(victim, prep=prep)
    else:
        import pipeline.data.images as images
        fn = getattr(images, reader)
        fn(victim, prep) if reader == "load_pixels" else fn(victim)
    done(error=None)
except Exception as e:
    done(error=f"{type(e).__name__}: {e}")
"""


@pytest.mark.parametrize("reader", ["load_pixels", "open_rgb", "read_image_bytes", "probe_jpeg", "hash_file"])
def test_fifo_swapped_in_after_the_scan_is_refused_not_waited_on(tmp_path, reader):
    """Every road that opens a photo (decode, read-once, GPU probe, hashing) refuses a FIFO put in
    a photo's place after the folder scan. Before: open() waited for a writer forever."""
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(DATA / "hopper.jpg", root / name)
    r = child(SWAP_THEN_READ, root, reader, timeout=60)
    assert r["error"] is not None and "not a regular file" in r["error"], r


LOADER_WITH_FIFO = r"""
import torch
from pipeline.data.loader import make_loader
from pipeline.data.preprocessing import Preprocessing
good, fifo = sys.argv[1], sys.argv[2]
prep = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic")
(batch,) = make_loader([good, fifo], prep, device=torch.device("cpu"), batch_size=2, workers=1)
done(ok=batch.ok.tolist(), errors=batch.errors, retry=batch.retry)
"""


def test_fifo_in_a_loader_worker_is_a_retryable_failure(tmp_path):
    """In a real DataLoader worker process: the FIFO's slot fails with the reason, flagged
    retry (the file changed, its content did not fail), and the batch goes on."""
    good = tmp_path / "good.jpg"
    shutil.copy(DATA / "hopper.jpg", good)
    os.mkfifo(tmp_path / "pipe.jpg")
    r = child(LOADER_WITH_FIFO, good, tmp_path / "pipe.jpg", timeout=120)
    assert r["ok"] == [True, False]
    assert r["errors"][0] == "" and r["errors"][1].startswith("not a regular file")
    assert r["retry"] == [False, True]


EXTRACT_WITH_SWAP = r"""
import pipeline.extract as stage
from pipeline.config import ExtractConfig
root, out = sys.argv[1], sys.argv[2]
scan = stage.discover
def scan_then_swap(*args, **kwargs):
    catalog = scan(*args, **kwargs)
    victim = os.path.join(root, "bag", "b.jpg")
    os.unlink(victim)
    os.mkfifo(victim)  # after the folder scan, before hashing and decoding
    return catalog
stage.discover = scan_then_swap
s = stage.extract(ExtractConfig(images=root, out=out, backbone="tiny", progress=False, workers=0))
done(rows=s.rows, skipped=s.skipped)
"""


def test_fifo_swapped_in_during_extract_is_skipped(tmp_path):
    """The issue's case: extract holding the writer lock met a FIFO substituted after its scan
    and blocked forever. Now the file is skipped with the reason and the run finishes."""
    root = tmp_path / "images"
    (root / "bag").mkdir(parents=True)
    for name in ("a.jpg", "b.jpg"):
        shutil.copy(DATA / "hopper.jpg" if name == "a.jpg" else DATA / "hopper_gray.jpg", root / "bag" / name)
    r = child(EXTRACT_WITH_SWAP, root, tmp_path / "f.h5", timeout=180)
    assert r["rows"] == 1
    (skip,) = r["skipped"]
    assert skip[0] == "bag/b.jpg" and "not a regular file" in skip[1], skip


# --------------------------------------------------------------------------- item 1: read once


def test_read_once_refuses_bytes_that_do_not_match_the_hash(tmp_path):
    """The worker hashes the bytes it decodes: bytes other than the ones extract hashed are a
    failure with the reason, flagged retry, never pixels under the old hash."""
    path = tmp_path / "photo.jpg"
    shutil.copy(DATA / "hopper.jpg", path)
    hashed = hash_file(path)
    shutil.copy(DATA / "hopper_gray.jpg", path)  # rewritten after extract hashed it
    ds = PixelDataset([path], LITE0, expected_hashes=[hashed])
    assert ds[0][1:] == (None, CHANGED, True)
    (batch,) = make_loader([path], LITE0, device=CPU, workers=0, expected_hashes=[hashed])
    assert batch.ok.tolist() == [False] and batch.errors == [CHANGED] and batch.retry == [True]
    (batch,) = make_loader([path], LITE0, device=CPU, workers=0, expected_hashes=[hash_file(path)])
    assert batch.ok.tolist() == [True] and batch.retry == [False]
    np.testing.assert_array_equal(batch.pixels[0].numpy(), load_pixels(DATA / "hopper_gray.jpg", LITE0))
    # --decode gpu reads the bytes in the worker too (nvjpeg runs later, on these same bytes).
    gpu = PixelDataset([path], LITE0, decode="gpu", expected_hashes=[hash_file(path)])
    raw = gpu[0][1]
    assert isinstance(raw, RawJpeg) and raw.data.tobytes() == (DATA / "hopper_gray.jpg").read_bytes()
    assert PixelDataset([path], LITE0, decode="gpu", expected_hashes=[hashed])[0][1:] == (None, CHANGED, True)


def test_read_once_under_concurrent_rewrites(tmp_path):
    """A real race: a thread keeps replacing the file with photo A or photo B while the worker
    reads it with A's hash. Every success is exactly A's pixels; every failure is CHANGED."""
    a, b = tmp_path / "a.jpg", tmp_path / "b.jpg"
    shutil.copy(DATA / "hopper.jpg", a)
    shutil.copy(DATA / "hopper_gray.jpg", b)
    path = tmp_path / "photo.jpg"
    shutil.copy(a, path)
    want = load_pixels(a, LITE0)
    ds = PixelDataset([path], LITE0, expected_hashes=[hash_file(a)])
    stop = threading.Event()

    def rewrite() -> None:
        k = 0
        while not stop.is_set():
            tmp = tmp_path / f".w{k % 2}"
            shutil.copy(a if k % 2 else b, tmp)
            os.replace(tmp, path)
            k += 1

    writer = threading.Thread(target=rewrite, daemon=True)
    writer.start()
    seen = {"ok": 0, "changed": 0}
    deadline = time.monotonic() + 30
    try:
        while time.monotonic() < deadline and (seen["ok"] < 5 or seen["changed"] < 5):
            _, pixels, error, retry = ds[0]
            if pixels is None:
                assert (error, retry) == (CHANGED, True)
                seen["changed"] += 1
            else:
                np.testing.assert_array_equal(pixels, want)  # never B's pixels under A's hash
                seen["ok"] += 1
    finally:
        stop.set()
        writer.join()
    assert seen["ok"] >= 5 and seen["changed"] >= 5, seen


OPEN_COUNT = r"""
from pipeline.core.hashing import hash_file
from pipeline.data.loader import PixelDataset
from pipeline.data.preprocessing import Preprocessing
path = sys.argv[1]
expected = hash_file(path)  # extract's hashing pass, before the marker
prep = Preprocessing(256, 224, (0.5,) * 3, (0.5,) * 3, "bicubic")
ds = PixelDataset([path], prep, expected_hashes=[expected])
try:
    open("/nonexistent/READ-ONCE-MARKER")  # a syscall the trace can find: what follows is the worker
except OSError:
    pass
_, pixels, error, _ = ds[0]
done(ok=pixels is not None, error=error)
"""


@pytest.mark.must_run
def test_read_once_opens_the_file_once(tmp_path):
    """strace counts the worker's opens of the photo after a marker syscall: one, for hashing
    and decoding together (before: hash_file opened it, then the decoder again)."""
    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    path = tmp_path / "photo.jpg"
    shutil.copy(DATA / "hopper.jpg", path)
    log = tmp_path / "strace.log"
    cmd = ["strace", "-f", "-qq", "-e", "trace=open,openat", "-o", str(log)]
    try:
        r = subprocess.run(
            [*cmd, sys.executable, "-c", PRELUDE + OPEN_COUNT, str(path)],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **CHILD_ENV},
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("strace run timed out")
    if r.returncode != 0 and "ptrace" in r.stderr:
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"ok": True, "error": ""}
    trace = log.read_text().splitlines()
    start = next(i for i, line in enumerate(trace) if "READ-ONCE-MARKER" in line)
    opens = [line for line in trace[start:] if str(path) in line and ("open(" in line or "openat(" in line)]
    assert len(opens) == 1, opens


# --------------------------------------------------------------------------- item 14: 16-bit


def _png16(path: Path, side: int) -> None:
    """A 16-bit greyscale PNG, written row by row (no side^2 array in the test process): each
    row is the values 0, 5, 10, ... (mod 65,536), so the 8-bit scaling can be checked exactly.
    Rows after the first use PNG's "Up" filter (all zeros): the file stays a few hundred KB."""
    row = (np.arange(side, dtype=np.uint32) * 5 % 65536).astype(">u2").tobytes()
    z = zlib.compressobj(6)
    same = b"\2" + bytes(len(row))
    body = z.compress(b"\0" + row) + b"".join(z.compress(same) for _ in range(side - 1)) + z.flush()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)  # 16-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


OPEN_16BIT = r"""
import numpy as np
from pipeline.data.images import open_rgb
limit_memory(int(sys.argv[2]))
img = open_rgb(sys.argv[1])
row = np.asarray(img.crop((0, 0, img.width, 1)))[0]
done(size=list(img.size), mode=img.mode, red=row[:, 0].tolist(), grey=bool((row[:, 0] == row[:, 2]).all()))
"""


def test_16bit_png_decodes_without_a_blow_up(tmp_path):
    """A 16-bit 12000 x 12000 PNG (a few hundred KB on disk; 288 MB decoded) cost 4.5 GB RSS
    through int64; now it fits 1.5 GB beyond the imports (I;16 + L + RGB: 7 bytes a pixel),
    with the same floor(v * 255 / 65535) scaling."""
    path = tmp_path / "huge16.png"
    _png16(path, 12_000)
    assert path.stat().st_size < 1_000_000
    r = child(OPEN_16BIT, path, 1536, timeout=300)
    assert r["size"] == [12_000, 12_000] and r["mode"] == "RGB" and r["grey"]
    v = np.arange(12_000) * 5 % 65536
    assert r["red"] == (v * 255 // 65535).tolist()
