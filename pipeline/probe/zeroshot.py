"""Heads from text: zero-shot heads from class prompts, and logistic heads with a text prior.

Both act on **unit-normalised** image features (torch kind ``cosine``,
:class:`pipeline.models.heads.CosineHead`): ``logits = W @ (x / |x|) + b``. The text tower that
turns prompts into embeddings is :mod:`pipeline.models.text`; this module sees only numpy arrays
(no torch at import, like the rest of the probe layer).

**Zero-shot** (:class:`ZeroShotHead`, ``fit-head --head zeroshot``). Each class's prompts are
embedded, each embedding normalised, averaged and normalised again (CLIP's prompt ensembling,
Radford et al. 2021, sec. 3.1.4); ``W = logit_scale * t_hat``, ``b = 0``, so the logits are the
model's own ``logit_scale * cos(image, text)``. It needs no photo. Labelled photos, where there
are some, only calibrate it (the stage fits a temperature on them).

**Few-shot with a text prior** (:class:`TextPriorHead`, ``--head logreg --text-prior WEIGHT``).
Multinomial logistic regression on the unit features whose penalty pulls the weights towards
the zero-shot ones instead of towards 0::

    minimise  sum_i w_i * CE(W x_i + b, y_i)  +  WEIGHT/2 * (|W - W_text|^2 + |b|^2)

i.e. an L2 fit of the residual ``W - W_text``: the MAP estimate under a Gaussian prior centred on
the zero-shot head (the "stay close to the zero-shot prototypes" linear probe of CLAP,
Silva-Rodriguez et al., CVPR 2024, and the text-initialised probe of LP++, Huang et al., CVPR
2024, without their learned per-class blending). Chosen over WiSE-FT-style interpolation
(Wortsman et al., 2022: fit a plain probe, then ``alpha * W_text + (1 - alpha) * W_probe``) because:

* with 0 photos it *is* the zero-shot head, and as photos accumulate the sum over photos
  outweighs the fixed penalty, so it becomes plain logistic regression - no mixing weight to
  choose on a validation split that 1-5 photos per class do not have;
* the photos correct only the directions they say something about; interpolation shrinks the
  whole probe, its noise included, by one factor - and a 1-shot plain probe is mostly noise
  (measured in tests/test_zeroshot.py: the prior beats both ends there);
* a class with no photo (or none in the training split) keeps its text weights instead of
  being unlearnable; the objective is convex and smooth, one L-BFGS solve.

``WEIGHT`` is in logit units (features are unit vectors, so moving a weight row by 1 moves a
logit by at most 1), against a log-loss *summed* over photos. With CLIP's logit scale of 100,
zero-shot margins are several logits, so small weights already keep the text: on the synthetic
benchmark of tests/test_zeroshot.py accuracy is flat from 0.01 to 0.3 and falls towards the
zero-shot head's by 10; 0.1 is a good start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.utils.validation import validate_data

from ..errors import InputError
from .estimators import _class_weights, _Head


def unit_rows(X: Any) -> np.ndarray:
    """Rows scaled to unit L2 norm, the norm clamped at 1e-12 (as ``torch.nn.functional.normalize``)."""
    X = np.asarray(X)
    return np.asarray(X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12))


def class_text_embeddings(embed: Callable[[list[str]], np.ndarray], prompts: Sequence[Sequence[str]]) -> np.ndarray:
    """One unit embedding per class ``[K, D]`` from its prompts: every prompt embedded (in one
    call of ``embed``, the text tower), normalised, averaged per class and normalised again."""
    flat = [p for ps in prompts for p in ps]
    emb = unit_rows(np.asarray(embed(flat), np.float64))
    out, at = [], 0
    for ps in prompts:
        out.append(emb[at : at + len(ps)].mean(0))
        at += len(ps)
    return unit_rows(np.stack(out))


class _CosineHead(_Head):
    """``coef_ @ (x / |x|) + intercept_``; exported as torch kind ``cosine``."""

    torch_kind = "cosine"  # what head_dir.write_head records, whatever fit-head kind uses it
    coef_: np.ndarray
    intercept_: np.ndarray

    def _logits_chunk(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(unit_rows(X) @ self.coef_.T + self.intercept_, dtype=np.float32)

    def _text(self) -> np.ndarray:
        if self.text_embeddings is None:  # type: ignore[attr-defined]
            # an InputError, not a ValueError: a command that fits heads of a recorded kind
            # (audit's cross-fitting) then says why instead of a traceback
            raise InputError(
                f"a {type(self).__name__} is built from the class prompts' text embeddings, which only "
                "`headstart fit-head --head zeroshot` / `--text-prior` supply (set_params(text_embeddings=...) "
                "from Python); it cannot be fitted from photos alone"
            )
        return unit_rows(np.asarray(self.text_embeddings, np.float64))  # type: ignore[attr-defined]

    def torch_state(self) -> dict[str, np.ndarray]:
        return {
            "weight": (self.coef_ / self.temperature_).astype(np.float32),
            "bias": (self.intercept_ / self.temperature_).astype(np.float32),
        }


class ZeroShotHead(_CosineHead):
    """``logit_scale * cos(x, t_k)`` for the class text embeddings ``t_k`` (rows of
    ``text_embeddings``, one per class, in class order). ``fit`` learns nothing from photos: it
    only checks ``X``'s width when given one."""

    def __init__(self, text_embeddings: Any = None, logit_scale: float = 100.0) -> None:
        self.text_embeddings = text_embeddings
        self.logit_scale = logit_scale

    def fit(self, X: Any = None, y: Any = None) -> ZeroShotHead:
        t = self._text()
        if X is not None:
            X = validate_data(self, X, dtype=np.float32)
            if X.shape[1] != t.shape[1]:
                raise ValueError(f"X has {X.shape[1]} features but the text embeddings have {t.shape[1]}")
        self.n_features_in_ = t.shape[1]
        self.classes_ = np.arange(len(t))
        self.coef_ = float(self.logit_scale) * t
        self.intercept_ = np.zeros(len(t))
        self.temperature_ = 1.0
        return self


