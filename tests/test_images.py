"""Defensive decoding and discovery on real odd files (tests/data/images, see its README)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ExtractConfig
from pipeline.data.catalog import discover
from pipeline.data.images import DecodeError, load_pixels, open_rgb
from pipeline.errors import InputError
from pipeline.extract import extract
from pipeline.models.backbones import get_spec

DATA = Path(__file__).parent / "data" / "images"


def _rgb(path: Path | str) -> np.ndarray:
    return np.asarray(open_rgb(path), dtype=np.float64)


def test_baseline_jpeg():
    img = open_rgb(DATA / "hopper.jpg")
    assert img.mode == "RGB" and img.size == (128, 128)


def test_exif_orientation_is_applied():
    # The file stores hopper's pixels rotated and says so in EXIF; upright, they match hopper.jpg.
    stored = np.asarray(Image.open(DATA / "hopper_orientation_6.jpg").convert("RGB"), dtype=np.float64)
    upright = _rgb(DATA / "hopper_orientation_6.jpg")
    ref = _rgb(DATA / "hopper.jpg")
    assert np.abs(upright - ref).mean() < 8  # JPEG re-encoding noise only
    assert np.abs(stored - ref).mean() > 3 * np.abs(upright - ref).mean()
    # Orientation 8 on a 2x1 image: width and height swap.
    assert Image.open(DATA / "orientation_rectangle.jpg").size == (2, 1)
    assert open_rgb(DATA / "orientation_rectangle.jpg").size == (1, 2)


def test_cmyk_jpeg_becomes_rgb_like_its_rgb_twin():
    cmyk, rgb = _rgb(DATA / "pil_sample_cmyk.jpg"), _rgb(DATA / "pil_sample_rgb.jpg")
    assert Image.open(DATA / "pil_sample_cmyk.jpg").mode == "CMYK"
    assert cmyk.shape == rgb.shape and np.abs(cmyk - rgb).mean() < 6


def test_greyscale_and_palette():
    grey = _rgb(DATA / "hopper_gray.jpg")
    assert grey.shape == (128, 128, 3) and np.array_equal(grey[..., 0], grey[..., 1])
    pal = _rgb(DATA / "hopper.gif")
    assert Image.open(DATA / "hopper.gif").mode == "P"
    assert np.abs(pal - _rgb(DATA / "hopper.jpg")).mean() < 12


def test_alpha_cut_out_is_composited_on_white():
    src = Image.open(DATA / "transparent.png")
    assert src.mode == "RGBA"
    alpha = np.asarray(src)[..., 3]
    out = _rgb(DATA / "transparent.png")
    clear = alpha == 0
    assert clear.any() and (out[clear] == 255).all()  # transparent -> white, not black
    opaque = alpha == 255
    np.testing.assert_array_equal(out[opaque], np.asarray(src)[..., :3][opaque])
    # Palette transparency too.
    p = Image.open(DATA / "p_trns_single.png")
    assert p.mode == "P" and "transparency" in p.info
    idx = np.asarray(p) == p.info["transparency"]
    assert idx.any() and (_rgb(DATA / "p_trns_single.png")[idx] == 255).all()


def test_16bit_png_is_scaled_not_clipped():
    raw = np.asarray(Image.open(DATA / "flower_16bit.png"), dtype=np.float64)
    assert Image.open(DATA / "flower_16bit.png").mode == "I;16" and raw.max() > 255
    out = _rgb(DATA / "flower_16bit.png")[..., 0]
    assert out.max() < 255  # clipping would make most of this photo pure white
    np.testing.assert_allclose(out, np.floor(raw * 255 / 65535), atol=1)


@pytest.mark.parametrize("name", ["dispose_bgnd.gif", "animated.webp"])
def test_animation_uses_first_frame(name):
    src = Image.open(DATA / name)
    assert src.n_frames > 1
    first = np.asarray(src.convert("RGB"), dtype=np.float64)
    src.seek(src.n_frames - 1)
    last = np.asarray(src.convert("RGB"), dtype=np.float64)
    out = _rgb(DATA / name)
    np.testing.assert_array_equal(out, first)
    if name.endswith(".gif"):
        assert np.abs(first - last).mean() > 5  # the frames really differ


def test_decompression_bomb_refused_before_decoding():
    with pytest.raises(DecodeError, match=r"decompression bomb refused.*--max-pixels"):
        open_rgb(DATA / "decompression_bomb.gif")
    with pytest.raises(DecodeError, match=r"above the limit of 1,000.*--max-pixels"):
        open_rgb(DATA / "hopper.jpg", max_pixels=1000)


def test_corrupt_inputs(tmp_path):
    with pytest.raises(DecodeError, match="truncated"):
        open_rgb(DATA / "truncated_jpeg.jpg")
    half = tmp_path / "half.jpg"
    half.write_bytes((DATA / "hopper.jpg").read_bytes()[:3000])
    with pytest.raises(DecodeError, match="truncated"):
        open_rgb(half)
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not a photo\n")
    for name in ("empty.jpg", "text.jpg"):
        with pytest.raises(DecodeError, match="not an image"):
            open_rgb(tmp_path / name)


def test_draft_keeps_the_resize_target():
    prep = get_spec("efficientnet_lite0").preprocessing
    big = DATA / "flower_q85_420.jpg"  # 2268x1512 4:2:0 JPEG of a real photo (vendored)
    img = open_rgb(big, draft_to=prep.resize)
    assert min(img.size) >= prep.resize and min(img.size) < 1512  # downscaled in the DCT, not below 256
    assert load_pixels(big, prep).shape == (3, 224, 224)


# --------------------------------------------------------------------------- a folder of them


@pytest.fixture
def odd_catalog(tmp_path: Path) -> Path:
    """Every odd file in class folders, plus the failures the tests make themselves."""
    root = tmp_path / "catalog"
    good = {
        "口红": ["hopper.jpg", "hopper_gray.jpg", "hopper_orientation_6.jpg"],
        "眼影": ["pil_sample_cmyk.jpg", "hopper.gif", "transparent.png", "p_trns_single.png"],
        "香水": ["flower_16bit.png", "dispose_bgnd.gif", "animated.webp", "orientation_rectangle.jpg"],
    }
    for cls, names in good.items():
        (root / cls).mkdir(parents=True)
        for n in names:
            shutil.copy(DATA / n, root / cls / n)
    shutil.copy(DATA / "pil_sample_rgb.jpg", root / "口红" / "唇膏.jpg")
    shutil.copy(DATA / "truncated_jpeg.jpg", root / "口红" / "truncated.jpg")
    shutil.copy(DATA / "decompression_bomb.gif", root / "眼影" / "bomb.gif")
    (root / "香水" / "empty.jpg").write_bytes(b"")
    (root / "香水" / "readme.jpg").write_text("this is a text file\n")
    (root / "香水" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    os.mkfifo(root / "香水" / "pipe.jpg")
    (root / "香水" / ".hidden.jpg").write_bytes(b"ignored")
    return root


EXPECTED_SKIPS = {
    "口红/truncated.jpg": "truncated",
    "眼影/bomb.gif": "decompression bomb",
    "香水/empty.jpg": "not an image",
    "香水/readme.jpg": "not an image",
    "香水/gone.jpg": "broken symlink",
    "香水/pipe.jpg": "not a regular file",
}


def test_bad_files_are_recorded_never_fatal(odd_catalog, tmp_path):
    out = tmp_path / "f.h5"
    s = extract(ExtractConfig(images=str(odd_catalog), out=str(out), backbone="tiny", progress=False, workers=0))
    assert s.class_names == ["口红", "眼影", "香水"]
    reasons = dict(s.skipped)
    assert set(reasons) == set(EXPECTED_SKIPS), reasons
    for path, why in EXPECTED_SKIPS.items():
        assert why in reasons[path], (path, reasons[path])
    assert s.rows == 12  # 11 odd files + 唇膏.jpg
    from pipeline.cache.store import Cache

    with Cache(out) as c:
        assert "口红/唇膏.jpg" in c.paths and dict(c.skipped) == reasons
        assert np.isfinite(c.features()).all()


def test_strict_turns_skips_into_an_error(odd_catalog, tmp_path, run_cli):
    args = ["extract", odd_catalog, "--out", tmp_path / "f.h5", "--backbone", "tiny", "--workers", "0"]
    r = run_cli(*args, "--no-progress", "--strict")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "Error: 6 file(s) skipped and --strict is set" in r.output
    for p in EXPECTED_SKIPS:
        (odd_catalog / p).unlink()
    r = run_cli(*args, "--no-progress", "--strict")
    assert r.exit_code == 0, r.output


def _drop_file_capabilities() -> None:
    """In the child before exec: remove CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the
    bounding set, so even root is refused a chmod-000 file after exec."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@pytest.mark.must_run
