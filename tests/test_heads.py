"""Heads: the scikit-learn contract, torch L-BFGS = scikit-learn, streaming, calibration,
honest splits and few-shot categories on real EfficientNet-Lite0 features."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.cache.store import Cache
from pipeline.config import ExtractConfig, FitHeadConfig
from pipeline.data import SAMPLE_CATALOG
from pipeline.extract import extract
from pipeline.fit_head import fit_head
from pipeline.probe.calibration import calibration_error, fit_temperature, softmax
from pipeline.probe.estimators import LogisticHead, MLPProbe, NearestCentroidHead
from pipeline.probe.splits import grouped_split, near_duplicate_groups


@parametrize_with_checks(
    [
        LogisticHead(),
        LogisticHead(solver="torch", max_iter=200),
        MLPProbe(hidden=64, lr=1e-2, max_epochs=100, dropout=0.1),
        NearestCentroidHead(),
    ]
)
def test_sklearn_estimator_contract(estimator, check):
    check(estimator)


def _objective(head: LogisticHead, X: np.ndarray, y: np.ndarray, C: float, sw: np.ndarray) -> float:
    """scikit-learn's objective: C * sum w_i CE_i + ||W||^2 / 2 (binary: one logit's W)."""
    p = head.predict_proba(X).astype(np.float64)
    coef = head.coef_.astype(np.float64)
    w2 = (coef[1] - coef[0]) ** 2 if len(coef) == 2 else coef**2
    return float(C * (sw * -np.log(p[np.arange(len(y)), y])).sum() + 0.5 * w2.sum())


@pytest.mark.parametrize("class_weight", [None, "balanced"])
@pytest.mark.parametrize("binary", [False, True])
def test_torch_lbfgs_matches_scikit_learn(class_weight, binary):
    """The GPU path's solver, run on the CPU: same objective, same optimum (within tolerance)."""
    X, y = load_digits(return_X_y=True)  # real handwritten digits, 1797 x 64
    if binary:
        y = (y >= 5).astype(int)
    keep = np.flatnonzero((y != 3) | (np.arange(len(y)) % 3 == 0))  # imbalance, so weights matter
    X, y = X[keep], y[keep]
    C = 0.1
    sk = LogisticHead(C=C, class_weight=class_weight).fit(X, y)
    th = LogisticHead(C=C, class_weight=class_weight, solver="torch").fit(X, y)
    np.testing.assert_allclose(th.predict_proba(X), sk.predict_proba(X), atol=1e-2)
    assert (th.predict(X) == sk.predict(X)).mean() > 0.99
    sw = np.ones(len(y))
    if class_weight:
        counts = np.bincount(y)
        sw = (len(y) / (len(counts) * counts))[y]
    # Ours is at least as well converged as scikit-learn's (its default tolerance is looser).
    assert _objective(th, X, y, C, sw) <= _objective(sk, X, y, C, sw) * (1 + 1e-6)


def forward_state(state: dict, X: np.ndarray) -> np.ndarray:
    """Probabilities from a ``torch_state()`` / ``head.npz`` dict with numpy only: ``linear``
    (``weight``, ``bias``) or ``mlp`` (``layers.i.*``, ReLU between); a ``kind`` entry is ignored."""
    X = np.asarray(X, np.float32)
    n = len([k for k in state if k.startswith("layers.") and k.endswith(".weight")])
    if not n:
        return softmax(X @ state["weight"].T + state["bias"])
    for i in range(n):
        X = (np.maximum(X, 0.0) if i else X) @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
    return softmax(X)


def test_linear_params_fold_standardisation_and_temperature():
    X, y = load_digits(return_X_y=True)
    for head in (LogisticHead(C=0.1).fit(X, y), NearestCentroidHead().fit(X, y)):
        head.temperature_ = 2.5
        np.testing.assert_allclose(forward_state(head.torch_state(), X), head.predict_proba(X), atol=1e-5)
    mlp = MLPProbe(hidden=32, max_epochs=20).fit(X, y)
    mlp.temperature_ = 0.7
    np.testing.assert_allclose(forward_state(mlp.torch_state(), X), mlp.predict_proba(X), atol=1e-5)


