"""headstart similar: nearest catalog photos by cosine similarity of cached features."""

from __future__ import annotations

import json

import numpy as np

from pipeline.cache.store import Cache
from pipeline.config import ExtractConfig
from pipeline.extract import extract
from pipeline.similar import similar


def test_similar_finds_the_photo_itself_and_ranks_by_cosine(small_catalog, tmp_path, run_cli):
    cache = tmp_path / "f.h5"
    extract(ExtractConfig(images=str(small_catalog), out=str(cache), backbone="tiny", workers=0, progress=False))
    query = sorted((small_catalog / "sneaker").glob("*.png"))[2]
    # A copy under another name and format: not in the cache by hash, so it is embedded afresh.
    copy = tmp_path / "query.bmp"
    from PIL import Image

    Image.open(query).save(copy)
    for q in (query, copy):
        matches = similar(q, cache, k=5, device="cpu")
        assert len(matches) == 5
        # Measured (fp32 / bf16 cache): the photo itself at 1.00000 / 0.99999 (re-embedded copy alike,
        # |d| <= 1e-5), the next at 0.9895 / 0.9894: 0.999 is 100 x that noise from either side.
        assert matches[0].path == f"sneaker/{query.name}" and matches[0].similarity > 0.999
        sims = [m.similarity for m in matches]
        assert sims == sorted(sims, reverse=True)
    # Brute force over the whole cache agrees. Measured: neighbouring top-6 similarities differ by
    # >= 8.7e-4 / 6.0e-4 (fp32 / bf16), the re-embedded query moves them by <= 1e-5: no swap possible.
    with Cache(cache) as c:
        X = c.features()
        row = c.paths.index(f"sneaker/{query.name}")
    f = X / np.linalg.norm(X, axis=1, keepdims=True)
    expected = np.argsort(-(f @ f[row]), kind="stable")[:5]
    with Cache(cache) as c:
        assert [m.path for m in matches] == [c.paths[i] for i in expected]

    r = run_cli("similar", query, "--cache", cache, "-k", "3", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert [m["rank"] for m in out] == [1, 2, 3] and out[0]["label"] == "sneaker"
    r = run_cli("similar", query, "--cache", cache, "-k", "2")
    assert r.exit_code == 0 and f"sneaker/{query.name}  (sneaker)" in r.output.splitlines()[0]


def test_similar_errors(run_cli, tmp_path):
    r = run_cli("similar", tmp_path / "nope.jpg", "--cache", tmp_path / "f.h5")
    assert r.exit_code == 1 and "Error:" in r.output
