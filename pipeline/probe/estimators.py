"""Heads: scikit-learn estimators trained on cached features, convertible to plain tensors.

* :class:`LogisticHead` - standardise, then multinomial logistic regression; scikit-learn's
  L-BFGS (``solver="sklearn"``) or the same objective minimised by full-batch L-BFGS in torch
  (``solver="torch"``, any device), which streams the features in row chunks so a cache larger
  than memory (or than the GPU) can be fitted exactly. Its C: :func:`.selection.sweep_c`.
* :class:`MLPProbe` - one hidden layer, dropout, early stopping on a held-out slice (torch).
* :class:`NearestCentroidHead` - few-shot: one mean per class; five photos make a class.

Every head has a ``temperature_`` (1 after ``fit``; set from
:func:`.calibration.fit_temperature` on a validation split) and gives its parameters as plain
arrays (``torch_state()``: the tensors of its :mod:`.kinds` entry's torch module), the
standardisation and the temperature folded in, so the exported model and the prediction path
never unpickle anything. torch is imported only inside the fits that use it.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.utils.class_weight import compute_class_weight
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .calibration import softmax
from .path import fit_in_row_space
from .rows import CHUNK_ROWS, blas_threads_for, iter_chunks, small_problem_threads, standardisation


def _class_weights(y_idx: np.ndarray, k: int, class_weight: str | None) -> np.ndarray:
    """One weight per class (``[k]``, float64): 1 each, or scikit-learn's ``"balanced"``
    ``n / (n_classes * count)`` over the classes present (an absent class keeps 1). The same
    weights scikit-learn's own ``LogisticRegression(class_weight=...)`` applies."""
    out = np.ones(k)
    if class_weight is not None:
        present = np.unique(y_idx)
        out[present] = compute_class_weight(class_weight, classes=present, y=y_idx)
    return out


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

    def torch_state(self) -> dict[str, np.ndarray]:
        """The head as named float32 arrays, for the torch module its kind exports as
        (``kinds.KINDS[...].torch_kind``); ``softmax(module(x))`` = :meth:`predict_proba`."""
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

    def torch_state(self) -> dict[str, np.ndarray]:
        w, b = self.linear_params()
        return {"weight": w, "bias": b}


# --------------------------------------------------------------------------- logistic regression


class LogisticHead(_LinearHead):
    """Standardise, then multinomial logistic regression (L-BFGS).

    ``solver="sklearn"`` uses scikit-learn; ``solver="torch"`` minimises the same objective
    (``C * sum_i w_i * CE_i + ||W||^2 / 2``, intercept unpenalised, one logit for two classes)
    with full-batch L-BFGS in torch on ``device`` - the GPU path for large caches, and the path
    that accepts an on-disk row source read in ``chunk_rows`` chunks. With fewer rows than
    features (a catalog's few hundred photos) ``"sklearn"`` minimises scikit-learn's objective
    in the rows' span (:func:`.path.fit_in_row_space`): the same optimum, several times faster.
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
            with small_problem_threads(int(X.shape[0]) * int(X.shape[1]), str(self.device)):
                self._fit_torch(X, y_idx)
        self.temperature_ = 1.0
        return self

    def _fit_sklearn(self, X: np.ndarray, y_idx: np.ndarray) -> None:
        k = len(self.classes_)
        with warnings.catch_warnings(), blas_threads_for(X.size):
            warnings.simplefilter("ignore", ConvergenceWarning)
            if X.shape[0] < X.shape[1]:  # the same optimum in the rows' span, d/n times fewer unknowns
                Z = (X.astype(np.float64) - self.mean_) / self.scale_
                sw = _class_weights(y_idx, k, self.class_weight)[y_idx]
                coef, intercept, self.n_iter_ = fit_in_row_space(Z, y_idx, k, sw, self.C, self.max_iter)
            else:
                lr = LogisticRegression(C=self.C, class_weight=self.class_weight, max_iter=self.max_iter)
                lr.fit((X - self.mean_) / self.scale_, y_idx)
                coef, intercept, self.n_iter_ = lr.coef_, lr.intercept_, int(np.max(lr.n_iter_))
        if coef.shape[0] == 1:  # binary: one logit z; softmax([-z/2, z/2]) = sigmoid(z)
            coef = np.concatenate([-coef / 2, coef / 2])
            intercept = np.concatenate([-intercept / 2, intercept / 2])
        self.coef_, self.intercept_ = coef.astype(np.float32), intercept.astype(np.float32)

    def _fit_torch(self, X: Any, y_idx: np.ndarray) -> None:
        import torch
        import torch.nn.functional as F

        dev = torch.device(self.device)
        k, d = len(self.classes_), int(X.shape[1])
        sw = _class_weights(y_idx, k, self.class_weight)[y_idx]  # one weight per row
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


class MLPProbe(_Head):
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

    def fit(self, X: Any, y: Any) -> MLPProbe:
        X, y = validate_data(self, X, y, dtype=np.float32)
        with small_problem_threads(X.size, str(self.device)):
            return self._fit(X, y)

    def _fit(self, X: np.ndarray, y: np.ndarray) -> MLPProbe:
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
        cw = torch.as_tensor(_class_weights(y_idx, k, self.class_weight), device=dev, dtype=torch.float32)
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

    def torch_state(self) -> dict[str, np.ndarray]:
        """Hidden layer on raw features (standardisation folded in) and output layer with the
        temperature folded in, named as ``models.heads.build_head("mlp", ...)`` expects:
        ``softmax(relu(x @ W0.T + b0) @ W1.T + b1)`` = :meth:`predict_proba`."""
        check_is_fitted(self)
        w1 = self.w1_ / self.scale_
        b1 = self.b1_ - w1 @ self.mean_
        return {
            "layers.0.weight": w1.astype(np.float32),
            "layers.0.bias": b1.astype(np.float32),
            "layers.1.weight": (self.w2_ / self.temperature_).astype(np.float32),
            "layers.1.bias": (self.b2_ / self.temperature_).astype(np.float32),
        }