@pytest.mark.parametrize("binary", [False, True])
def test_a_head_on_fewer_photos_than_features_keeps_the_estimator_contract(binary):
    """The row-space fit (rows < features; scikit-learn's own checks use tall data only):
    deterministic, clonable, picklable, ``coef_`` on the original features, and its
    ``torch_state()`` computes its probabilities."""
    import pickle

    from sklearn.base import clone

    X, y = load_digits(return_X_y=True)
    X, y = X[:40], (y[:40] >= 5).astype(int) if binary else y[:40]  # 40 photos x 64 features
    head = LogisticHead(C=0.1, class_weight="balanced").fit(X, y)
    assert head.coef_.shape == (len(np.unique(y)), 64) and head.n_iter_ > 0
    again = clone(head).fit(X, y)
    np.testing.assert_array_equal(again.coef_, head.coef_)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(head)).predict_proba(X), head.predict_proba(X))
    head.temperature_ = 1.7
    np.testing.assert_allclose(forward_state(head.torch_state(), X), head.predict_proba(X), atol=1e-5)
    assert (head.predict(X) == y).mean() > 0.9


def test_temperature_scaling_recovers_a_known_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 4, size=(4000, 5))
    y = np.array([rng.choice(5, p=p) for p in softmax(z / 3.0)])  # labels drawn at T = 3
    t = fit_temperature(z, y)
    assert 2.7 < t < 3.3
    assert calibration_error(softmax(z / t), y) < calibration_error(softmax(z), y)
    # A perfectly classified validation split carries no information about over-confidence.
    assert fit_temperature(np.eye(3) * 2.0, np.arange(3)) == 1.0


def test_grouped_split_keeps_near_duplicates_on_one_side():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(60, 32)).astype(np.float32)
    y = np.repeat(np.arange(3), 20)
    # Rows 0-9 of each class come in near-identical pairs (a re-shot of the same product).
    X = base.copy()
    for c in range(3):
        for k in range(5):
            i, j = c * 20 + 2 * k, c * 20 + 2 * k + 1
            X[j] = X[i] + rng.normal(scale=0.01, size=32)
    groups = near_duplicate_groups(lambda idx: X[idx], y, threshold=0.99)
    assert len(np.unique(groups)) == 60 - 15
    for seed in range(5):
        split = grouped_split(y, groups, 0.3, seed)
        tr, va = split.train, split.val
        assert not set(groups[tr]) & set(groups[va])
        assert sorted(np.concatenate([tr, va])) == list(range(60))
        assert all(4 <= (y[va] == c).sum() <= 8 for c in range(3))  # still stratified
    # Without groups it is the plain stratified split, row for row.
    va0 = grouped_split(y, np.arange(60), 0.3, 0).val
    assert len(va0) == 18


# --------------------------------------------------------------------------- real features

BASE = ("bag", "dress", "sneaker", "trouser")
NEW = "sandal"


@pytest.fixture(scope="module")
def lite0(tmp_path_factory):
    """Real EfficientNet-Lite0 features: 4 categories x 10 photos, a new one with 5, a held-out
    set of all 50 test photos per category plus the new category's 25 unused training photos
    (75 to measure its recall on), and one photo exported again a touch brighter (a near duplicate)."""
    root = tmp_path_factory.mktemp("fewshot")
    train, test = root / "train", root / "test"
    for cls in (*BASE, NEW):
        n = 5 if cls == NEW else 10
        photos = sorted((SAMPLE_CATALOG / "train" / cls).glob("*.png"))
        (train / cls).mkdir(parents=True)
        for p in photos[:n]:
            shutil.copy(p, train / cls / p.name)
        (test / cls).mkdir(parents=True)
        held_out = sorted((SAMPLE_CATALOG / "test" / cls).glob("*.png")) + (photos[n:] if cls == NEW else [])
        for p in held_out:  # catalog train and test file names differ (fmnist-train-*, fmnist-t10k-*)
            shutil.copy(p, test / cls / p.name)
    original = sorted((train / "bag").glob("*.png"))[0]
    # The same product photo exported again, a touch brighter: other bytes, other content hash.
    brighter = np.clip(np.asarray(Image.open(original).convert("RGB"), np.int16) + 4, 0, 255).astype(np.uint8)
    Image.fromarray(brighter).save(train / "bag" / "reshot.png")
    kw = dict(backbone="efficientnet_lite0", workers=0, progress=False)
    extract(ExtractConfig(images=str(train), out=str(root / "train.h5"), **kw))
    extract(ExtractConfig(images=str(test), out=str(root / "test.h5"), **kw))
    return root, original.name


def _xy(path):
    with Cache(path) as c:
        return c.features(), np.array([c.class_names[i] for i in c.labels]), c.paths


