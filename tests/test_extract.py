"""Incremental extraction, and the GPU decode path's logic (the nvjpeg call itself is `gpu`)."""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.cache.store import Cache
from pipeline.config import ExtractConfig
from pipeline.data import SAMPLE_CATALOG
from pipeline.data.gpu_decode import decode_batch, probe_jpeg
from pipeline.data.images import load_pixels
from pipeline.errors import InputError
from pipeline.extract import extract
from pipeline.models.backbones import get_spec, with_preprocessing

DATA = Path(__file__).parent / "data" / "images"


def _cfg(images: Path, out: Path, **kw) -> ExtractConfig:
    base = dict(backbone="tiny", precision="fp32", workers=0, progress=False)
    base.update(kw)
    return ExtractConfig(images=str(images), out=str(out), **base)


def _rows(out: Path) -> dict[str, tuple[str, str | None, np.ndarray]]:
    """content hash -> (path, label name, features)."""
    with Cache(out) as c:
        names, feats = c.class_names, c.features()
        return {
            h: (p, names[lab] if lab >= 0 else None, feats[i])
            for i, (h, p, lab) in enumerate(zip(c.content_hash, c.paths, c.labels, strict=True))
        }


@pytest.fixture
def catalog(tmp_path: Path) -> Path:
    root = tmp_path / "images"
    for cls in ("bag", "sneaker", "trouser"):
        (root / cls).mkdir(parents=True)
        for p in sorted((SAMPLE_CATALOG / "train" / cls).glob("*.png"))[:10]:
            shutil.copy(p, root / cls / p.name)
    return root


def test_incremental_behaviour(catalog, tmp_path):
    out = tmp_path / "f.h5"
    first = extract(_cfg(catalog, out))
    assert (first.rows, first.extracted, first.reused) == (30, 30, 0)
    before = _rows(out)

    # Grown folder: only the new files run through the backbone.
    new = sorted((SAMPLE_CATALOG / "test" / "bag").glob("*.png"))[:4]
    for p in new:
        shutil.copy(p, catalog / "bag" / p.name)
    s = extract(_cfg(catalog, out))
    assert (s.rows, s.extracted, s.reused) == (34, 4, 30)
    after = _rows(out)
    for h, (p, label, f) in before.items():  # old rows untouched
        assert after[h][:2] == (p, label)
        np.testing.assert_array_equal(after[h][2], f)

    # Rename and move to another class: features reused, path and label refreshed.
    moved = sorted((catalog / "bag").glob("*.png"))[0]
    h_moved = next(h for h, (p, _, _) in after.items() if p == f"bag/{moved.name}")
    moved.rename(catalog / "sneaker" / "renamed.png")
    # Delete one, and add an identical copy of another under a new name.
    gone = sorted((catalog / "trouser").glob("*.png"))[0]
    h_gone = next(h for h, (p, _, _) in after.items() if p == f"trouser/{gone.name}")
    gone.unlink()
    twin = sorted((catalog / "trouser").glob("*.png"))[0]
    shutil.copy(twin, catalog / "trouser" / "zz-twin.png")
    s = extract(_cfg(catalog, out))
    assert (s.rows, s.extracted, s.reused) == (33, 0, 33)
    final = _rows(out)
    assert final[h_moved][:2] == ("sneaker/renamed.png", "sneaker")
    np.testing.assert_array_equal(final[h_moved][2], after[h_moved][2])
    assert h_gone not in final
    with Cache(out) as c:
        assert c.duplicates == [("trouser/zz-twin.png", next(h for h, v in final.items() if v[0].endswith(twin.name)))]
        assert len(set(c.content_hash)) == c.n_rows == 33


def test_identical_files_are_decoded_once(catalog, tmp_path):
    for cls in ("bag", "sneaker"):
        src = sorted((catalog / cls).glob("*.png"))[0]
        for k in range(3):
            shutil.copy(src, catalog / cls / f"copy{k}.png")
    # The same bytes under two categories: kept once, unlabelled, and reported.
    shared = sorted((catalog / "trouser").glob("*.png"))[1]
    shutil.copy(shared, catalog / "bag" / "which-one.png")
    s = extract(_cfg(catalog, tmp_path / "f.h5"))
    assert s.rows == 30 and s.extracted == 30  # 37 files, 30 distinct contents
    with Cache(tmp_path / "f.h5") as c:
        assert len(c.duplicates) == 7
        row = c.content_hash.index(next(h for p, h in c.duplicates if p.endswith(shared.name)))
        assert c.labels[row] == -1
    assert any("identical bytes filed under 2 labels (bag, trouser)" in r for _, r in s.skipped)


def test_unindexed_segments_are_adopted_and_foreign_ones_dropped(catalog, tmp_path):
    """What a killed run leaves (finished segments, no index) is picked up only if its
    fingerprint matches; the kill itself is tested with real subprocesses in test_cache.py."""
    from pipeline.cache.segments import write_segment
    from pipeline.cache.store import segment_dir
    from pipeline.models.backbones import load_backbone

    extract(_cfg(catalog, tmp_path / "ref.h5"))
    with Cache(tmp_path / "ref.h5") as c:
        hashes, feats = c.content_hash, c.features(dtype=np.float16)
    fp = load_backbone("tiny").fingerprint("fp32")
    out = tmp_path / "f.h5"
    write_segment(out, fp, hashes[:12], feats[:12])
    s = extract(_cfg(catalog, out))
    assert (s.extracted, s.reused) == (18, 12)
    with Cache(out) as c:
        assert {p.name for p in segment_dir(out).glob("seg-*.h5")} == set(c.segments)
    # Segments left by another configuration are discarded, never mixed in.
    out2 = tmp_path / "g.h5"
    write_segment(out2, dataclasses.replace(fp, precision="bf16"), hashes[:12], feats[:12])
    s = extract(_cfg(catalog, out2))
    assert (s.extracted, s.reused) == (30, 0)
    with Cache(out2) as c:
        assert {p.name for p in segment_dir(out2).glob("seg-*.h5")} == set(c.segments)


