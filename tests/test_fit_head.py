"""fit-head as a whole: the head-kind registry, the resolved device reaching every fit, and the
head directory written atomically (a failed refit leaves the working head whole)."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import joblib
import numpy as np
import pytest
import torch
from conftest import copy_sample_photos
from sklearn.datasets import load_digits

import pipeline.fit_head.stage as fit_head_module
from pipeline.artifacts.head_dir import load_head_estimator, read_head
from pipeline.config import ExtractConfig, FitHeadConfig
from pipeline.core.hashing import sha256_file
from pipeline.errors import InputError
from pipeline.extract import extract
from pipeline.fit_head import fit_head
from pipeline.models.heads import HEAD_BUILDERS, MLPHead, build_head
from pipeline.probe.estimators import LogisticHead, MLPProbe, NearestCentroidHead
from pipeline.probe.kinds import HEAD_KINDS, KINDS


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fit_head")
    images = copy_sample_photos(root / "images")
    extract(ExtractConfig(images=str(images), out=str(root / "f.h5"), backbone="tiny", workers=0, progress=False))
    return root / "f.h5"


def _cfg(cache: Path, out: Path, **kw) -> FitHeadConfig:
    # Random tiny features are all "near duplicates": keep the split plain.
    return FitHeadConfig(cache=str(cache), out=str(out), near_duplicate_threshold=None, hidden=16, **kw)


# --------------------------------------------------------------------------- the registry


def test_every_kind_exports_as_a_torch_module_that_computes_its_probabilities():
    """One entry per kind: its estimator's tensors build the torch module it names."""
    X, y = load_digits(return_X_y=True)
    X, y = X[:300], y[:300]
    opts = FitHeadConfig(cache="unused", hidden=16, max_iter=200)
    for name, kind in KINDS.items():
        assert kind.torch_kind in HEAD_BUILDERS, name
        est = kind.estimator(opts, C=0.1, solver="sklearn", device="cpu")
        if kind.needs_text:  # zero-shot: one class embedding per digit (the stage's text tower)
            est.set_params(text_embeddings=np.random.default_rng(0).normal(size=(10, 64)), logit_scale=30.0)
        est = est.fit(X, y)
        est.temperature_ = 1.7
        tensors = {k: torch.from_numpy(v) for k, v in est.torch_state().items()}
        module = build_head(kind.torch_kind, tensors).eval()
        with torch.no_grad():
            p = module(torch.from_numpy(X.astype(np.float32))).softmax(1).numpy()
        np.testing.assert_allclose(p, est.predict_proba(X), atol=1e-5, err_msg=name)
    assert HEAD_KINDS == ("logreg", "mlp", "centroid", "zeroshot")
    assert not issubclass(MLPProbe, torch.nn.Module) and issubclass(MLPHead, torch.nn.Module)


def test_the_cli_offers_the_registry_kinds():
    from pipeline.cli import cli

    param = next(p for p in cli.commands["fit-head"].params if p.name == "head")
    assert tuple(param.type.choices) == HEAD_KINDS


def test_unknown_kind_is_an_input_error(cache, tmp_path):
    with pytest.raises(InputError, match="available: logreg, mlp, centroid, zeroshot"):
        fit_head(_cfg(cache, tmp_path / "h", head="svm"))


def test_release_010_mlp_pickles_name_the_estimator_mlphead(cache, tmp_path):
    """0.1.0 pickled ``pipeline.heads.MLPHead``; it loads as today's MLPProbe."""
    head = fit_head(_cfg(cache, tmp_path / "h", head="mlp")).path
    est = load_head_estimator(head)
    # Pickle it under the name 0.1.0 gave the class (protocol 2 names classes as plain text).
    data = pickle.dumps(est, protocol=2)
    assert data.count(b"cpipeline.probe.estimators\nMLPProbe\n") == 1
    (head / "head.joblib").write_bytes(data.replace(b"pipeline.probe.estimators\nMLPProbe", b"pipeline.heads\nMLPHead"))
    meta = json.loads((head / "head.json").read_text())
    meta["files"]["head.joblib"] = sha256_file(head / "head.joblib")
    (head / "head.json").write_text(json.dumps(meta))
    loaded = load_head_estimator(head)
    assert type(loaded) is MLPProbe and "pipeline.heads" not in sys.modules
    X = np.random.default_rng(0).normal(size=(4, est.n_features_in_)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict_proba(X), est.predict_proba(X))