class TextPriorHead(_CosineHead):
    """Logistic regression on unit features, penalised towards the zero-shot head (module
    docstring). ``y`` holds class indices ``0..K-1`` into the rows of ``text_embeddings``; a class
    without photos keeps its text weights."""

    def __init__(
        self,
        text_embeddings: Any = None,
        logit_scale: float = 100.0,
        weight: float = 1.0,
        class_weight: str | None = None,
        max_iter: int = 1000,
    ) -> None:
        self.text_embeddings = text_embeddings
        self.logit_scale = logit_scale
        self.weight = weight
        self.class_weight = class_weight
        self.max_iter = max_iter

    def fit(self, X: Any, y: Any) -> TextPriorHead:
        from scipy.optimize import minimize

        t = self._text()
        X = validate_data(self, X, dtype=np.float32)
        y = np.asarray(y, np.int64)
        k, d = t.shape
        if X.shape[1] != d:
            raise ValueError(f"X has {X.shape[1]} features but the text embeddings have {d}")
        if len(y) != len(X) or (len(y) and (y.min() < 0 or y.max() >= k)):
            raise ValueError(f"y must hold one class index in 0..{k - 1} per row of X")
        if not self.weight > 0:
            raise ValueError(f"the text prior's weight must be > 0, not {self.weight}")
        xn = unit_rows(np.asarray(X, np.float64))
        w0 = float(self.logit_scale) * t
        sw = _class_weights(y, k, self.class_weight)[y]
        onehot = np.eye(k)[y]
        lam = float(self.weight)

        def loss(theta: np.ndarray) -> tuple[float, np.ndarray]:
            dw, b = theta[: k * d].reshape(k, d), theta[k * d :]
            z = xn @ (w0 + dw).T + b
            z -= z.max(1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(1, keepdims=True))
            f = -(sw * (onehot * logp).sum(1)).sum() + lam / 2 * (np.sum(dw * dw) + np.sum(b * b))
            g = (np.exp(logp) - onehot) * sw[:, None]
            grad = np.concatenate([(g.T @ xn + lam * dw).ravel(), g.sum(0) + lam * b])
            return float(f), grad

        res = minimize(loss, np.zeros(k * d + k), jac=True, method="L-BFGS-B", options={"maxiter": self.max_iter})
        self.n_iter_ = int(res.nit)
        self.n_features_in_ = d
        self.classes_ = np.arange(k)
        self.coef_ = w0 + res.x[: k * d].reshape(k, d)
        self.intercept_ = res.x[k * d :].copy()
        self.temperature_ = 1.0
        return self