# --------------------------------------------------------------------------- --decode gpu


def test_decode_gpu_without_a_gpu_is_a_clear_error(catalog, tmp_path, run_cli):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = run_cli("extract", catalog, "--out", tmp_path / "f.h5", "--backbone", "tiny", "--decode", "gpu")
    assert r.exit_code == 1
    assert "Error: --decode gpu needs a CUDA GPU" in r.output and "use --decode cpu" in r.output
    with pytest.raises(InputError, match="CUDA GPU"):
        extract(_cfg(catalog, tmp_path / "f.h5", device="cpu", decode="gpu"))


def test_gpu_decode_logic_matches_the_cpu_path_on_cpu():
    """The GPU path's geometry (EXIF orientation, resize, crop, letterbox) run on the CPU
    device: the same code as on CUDA except where nvjpeg decodes."""
    prep = with_preprocessing(get_spec("efficientnet_lite0"), draft=False).preprocessing
    names = ["hopper.jpg", "hopper_orientation_6.jpg", "hopper_gray.jpg", "orientation_rectangle.jpg"]
    raws = [probe_jpeg(DATA / n) for n in names]
    assert all(r is not None for r in raws) and raws[1].orientation == 6  # type: ignore[union-attr]
    # Not for nvjpeg: CMYK, PNG, a bomb, a truncated file -> the CPU path handles them.
    for n in ("pil_sample_cmyk.jpg", "transparent.png", "decompression_bomb.gif"):
        assert probe_jpeg(DATA / n) is None
    got = decode_batch(raws, prep, torch.device("cpu"))  # type: ignore[arg-type]
    for n, g in zip(names, got, strict=True):
        assert isinstance(g, torch.Tensor) and g.dtype == torch.uint8 and g.shape == (3, 224, 224)
        want = load_pixels(DATA / n, prep).astype(np.float64)
        assert np.abs(g.numpy() - want).mean() < 1.0, n  # antialiased bicubic: torch vs PIL
    lb = with_preprocessing(get_spec("efficientnet_lite0"), draft=False, letterbox=True).preprocessing
    # squash (HF ViT/SigLIP processors, timm crop_mode='squash'): to 240 x 240 whatever the shape, crop 224
    sq = with_preprocessing(get_spec("efficientnet_lite0"), draft=False, squash=True, resize=240).preprocessing
    for p, name in ((lb, "pil_sample_rgb.jpg"), (sq, "flower_q85_420.jpg")):  # the flower is 3:2
        g = decode_batch([probe_jpeg(DATA / name)], p, torch.device("cpu"))[0]  # type: ignore[list-item]
        assert isinstance(g, torch.Tensor) and g.shape == (3, 224, 224)
        want = load_pixels(DATA / name, p).astype(np.float64)
        assert np.abs(g.numpy() - want).mean() < 1.0
    cropped = load_pixels(DATA / "flower_q85_420.jpg", prep).astype(np.float64)
    assert np.abs(load_pixels(DATA / "flower_q85_420.jpg", sq) - cropped).mean() > 10  # another geometry


def test_gpu_decode_falls_back_per_file(tmp_path):
    """A file nvjpeg (here: the CPU decoder) refuses does not fail its batch: it goes to PIL,
    and one PIL refuses too becomes that file's error."""
    prep = get_spec("tiny").preprocessing
    good = probe_jpeg(DATA / "hopper.jpg")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes((DATA / "hopper.jpg").read_bytes()[:2500])
    broken = probe_jpeg(cut)
    assert good is not None and broken is not None  # the header parses; the pixels do not
    out = decode_batch([good, broken, good], prep, torch.device("cpu"))
    assert isinstance(out[0], torch.Tensor) and isinstance(out[2], torch.Tensor)
    assert isinstance(out[1], str) and "truncated" in out[1]


@pytest.mark.gpu
def test_decode_gpu_end_to_end(tmp_path):
    device = os.environ.get("HEADSTART_TEST_DEVICE", "cuda")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    root = tmp_path / "images" / "photos"
    root.mkdir(parents=True)
    for n in ("hopper.jpg", "hopper_orientation_6.jpg", "pil_sample_cmyk.jpg", "transparent.png", "truncated_jpeg.jpg"):
        shutil.copy(DATA / n, root / n)
    kw = dict(backbone="efficientnet_lite0", device=device, precision="fp32", draft=False, workers=2)
    gpu = extract(_cfg(root.parent, tmp_path / "gpu.h5", decode="gpu", **kw))
    cpu = extract(_cfg(root.parent, tmp_path / "cpu.h5", decode="cpu", **kw))
    assert gpu.rows == cpu.rows == 4 and [p for p, _ in gpu.skipped] == ["photos/truncated_jpeg.jpg"]
    a, b = _rows(tmp_path / "gpu.h5"), _rows(tmp_path / "cpu.h5")
    for h in a:
        fa, fb = a[h][2], b[h][2]
        cos = float(fa @ fb / np.linalg.norm(fa) / np.linalg.norm(fb))
        assert cos > 0.98, (a[h][0], cos)
