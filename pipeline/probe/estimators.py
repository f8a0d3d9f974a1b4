"""Heads: scikit-learn estimators trained on cached features, convertible to plain tensors.

* :class:`LogisticHead` - standardise, then multinomial logistic regression; scikit-learn's
  L-BFGS (``solver="sklearn"``) or the same objective minimised by full-batch L-BFGS in torch
  (``solver="torch"``, any device), which streams the features in row chunks so a cache larger
  than memory (or than the GPU) can be fitted exactly.
* :class:`MLPHead` - one hidden layer, dropout, early stopping on a held-out slice (torch).
* :class:`NearestCentroidHead` - few-shot: one mean per class; five photos make a class.

The regularisation strength is chosen by :func:`sweep_c` on a validation split, as in the CLIP
paper's linear-probe protocol (a log-spaced coarse grid, then a finer one around the best) -
with one change: C is chosen by validation *log-loss*, not accuracy. With a few dozen photos per
class, validation accuracy is flat and noisy across C and its ties pick the most regularised,
worst model (measured on the bundled catalog: accuracy selection chose C=1e-6, 0.777 held-out;
log-loss chose C=0.03, 0.843, the same on three split seeds).

Every head has a ``temperature_`` (1 after ``fit``; set by :func:`fit_temperature` on a
validation split) and gives its parameters as plain arrays (``torch_state()``), the standardisation
and the temperature folded in, so the exported model and the prediction path never unpickle
anything.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss, precision_recall_fscore_support
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from threadpoolctl import threadpool_limits

# Small problems run BLAS on one thread. Measured on the shared 2-core development machine,
# 300 x 1280 features: one L-BFGS fit 0.2 s on one thread, 8 s on two while other jobs used the
# cores (OpenBLAS worker threads busy-wait for each other), and a whole fit-head 140 s. Threads
# pay off only for large matrices: 20M values is e.g. 15k photos x 1280 features.
SINGLE_THREAD_BLAS_VALUES = 20_000_000


def blas_threads_for(n_values: int) -> contextlib.AbstractContextManager[Any]:
    """One BLAS thread for problems of up to SINGLE_THREAD_BLAS_VALUES values, else no limit."""
    return threadpool_limits(limits=1) if n_values <= SINGLE_THREAD_BLAS_VALUES else contextlib.nullcontext()


COARSE_LOG10_C = np.arange(-6.0, 3.0, 1.0)  # 1e-6 ... 1e2 on standardised features
FINE_OFFSETS = (-0.5, -0.25, 0.25, 0.5)
CHUNK_ROWS = 65536
SINGLE_THREAD_VALUES = 20_000_000  # below this many feature values, fit on one CPU thread
HEAD_KINDS = ("logreg", "mlp", "centroid")


class RowSource(Protocol):
    """What the chunked paths need: a row count and row slicing. ``fit_head.CacheRows`` is one:
    it reads the rows from the HDF5 cache on every slice, so nothing but a chunk is in memory.
    ``is_row_source = True`` marks such objects (arrays are validated the scikit-learn way)."""

    is_row_source: bool

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: slice) -> np.ndarray: ...


def iter_chunks(X: RowSource | np.ndarray, chunk_rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, int(X.shape[0]), chunk_rows):
        yield start, np.asarray(X[start : start + chunk_rows], dtype=np.float32)


def standardisation(X: RowSource | np.ndarray, chunk_rows: int = CHUNK_ROWS) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std, accumulated in float64 over row chunks (one pass, bounded memory)."""
    n = 0
    s: Any = 0.0
    ss: Any = 0.0
    for _, c in iter_chunks(X, chunk_rows):
        c64 = c.astype(np.float64)
        n += len(c)
        s = s + c64.sum(0)
        ss = ss + (c64**2).sum(0)
    mean = s / n
    var = np.maximum(ss / n - mean**2, 0.0)
    return mean.astype(np.float32), (np.sqrt(var) + 1e-6).astype(np.float32)