def test_unreadable_file(tmp_path):
    """chmod 000. Root reads any file whatever its mode bits (the tests run as root here), so
    the honest check runs the real extractor in a child process without the two capabilities
    that let root do that."""
    root = tmp_path / "photos"
    root.mkdir()
    shutil.copy(DATA / "hopper.jpg", root / "ok.jpg")
    shutil.copy(DATA / "hopper_gray.jpg", root / "locked.jpg")
    os.chmod(root / "locked.jpg", 0)
    out = tmp_path / "f.h5"
    if os.geteuid() != 0:
        s = extract(ExtractConfig(images=str(root), out=str(out), backbone="tiny", progress=False, workers=0))
        assert s.skipped == [("locked.jpg", "permission denied")] and s.rows == 1
        return
    assert {i.rel for i in discover(root).items} == {"ok.jpg", "locked.jpg"}  # root passes access()
    cmd = [sys.executable, "-m", "pipeline", "extract", str(root), "--out", str(out)]
    cmd += ["--backbone", "tiny", "--workers", "0", "--no-progress"]
    try:
        r = subprocess.run(
            cmd, capture_output=True, text=True, preexec_fn=_drop_file_capabilities, timeout=120, check=False
        )
    except subprocess.SubprocessError as e:
        pytest.skip(f"cannot drop capabilities in this container: {e}")
    assert r.returncode == 0, r.stderr
    assert "skipped locked.jpg: permission denied" in r.stderr
    from pipeline.cache.store import Cache

    with Cache(out) as c:
        assert c.paths == ["ok.jpg"] and c.skipped == [("locked.jpg", "permission denied")]