def test_a_new_category_with_five_photos_works_at_once(lite0):
    root, _ = lite0
    Xtr, ytr, _ = _xy(root / "train.h5")
    Xte, yte, _ = _xy(root / "test.h5")
    assert (ytr == NEW).sum() == 5 and (yte == NEW).sum() == 75 and len(yte) == 275
    for head in (NearestCentroidHead(), LogisticHead(C=0.03)):
        pred = head.fit(Xtr, ytr).predict(Xte)
        recall_new = (pred[yte == NEW] == NEW).mean()
        acc = (pred == yte).mean()
        print(type(head).__name__, f"accuracy {acc:.3f}, recall on the 5-photo category {recall_new:.3f}")
        # Measured (fp32 / bf16 features): accuracy on 275 photos centroid 0.880 / 0.865, logistic
        # 0.880 / 0.855 (SE 0.021): 0.7 is 7 SE below, chance 0.2. Recall of the new category on 75
        # photos (misses go to sneaker): centroid 0.680 / 0.587, logistic 0.667 / 0.560 (SE 0.057):
        # 0.35 is 3.7 SE below the lowest and 3.2 SE above chance (0.2, SE 0.046). On 10 photos
        # (before) one photo moved recall by 0.1, across the old 0.6.
        assert acc >= 0.7 and recall_new >= 0.35, (type(head).__name__, acc, recall_new)


def test_reexported_photo_is_a_near_duplicate_and_never_straddles(lite0, tmp_path):
    root, original = lite0
    X, y, paths = _xy(root / "train.h5")
    a, b = paths.index(f"bag/{original}"), paths.index("bag/reshot.png")
    f = X / np.linalg.norm(X, axis=1, keepdims=True)
    others = f[y == "bag"] @ f[a]
    print(f"cosine(original, re-exported) {f[a] @ f[b]:.3f}; other bags up to {np.sort(others)[-3]:.3f}")
    # Measured (fp32 / bf16): 0.994 / 0.992 against 0.97, other bags <= 0.664 / 0.660: precision moves it 0.002.
    assert f[a] @ f[b] > FitHeadConfig.near_duplicate_threshold
    for seed in range(4):
        s = fit_head(FitHeadConfig(cache=str(root / "train.h5"), out=str(tmp_path / f"h{seed}"), seed=seed, c=0.03))
        split = json.loads((s.path / "split.json").read_text())
        with Cache(root / "train.h5") as c:
            ha, hb = c.content_hash[a], c.content_hash[b]
        assert [ha, hb] in [sorted(g) for g in split["near_duplicate_groups"]] or [hb, ha] in split[
            "near_duplicate_groups"
        ]
        assert (ha in split["val_content_hash"]) == (hb in split["val_content_hash"])


def test_fit_head_records_calibration_and_per_class_metrics(lite0, tmp_path):
    root, _ = lite0
    s = fit_head(
        FitHeadConfig(
            cache=str(root / "train.h5"), out=str(tmp_path / "h"), class_weight="balanced", unknown_threshold=0.5
        )
    )
    meta = json.loads((s.path / "head.json").read_text())
    assert set(meta["metrics"]["per_class"]) == {*BASE, NEW}
    assert (
        meta["temperature"] > 0
        and meta["calibration"]["val_log_loss_after"] <= meta["calibration"]["val_log_loss_before"] + 1e-9
    )
    assert 0 <= meta["calibration"]["unknown_threshold"]["val_coverage"] <= 1
    assert meta["c_sweep"] and meta["C"] in [p["C"] for p in meta["c_sweep"]]
    with np.load(s.path / "head.npz", allow_pickle=False) as z:
        assert str(z["kind"]) == "linear" and z["weight"].shape == (5, 1280)


def test_streaming_fit_equals_in_memory_fit(small_catalog, tmp_path):
    """A cache 'larger than memory' (budget ~0) is fitted from disk in chunks: same head."""
    cache = tmp_path / "f.h5"
    extract(ExtractConfig(images=str(small_catalog), out=str(cache), backbone="tiny", workers=0, progress=False))
    common = dict(cache=str(cache), c=0.1, near_duplicate_threshold=None, calibrate=False)
    s = fit_head(FitHeadConfig(out=str(tmp_path / "stream"), max_memory_gb=1e-9, **common))
    meta = json.loads((s.path / "head.json").read_text())
    assert meta["streamed"] and meta["solver"] == "torch"
    X, y, _ = _xy(cache)
    ref = LogisticHead(C=0.1, solver="torch").fit(X, y)
    with np.load(s.path / "head.npz", allow_pickle=False) as z:
        np.testing.assert_allclose(forward_state(dict(z), X), ref.predict_proba(X), atol=1e-4)