@contextlib.contextmanager
def _small_problem_threads(n_values: int, device: str) -> Iterator[None]:
    """One CPU thread for small torch fits: on a shared 2-core machine, torch's worker threads
    wait for each other far longer than a 300 x 1280 problem takes on one core (the same effect
    fit_head.py measured for BLAS: 0.2 s vs 8 s)."""
    import torch

    if device != "cpu" or n_values > SINGLE_THREAD_VALUES:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    e = np.exp(z)
    return np.asarray(e / e.sum(1, keepdims=True))


def _is_lazy(X: Any) -> bool:
    """A row source read piecewise (HDF5), not an in-memory array: skip whole-array validation."""
    return bool(getattr(X, "is_row_source", False))


def _encode_targets(y: Any) -> tuple[np.ndarray, np.ndarray]:
    check_classification_targets(y)
    classes, y_idx = np.unique(np.asarray(y), return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"need photos of at least 2 classes, got 1 class ({classes[0]!r})")
    return classes, y_idx


class _Head(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Shared prediction code: ``logits(X)`` on raw features, divided by ``temperature_``."""

    temperature_: float
    classes_: np.ndarray

    def _logits_chunk(self, X: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _check_X(self, X: Any) -> Any:
        check_is_fitted(self)
        if _is_lazy(X):
            return X
        return validate_data(self, X, reset=False, dtype=np.float32)

    def logits(self, X: Any) -> np.ndarray:
        """Raw logits ``[N, K]`` (before temperature), computed in row chunks."""
        X = self._check_X(X)
        out = [self._logits_chunk(c) for _, c in iter_chunks(X)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes_)), np.float32)

    def decision_function(self, X: Any) -> np.ndarray:
        z = self.logits(X)
        if len(self.classes_) == 2:  # scikit-learn's convention: one score, > 0 means classes_[1]
            return np.asarray(z[:, 1] - z[:, 0])
        return z

    def predict_proba(self, X: Any) -> np.ndarray:
        X = self._check_X(X)
        out = [softmax(self._logits_chunk(c) / self.temperature_) for _, c in iter_chunks(X)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes_)), np.float32)

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return np.asarray(self.classes_[self.predict_proba(X).argmax(1)])

    def torch_state(self) -> dict[str, Any]:
        raise NotImplementedError


class _LinearHead(_Head):
    """Linear in standardised features: ``coef_ @ ((x - mean_) / scale_) + intercept_``."""

    coef_: np.ndarray
    intercept_: np.ndarray
    mean_: np.ndarray
    scale_: np.ndarray

    def _logits_chunk(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(((X - self.mean_) / self.scale_) @ self.coef_.T + self.intercept_, dtype=np.float32)

    def linear_params(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W, b)`` acting on raw features, standardisation and temperature folded in, such that
        ``softmax(x @ W.T + b)`` equals :meth:`predict_proba`."""
        check_is_fitted(self)
        w = self.coef_ / self.scale_ / self.temperature_
        b = (self.intercept_ - (self.coef_ / self.scale_) @ self.mean_) / self.temperature_
        return w.astype(np.float32), b.astype(np.float32)

    def torch_state(self) -> dict[str, Any]:
        w, b = self.linear_params()
        return {"kind": "linear", "weight": w, "bias": b}


# --------------------------------------------------------------------------- logistic regression


class LogisticHead(_LinearHead):
    """Standardise, then multinomial logistic regression (L-BFGS).

    ``solver="sklearn"`` uses scikit-learn; ``solver="torch"`` minimises the same objective
    (``C * sum_i w_i * CE_i + ||W||^2 / 2``, intercept unpenalised, one logit for two classes)
    with full-batch L-BFGS in torch on ``device`` - the GPU path for large caches, and the path
    that accepts an on-disk row source read in ``chunk_rows`` chunks.
    """

    def __init__(
        self,
        C: float = 1.0,
        class_weight: str | None = None,
        max_iter: int = 1000,
        solver: str = "sklearn",
        device: str = "cpu",
        chunk_rows: int = CHUNK_ROWS,
    ) -> None:
        self.C = C
        self.class_weight = class_weight
        self.max_iter = max_iter
        self.solver = solver
        self.device = device
        self.chunk_rows = chunk_rows

    def fit(self, X: Any, y: Any) -> LogisticHead:
        if self.solver not in ("sklearn", "torch"):
            raise ValueError(f"solver must be 'sklearn' or 'torch', not {self.solver!r}")
        if _is_lazy(X):
            y = np.asarray(y)
            self.n_features_in_ = int(X.shape[1])
        else:
            X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_, y_idx = _encode_targets(y)
        self.mean_, self.scale_ = standardisation(X, self.chunk_rows)
        if self.solver == "sklearn":
            self._fit_sklearn(np.asarray(X, np.float32), y_idx)
        else:
            with _small_problem_threads(int(X.shape[0]) * int(X.shape[1]), str(self.device)):
                self._fit_torch(X, y_idx)
        self.temperature_ = 1.0
        return self

    def _fit_sklearn(self, X: np.ndarray, y_idx: np.ndarray) -> None:
        lr = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter)
        with warnings.catch_warnings(), blas_threads_for(X.size):
            warnings.simplefilter("ignore", ConvergenceWarning)
            lr.fit((X - self.mean_) / self.scale_, y_idx)
        coef, intercept = lr.coef_, lr.intercept_
        if coef.shape[0] == 1:  # binary: one logit z; softmax([-z/2, z/2]) = sigmoid(z)
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        self.coef_, self.intercept_ = coef.astype(np.float32), intercept.astype(np.float32)
        self.n_iter_ = int(np.max(lr.n_iter_))

    def _fit_torch(self, X: Any, y_idx: np.ndarray) -> None:
        import torch
        import torch.nn.functional as F

        dev = torch.device(self.device)
        k, d = len(self.classes_), int(X.shape[1])
        sw = _sample_weights(y_idx, k, self.class_weight)
        # float64 on the CPU (exact agreement with scikit-learn), float32 on accelerators (speed).
        dtype = torch.float64 if dev.type == "cpu" else torch.float32
        mean = torch.as_tensor(self.mean_, device=dev, dtype=dtype)
        scale = torch.as_tensor(self.scale_, device=dev, dtype=dtype)

        # In-memory features are moved to the device and standardised once; an on-disk source
        # is re-read and standardised chunk by chunk on every L-BFGS pass, so memory stays one
        # chunk regardless of the cache size.
        def prepared(c: np.ndarray) -> torch.Tensor:
            return (torch.as_tensor(c, device=dev).to(dtype) - mean) / scale

        resident = None if _is_lazy(X) else [(s, prepared(c)) for s, c in iter_chunks(X, self.chunk_rows)]
        y_t = torch.as_tensor(y_idx, device=dev)
        sw_t = torch.as_tensor(sw, device=dev, dtype=dtype)
        n_logits = 1 if k == 2 else k  # binary: one logit, like scikit-learn (same penalty, same optimum)
        W = torch.zeros(n_logits, d, device=dev, dtype=dtype, requires_grad=True)
        b = torch.zeros(n_logits, device=dev, dtype=dtype, requires_grad=True)
        # Scaled objective (divided by C * sum(w)) so the tolerances do not depend on N or C.
        norm = float(sw.sum())

        def batches() -> Iterator[tuple[int, torch.Tensor]]:
            if resident is not None:
                yield from resident
            else:
                for s, c in iter_chunks(X, self.chunk_rows):
                    yield s, prepared(c)

        opt = torch.optim.LBFGS(
            [W, b],
            lr=1,
            max_iter=self.max_iter,
            tolerance_grad=1e-7,
            tolerance_change=1e-12,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            total = torch.zeros((), device=dev, dtype=dtype)
            for s, xc in batches():
                z = xc @ W.T + b
                if n_logits == 1:
                    z = torch.cat([torch.zeros_like(z), z], 1)
                ce = F.cross_entropy(z, y_t[s : s + len(xc)], reduction="none")
                part = (ce * sw_t[s : s + len(xc)]).sum() / norm
                part.backward()  # gradients accumulate chunk by chunk: bounded memory
                total = total + part.detach()
            reg = (W * W).sum() / (2 * self.C * norm)
            reg.backward()
            return total + reg.detach()

        opt.step(closure)
        w_np = W.detach().cpu().double().numpy()
        b_np = b.detach().cpu().double().numpy()
        if n_logits == 1:
            w_np = np.concatenate([-w_np / 2, w_np / 2])
            b_np = np.concatenate([-b_np / 2, b_np / 2])
        self.coef_, self.intercept_ = w_np.astype(np.float32), b_np.astype(np.float32)
        self.n_iter_ = int(opt.state[opt._params[0]].get("n_iter", 0))


def _sample_weights(y_idx: np.ndarray, k: int, class_weight: str | None) -> np.ndarray:
    if class_weight is None:
        return np.ones(len(y_idx))
    cw = compute_class_weight(class_weight, classes=np.arange(k), y=y_idx)
    return np.asarray(cw[y_idx], dtype=np.float64)


# --------------------------------------------------------------------------- nearest centroid


class NearestCentroidHead(_LinearHead):
    """Few-shot head: one mean per class in standardised feature space.

    Scored as a Gaussian per class with one shared spherical variance and a uniform prior
    (uniform on purpose: a new category with five photos must not be out-voted by a category
    with five hundred). ``-||x - c||^2 / 2v`` differs from ``(c.x - ||c||^2/2) / v`` by a term
    that is the same for every class, so the head is *exactly* linear and exports as the same
    ``nn.Linear`` as logistic regression (the Prototypical Networks observation).
    """

    def __init__(self) -> None:
        pass

    def fit(self, X: Any, y: Any) -> NearestCentroidHead:
        X, y = validate_data(self, X, y, dtype=np.float32)
        self.classes_, y_idx = _encode_targets(y)
        self.mean_, self.scale_ = standardisation(X)
        Z = (X - self.mean_) / self.scale_
        counts = np.bincount(y_idx, minlength=len(self.classes_)).astype(np.float64)
        centroids = np.zeros((len(self.classes_), Z.shape[1]))
        np.add.at(centroids, y_idx, Z)
        centroids /= counts[:, None]
        resid = ((Z - centroids[y_idx]) ** 2).sum() / max(1, Z.size - centroids.size)
        var = float(resid) if resid > 1e-8 else 1.0  # all photos on their centroid: any scale
        self.centroids_ = centroids.astype(np.float32)
        self.coef_ = (centroids / var).astype(np.float32)
        self.intercept_ = (-0.5 * (centroids**2).sum(1) / var).astype(np.float32)
        self.temperature_ = 1.0
        return self


# --------------------------------------------------------------------------- MLP


class MLPHead(_Head):
    """Standardise -> Linear(D, hidden) -> ReLU -> Dropout -> Linear(hidden, K), trained with
    AdamW on mini-batches; early stopping on a stratified ``validation_fraction`` of the training
    rows (the best epoch's weights are kept). Better than a linear head only with many photos
    per class; the linear head stays the default."""

    def __init__(
        self,
        hidden: int = 512,
        dropout: float = 0.5,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        batch_size: int = 256,
        max_epochs: int = 200,
        patience: int = 10,
        validation_fraction: float = 0.1,
        class_weight: str | None = None,
        random_state: int = 0,
        device: str = "cpu",
    ) -> None:
        self.hidden = hidden
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.class_weight = class_weight
        self.random_state = random_state
        self.device = device

    def fit(self, X: Any, y: Any) -> MLPHead:
        X, y = validate_data(self, X, y, dtype=np.float32)
        with _small_problem_threads(X.size, str(self.device)):
            return self._fit(X, y)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> MLPHead:
        import torch
        import torch.nn.functional as F
        from torch import nn

        self.classes_, y_idx = _encode_targets(y)
        k = len(self.classes_)
        self.mean_, self.scale_ = standardisation(X)
        rng = np.random.default_rng(self.random_state)
        torch.manual_seed(self.random_state)
        # Early-stopping rows: a stratified slice (classes with one photo stay in training).
        hold = np.zeros(len(y_idx), bool)
        for c in range(k):
            idx = np.flatnonzero(y_idx == c)
            m = round(len(idx) * self.validation_fraction)
            if len(idx) >= 3 and m:
                hold[rng.choice(idx, m, replace=False)] = True
        dev = torch.device(self.device)
        Z = torch.as_tensor((X - self.mean_) / self.scale_, device=dev)
        Y = torch.as_tensor(y_idx, device=dev)
        cw = torch.as_tensor(_class_weight_vector(y_idx, k, self.class_weight), device=dev, dtype=torch.float32)
        net = nn.Sequential(
            nn.Linear(X.shape[1], self.hidden), nn.ReLU(), nn.Dropout(self.dropout), nn.Linear(self.hidden, k)
        ).to(dev)
        opt = torch.optim.AdamW(net.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        train_idx = np.flatnonzero(~hold)
        hold_idx = torch.as_tensor(np.flatnonzero(hold), device=dev)
        best, best_state, bad = float("inf"), None, 0
        self.n_iter_ = 0
        for _epoch in range(self.max_epochs):
            net.train()
            for s in range(0, len(train_idx), self.batch_size):
                bi = torch.as_tensor(rng.permutation(train_idx)[s : s + self.batch_size], device=dev)
                loss = F.cross_entropy(net(Z[bi]), Y[bi], weight=cw)
                opt.zero_grad()
                loss.backward()
                opt.step()
            self.n_iter_ += 1
            if not len(hold_idx):
                continue
            net.eval()
            with torch.no_grad():
                v = float(F.cross_entropy(net(Z[hold_idx]), Y[hold_idx], weight=cw))
            if v < best - 1e-4:
                best, bad = v, 0
                best_state = {n: t.detach().clone() for n, t in net.state_dict().items()}
            else:
                bad += 1
                if bad >= self.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)
        sd = {n: t.detach().cpu().numpy().astype(np.float32) for n, t in net.state_dict().items()}
        self.w1_, self.b1_, self.w2_, self.b2_ = sd["0.weight"], sd["0.bias"], sd["3.weight"], sd["3.bias"]
        self.temperature_ = 1.0
        return self

    def _logits_chunk(self, X: np.ndarray) -> np.ndarray:
        h = np.maximum(((X - self.mean_) / self.scale_) @ self.w1_.T + self.b1_, 0.0)
        return np.asarray(h @ self.w2_.T + self.b2_, dtype=np.float32)

    def torch_state(self) -> dict[str, Any]:
        """Hidden layer on raw features (standardisation folded in) and output layer with the
        temperature folded in, named as ``artifacts.build_head("mlp", ...)`` expects:
        ``softmax(relu(x @ W0.T + b0) @ W1.T + b1)`` = :meth:`predict_proba`."""
        check_is_fitted(self)
        w1 = self.w1_ / self.scale_
        b1 = self.b1_ - w1 @ self.mean_
        return {
            "kind": "mlp",
            "layers.0.weight": w1.astype(np.float32),
            "layers.0.bias": b1.astype(np.float32),
            "layers.1.weight": (self.w2_ / self.temperature_).astype(np.float32),
            "layers.1.bias": (self.b2_ / self.temperature_).astype(np.float32),
        }


def _class_weight_vector(y_idx: np.ndarray, k: int, class_weight: str | None) -> np.ndarray:
    if class_weight is None:
        return np.ones(k, np.float32)
    present = np.unique(y_idx)
    out = np.ones(k, np.float32)
    out[present] = compute_class_weight(class_weight, classes=present, y=y_idx)
    return out


def forward_state(state: dict[str, Any], X: np.ndarray) -> np.ndarray:
    """Probabilities from a ``torch_state()`` / ``head.npz`` dict, with numpy only (no unpickling)."""
    X = np.asarray(X, np.float32)
    if state.get("kind") is not None and str(state["kind"]) == "mlp":
        n = len([k for k in state if k.startswith("layers.") and k.endswith(".weight")])
        for i in range(n):
            X = (np.maximum(X, 0.0) if i else X) @ state[f"layers.{i}.weight"].T + state[f"layers.{i}.bias"]
        return softmax(X)
    return softmax(X @ state["weight"].T + state["bias"])


# --------------------------------------------------------------------------- calibration


def fit_temperature(logits: np.ndarray, y_idx: np.ndarray) -> float:
    """Temperature scaling (Guo et al., 2017): the T > 0 minimising the validation log-loss of
    ``softmax(logits / T)``. One parameter, so it changes confidence, never the predicted class.

    When every validation photo is already right, the log-loss keeps falling as T -> 0 and says
    nothing about over-confidence (a tiny split would make every probability 1.0): T stays 1."""
    from scipy.optimize import minimize_scalar

    z = np.asarray(logits, np.float64)
    y_idx = np.asarray(y_idx)
    if len(y_idx) == 0 or bool((z.argmax(1) == y_idx).all()):
        return 1.0

    def nll(log_t: float) -> float:
        p = softmax(z / np.exp(log_t))
        return float(-np.log(np.clip(p[np.arange(len(y_idx)), y_idx], 1e-12, None)).mean())

    # Wide bounds: the nearest-centroid head treats 1280 correlated features as independent and
    # is overconfident (measured on the bundled catalog: T = 35).
    res = minimize_scalar(nll, bounds=(np.log(1e-2), np.log(1e3)), method="bounded")
    return float(np.exp(res.x))


def calibration_error(proba: np.ndarray, y_idx: np.ndarray, bins: int = 15) -> float:
    """Expected calibration error: mean |confidence - accuracy| over equal-width confidence bins,
    weighted by the bins' share of photos."""
    conf = proba.max(1)
    correct = proba.argmax(1) == np.asarray(y_idx)
    which = np.minimum((conf * bins).astype(int), bins - 1)
    err = 0.0
    for b in range(bins):
        m = which == b
        if m.any():
            err += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(err)


def mean_log_loss(proba: np.ndarray, y_idx: np.ndarray) -> float:
    return float(-np.log(np.clip(proba[np.arange(len(y_idx)), y_idx], 1e-12, None)).mean())


# --------------------------------------------------------------------------- C sweep and metrics


def sweep_c(
    X_train: Any,
    y_train: np.ndarray,
    X_val: Any,
    y_val: np.ndarray,
    *,
    class_weight: str | None = None,
    max_iter: int = 1000,
    solver: str = "sklearn",
    device: str = "cpu",
) -> tuple[float, list[dict[str, float]]]:
    """Choose C by validation log-loss (ties -> the stronger regularisation)."""
    curve: dict[float, tuple[float, float]] = {}  # log10 C -> (log-loss, accuracy)
    labels = np.unique(np.concatenate([y_train, y_val]))

    def score(log_c: float) -> None:
        log_c = round(float(log_c), 4)
        if log_c not in curve:
            head = LogisticHead(
                C=10.0**log_c, class_weight=class_weight, max_iter=max_iter, solver=solver, device=device
            ).fit(X_train, y_train)
            proba = head.predict_proba(X_val).astype(np.float64)
            pred = head.classes_[proba.argmax(1)]
            full = np.zeros((len(y_val), len(labels)))
            full[:, np.searchsorted(labels, head.classes_)] = proba / proba.sum(1, keepdims=True)
            curve[log_c] = (float(log_loss(y_val, full, labels=labels)), float(accuracy_score(y_val, pred)))

    def best() -> float:
        return min(curve, key=lambda k: (round(curve[k][0], 6), k))

    for lc in COARSE_LOG10_C:
        score(lc)
    centre = best()
    for off in FINE_OFFSETS:
        score(centre + off)
    table = [{"C": 10.0**k, "val_log_loss": v[0], "val_accuracy": v[1]} for k, v in sorted(curve.items())]
    return 10.0 ** best(), table


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "n": len(y_true),
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
    }