# --------------------------------------------------------------------------- device


def _record_fits(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str | None, str | None]]:
    """Record (estimator, solver, device) of every fit, and run the fit itself on the CPU."""
    calls: list[tuple[str, str | None, str | None]] = []
    for cls in (LogisticHead, MLPProbe, NearestCentroidHead):

        def fit(self, X, y, _original=cls.fit):
            asked = getattr(self, "device", None)
            calls.append((type(self).__name__, getattr(self, "solver", None), asked))
            if asked is None:
                return _original(self, X, y)
            self.device = "cpu"  # no GPU needed: what matters is what fit-head asked for
            try:
                return _original(self, X, y)
            finally:
                self.device = asked

        monkeypatch.setattr(cls, "fit", fit)
    return calls


@pytest.mark.parametrize(
    ("head", "resolved", "kw", "expected"),
    [
        ("logreg", ("torch", "cuda"), {}, ("LogisticHead", "torch", "cuda")),  # sweep, probe, refit
        ("logreg", ("torch", "cuda"), {"c": 0.1}, ("LogisticHead", "torch", "cuda")),
        ("mlp", ("torch", "cuda"), {}, ("MLPProbe", None, "cuda")),
        ("logreg", ("sklearn", "cpu"), {"max_memory_gb": 1e-9}, ("LogisticHead", "torch", "cpu")),  # streamed
    ],
)
def test_every_fit_gets_the_resolved_solver_and_device(cache, tmp_path, monkeypatch, head, resolved, kw, expected):
    """``--device cuda`` used to reach only the C sweep: the validation probe and the final
    refit ran in float64 on the CPU. Now every fit is made with what --device resolved to."""
    monkeypatch.setattr(fit_head_module, "resolve_solver", lambda device: resolved)
    calls = _record_fits(monkeypatch)
    s = fit_head(_cfg(cache, tmp_path / "h", head=head, **kw))
    meta = json.loads((s.path / "head.json").read_text())
    assert calls == [expected] * (len(meta["c_sweep"]) + 2)  # the sweep's fits, the probe, the refit
    assert (len(meta["c_sweep"]) > 0) == (head == "logreg" and "c" not in kw)
    if expected[1] is not None:
        assert meta["solver"] == expected[1]


# --------------------------------------------------------------------------- atomic head directory


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_a_failed_refit_leaves_the_working_head_whole(cache, tmp_path, monkeypatch):
    out = tmp_path / "head"
    fit_head(_cfg(cache, out, c=0.1))
    before = _files(out)
    assert set(before) == {"head.joblib", "head.npz", "head.json", "split.json", "config.json"}

    def dies(*a, **kw):  # the last file of the new head: everything else is written by now
        raise KeyboardInterrupt

    monkeypatch.setattr(fit_head_module, "save_resolved", dies)
    with pytest.raises(KeyboardInterrupt):
        fit_head(_cfg(cache, out, c=1.0, seed=3))
    assert _files(out) == before
    assert read_head(out)[0]["C"] == 0.1
    assert [p.name for p in tmp_path.iterdir()] == ["head"]  # no staging directory left behind


def test_a_refit_replaces_the_head_and_keeps_other_files(cache, tmp_path):
    out = tmp_path / "head"
    fit_head(_cfg(cache, out, c=0.1))
    (out / "notes.txt").write_text("ours")
    joblib_before = (out / "head.joblib").read_bytes()
    fit_head(_cfg(cache, out, c=1.0))
    assert read_head(out)[0]["C"] == 1.0 and (out / "head.joblib").read_bytes() != joblib_before
    assert (out / "notes.txt").read_text() == "ours"
    assert [p.name for p in tmp_path.iterdir()] == ["head"]
    with np.load(out / "head.npz", allow_pickle=False) as z:
        assert str(z["kind"]) == "linear" and sorted(z.files) == ["bias", "kind", "weight"]
    assert joblib.load(out / "head.joblib").C == 1.0
    (tmp_path / "plain").mkdir()  # the head directory has the permissions any new folder gets (not 0700)
    assert out.stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_a_folder_that_is_not_a_head_is_not_replaced(cache, tmp_path):
    out = tmp_path / "photos"
    out.mkdir()
    (out / "mine.jpg").write_bytes(b"x")
    with pytest.raises(InputError, match="not a headstart head directory"):
        fit_head(_cfg(cache, out, c=0.1))
    assert [p.name for p in out.iterdir()] == ["mine.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]
