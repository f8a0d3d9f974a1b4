"""A photo rewritten while extract runs (issue 18, item 1): the bytes decoded are the bytes
hashed, so new bytes are never stored under the old key; the file is reported, not remembered,
and the next run extracts its new content."""

from __future__ import annotations

import shutil

import numpy as np
from conftest import copy_sample_photos

import pipeline.data.loader as loader_mod
from pipeline.cache.store import Cache
from pipeline.config import ExtractConfig
from pipeline.core.hashing import hash_file
from pipeline.data.loader import CHANGED
from pipeline.extract import extract


def _cfg(images, out) -> ExtractConfig:
    return ExtractConfig(images=str(images), out=str(out), backbone="tiny", precision="fp32", workers=0,
                         progress=False)  # fmt: skip


def test_a_photo_rewritten_between_hashing_and_decoding_is_not_stored_under_its_old_key(tmp_path, monkeypatch):
    images = copy_sample_photos(tmp_path / "images")
    victim = sorted((images / "bag").glob("*.png"))[0]
    other = sorted((images / "bag").glob("*.png"))[1]
    old_key = hash_file(victim)
    real = loader_mod.read_image_bytes

    def rewritten_meanwhile(path, **kw):
        if str(path) == str(victim) and not getattr(rewritten_meanwhile, "done", False):
            rewritten_meanwhile.done = True  # type: ignore[attr-defined]
            shutil.copy(other, victim)  # another photo's bytes, after the scan hashed the old ones
        return real(path, **kw)

    monkeypatch.setattr(loader_mod, "read_image_bytes", rewritten_meanwhile)
    out = tmp_path / "f.h5"
    s = extract(_cfg(images, out))
    assert (victim.relative_to(images).as_posix(), CHANGED) in s.skipped
    with Cache(out) as c:
        assert old_key not in c.content_hash and c.rejected == {}  # not remembered either
        assert s.rows == c.n_rows == 17

    s = extract(_cfg(images, out))  # the next run sees the new bytes: a copy of `other`
    assert not s.skipped and s.rows == 17  # identical to `other`: one row for the two files
    with Cache(out) as c:
        names = {victim.relative_to(images).as_posix(), other.relative_to(images).as_posix()}
        row = c.content_hash.index(hash_file(other))
        assert {c.paths[row], *(p for p, h in c.duplicates if h == hash_file(other))} == names

    reference = tmp_path / "ref.h5"
    extract(_cfg(images, reference))
    with Cache(out) as a, Cache(reference) as b:
        assert sorted(a.content_hash) == sorted(b.content_hash)
        fa = dict(zip(a.content_hash, a.features(), strict=True))
        fb = dict(zip(b.content_hash, b.features(), strict=True))
        assert all(np.array_equal(fa[h], fb[h]) for h in fb)