def test_manifest_and_unlabelled_inputs(tmp_path):
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    shutil.copy(DATA / "hopper.jpg", photos / "a.jpg")
    shutil.copy(DATA / "pil_sample_rgb.jpg", photos / "sub" / "b.jpg")
    shutil.copy(DATA / "hopper_gray.jpg", photos / "c.jpg")
    manifest = tmp_path / "list.csv"
    manifest.write_text(
        "path,label\nphotos/a.jpg,口红\nphotos/sub/b.jpg,\nphotos/c.jpg,香水\nphotos/missing.jpg,口红\n",
        encoding="utf-8",
    )
    cat = discover(manifest)
    assert cat.layout == "manifest"
    assert [(i.rel, i.label) for i in cat.items] == [
        ("photos/a.jpg", "口红"),
        ("photos/sub/b.jpg", None),
        ("photos/c.jpg", "香水"),
    ]
    assert [(s.rel, s.reason) for s in cat.skipped] == [("photos/missing.jpg", "file not found")]
    s = extract(ExtractConfig(images=str(manifest), out=str(tmp_path / "m.h5"), backbone="tiny", progress=False))
    assert s.rows == 3 and s.class_names == ["口红", "香水"]
    from pipeline.cache.store import Cache

    with Cache(tmp_path / "m.h5") as c:
        assert dict(zip(c.paths, c.labels.tolist(), strict=True)) == {
            "photos/a.jpg": 0,
            "photos/sub/b.jpg": -1,
            "photos/c.jpg": 1,
        }
    # A folder of images with no class folders: unlabelled.
    flat = tmp_path / "flat"
    flat.mkdir()
    for n in ("a.jpg", "c.jpg"):
        shutil.copy(photos / n, flat / n)
    assert discover(flat).layout == "unlabelled"
    s = extract(ExtractConfig(images=str(flat), out=str(tmp_path / "u.h5"), backbone="tiny", progress=False))
    assert s.rows == 2 and s.class_names == []
    with Cache(tmp_path / "u.h5") as c:
        assert c.labels.tolist() == [-1, -1]
    bad = tmp_path / "bad.csv"
    bad.write_text("file,category\na.jpg,x\n")
    with pytest.raises(InputError, match="needs a header row with a 'path' column"):
        discover(bad)
