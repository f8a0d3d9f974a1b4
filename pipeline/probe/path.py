"""The logistic head's regularisation path: many C values fitted as one problem, cheaply.

Three things make the C sweep of :mod:`.selection` several times faster than independent
scikit-learn fits while solving the same problems (measured in docs/benchmarks.md, refit):

* **Row space** (:class:`RowSpace`). The objective ``mean_i w_i CE_i(W z_i + b) +
  ||W||^2 / (2 C sum w)`` has its optimum in the span of the training rows: at the optimum
  ``W = -C sum_i w_i (p_i - y_i) z_i``. With ``n`` rows fewer than ``d`` features (a catalog's
  300 photos x 1280 EfficientNet features) the fit therefore runs on ``n``-dimensional
  coordinates ``F = Z V`` (``V``: an orthonormal basis of the rows, from the ``n x n`` Gram
  matrix): ``Z W^T = F c^T`` and ``||W|| = ||c||`` for ``W = c V^T``, so it is the *same*
  problem with ``d / n`` times fewer unknowns - the kernel (dual) form of the primal. The basis
  is computed once for the whole sweep.
* **Warm starts** (:class:`LogisticPath`). Neighbouring C have neighbouring optima, so each fit
  starts from the solution of the nearest C already solved, as ``LogisticRegressionCV`` does -
  and, since only the quadratic penalty changes with C, with that fit's L-BFGS curvature pairs
  corrected exactly for the new C (:meth:`_Memory.moved`).
* **A lean L-BFGS** (:func:`_lbfgs`): on a problem this small, SciPy's L-BFGS-B and its
  wrappers cost more per iteration than the loss (measured); the loss and gradient are two
  ``k x n x n`` products in float64 (scikit-learn's objective, scaled the same way, two
  classes with one logit), and the stopping rule is L-BFGS-B's.

numpy and scipy only.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.linalg import lapack

# Directions of the rows with a squared singular value below this share of the largest carry
# nothing a fit can use (standardised training rows are centred, so one is always ~0).
RANK_RTOL = 1e-10
# Projected-gradient tolerances (max |gradient| of the scaled objective, L-BFGS-B's ``gtol``).
# SKLEARN_GTOL is scikit-learn's default ``tol``: what a LogisticHead fit has always been
# converged to. It leaves the validation log-loss up to 9e-4 off near the best C (measured over
# 20 splits of the bundled catalog and digits) - more than the gap between neighbouring C - so
# :func:`.selection.sweep_c` re-fits the C it cannot rank to smaller ones (selection.LEVELS).
SKLEARN_GTOL = 1e-4
STALLED = 10  # L-BFGS steps in a row that leave the objective exactly unchanged: rounding-bound
# L-BFGS curvature pairs kept (scikit-learn's: 10). 20 took 15 % fewer iterations over the 20
# splits; with the compact form (_Memory) a pair costs little.
MEMORY = 20


class RowSpace:
    """Standardised training rows ``Z`` (``n x d``) in an orthonormal basis of their span.

    ``features``: ``F = Z V`` (``n x r``, ``r <= min(n, d)``) with ``V = Z^T U / s`` from the
    eigendecomposition ``Z Z^T = U s^2 U^T``. When ``n >= d`` nothing is gained and ``F = Z``.
    """

    def __init__(self, Z: np.ndarray) -> None:
        self.Z = np.asarray(Z, np.float64)
        n, d = self.Z.shape
        self.reduced = n < d
        if not self.reduced:
            self.features = self.Z
            return
        s2, U = np.linalg.eigh(self.Z @ self.Z.T)
        keep = s2 > RANK_RTOL * max(float(s2[-1]), np.finfo(np.float64).tiny)
        self._u_over_s = U[:, keep] / np.sqrt(s2[keep])  # U / s: F = Z Z^T U / s = U s
        self.features = U[:, keep] * np.sqrt(s2[keep])

    @property
    def rank(self) -> int:
        return int(self.features.shape[1])

    def project(self, Z_other: np.ndarray) -> np.ndarray:
        """Other standardised rows in the same coordinates: ``Z_other V``."""
        Z_other = np.asarray(Z_other, np.float64)
        if not self.reduced:
            return Z_other
        return np.asarray((Z_other @ self.Z.T) @ self._u_over_s)

    def coef(self, c: np.ndarray) -> np.ndarray:
        """Coefficients on the features (``W = c V^T``, ``k x d``) from coordinates ``c`` (``k x r``)."""
        if not self.reduced:
            return np.asarray(c)
        return np.asarray((c @ self._u_over_s.T) @ self.Z)


def _loss_grad(
    theta: np.ndarray, Fb: np.ndarray, FbT: np.ndarray, target: np.ndarray, sw_n: np.ndarray, l2: float, m: int
) -> tuple[float, np.ndarray]:
    """scikit-learn's lbfgs objective, ``sum_i sw_n_i CE_i + l2 / 2 ||W||^2`` (``sw_n`` sums to
    1, ``l2 = 1 / (C sum w)``), and its gradient. ``Fb`` is ``[F, 1]`` (the intercept's column)
    and ``FbT`` its transpose: logits are computed class-major (``[k, n]``), the layout in which
    the ``[m, r] x [r, n]`` products run fastest (3x, measured: a 9-row left operand is a poor
    GEMM shape the other way round); ``target`` holds the flat index of each row's true class
    in them. ``m = 1`` for two classes: one logit against a fixed 0, scikit-learn's binomial
    model."""
    Wb = theta.reshape(m, FbT.shape[0])
    z = Wb @ FbT
    if m == 1:
        z = np.concatenate([np.zeros_like(z), z], axis=0)
    z -= z.max(axis=0)
    e = np.exp(z)
    se = e.sum(axis=0)
    loss = float(sw_n @ (np.log(se) - z.ravel()[target]))
    e *= sw_n / se  # d loss / d logits = sw_n * (softmax - onehot)
    e.ravel()[target] -= sw_n
    G = e[1:] if m == 1 else e
    W = Wb[:, :-1]
    grad = G @ Fb
    grad[:, :-1] += l2 * W
    return loss + 0.5 * l2 * float(np.vdot(W, W)), grad.ravel()


class _Memory:
    """L-BFGS curvature pairs ``(s, y)`` of one objective, used in the compact form of the
    inverse Hessian (Byrd, Nocedal and Schnabel 1994; Nocedal and Wright eq. 7.24): a direction
    is four ``[k, P]`` products and a few ``k x k`` ones, not the two-loop recursion's ``4k``
    vector operations (which took longer than the loss itself, measured).

    The pairs live in a ring buffer (no copying as they come and go). ``R^-1`` (``R``: the upper
    triangle of ``s_i . y_j``), ``y_i . y_j`` and ``s_i . y_i`` are kept oldest first and
    updated per pair, not recomputed: dropping the oldest pair leaves the trailing block of an
    upper-triangular inverse, and a new last column ``[a; sy]`` of ``R`` adds the column
    ``[-R^-1 a / sy; 1 / sy]`` to it."""

    def __init__(self, size: int, S: np.ndarray, Y: np.ndarray) -> None:
        """``S``, ``Y``: ``[k, P]`` pairs, oldest first (``k <= size``; 0 for none yet)."""
        self.size, self.k, self.head = size, len(S), 0
        self.S, self.Y = np.zeros((size, S.shape[1])), np.zeros((size, S.shape[1]))
        self.S[: self.k], self.Y[: self.k] = S, Y
        if self.k:
            self.r_inv = lapack.dtrtri(np.triu(S @ Y.T), lower=0)[0]
            self.yy = Y @ Y.T
            self.d = np.einsum("ij,ij->i", S, Y)

    def __len__(self) -> int:
        return self.k

    def _products(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(S v, Y v)``, oldest pair first."""
        if self.k < self.size:
            return self.S[: self.k] @ v, self.Y[: self.k] @ v
        order = (self.head + np.arange(self.k)) % self.size
        return (self.S @ v)[order], (self.Y @ v)[order]

    def add(self, s: np.ndarray, y: np.ndarray) -> None:
        sy = float(s @ y)
        if not sy > 1e-10 * float(y @ y):  # convex objective: only rounding makes s.y <= 0
            return
        a, c = self._products(y)
        r_inv, yy, d = (self.r_inv, self.yy, self.d) if self.k else (np.zeros((0, 0)),) * 2 + (np.zeros(0),)
        if self.k == self.size:  # drop the oldest: its slot takes the new pair
            a, c, r_inv, yy, d = a[1:], c[1:], r_inv[1:, 1:], yy[1:, 1:], d[1:]
            slot, self.head = self.head, (self.head + 1) % self.size
        else:
            slot, self.k = self.k, self.k + 1
        k = len(a)
        self.r_inv = np.zeros((k + 1, k + 1))
        self.r_inv[:k, :k] = r_inv
        self.r_inv[:k, k] = -(r_inv @ a) / sy
        self.r_inv[k, k] = 1.0 / sy
        self.yy = np.empty((k + 1, k + 1))
        self.yy[:k, :k] = yy
        self.yy[:k, k] = self.yy[k, :k] = c
        self.yy[k, k] = float(y @ y)
        self.d = np.append(d, sy)
        self.S[slot], self.Y[slot] = s, y

    def clear(self) -> None:
        self.k = self.head = 0

    def moved(self, dl2: float, penalised: np.ndarray) -> _Memory:
        """The same pairs for the objective whose penalty strength ``l2`` changed by ``dl2``. The
        loss is unchanged and the penalty is quadratic, so ``y`` changes by exactly
        ``dl2 * s`` on the penalised coordinates: a warm start keeps its curvature too."""
        order = (self.head + np.arange(self.k)) % self.size
        S = self.S[order]
        Y = self.Y[order] + dl2 * (S * penalised)
        ok = np.einsum("ij,ij->i", S, Y) > 1e-10 * np.einsum("ij,ij->i", Y, Y)
        return _Memory(self.size, S[ok], Y[ok])

    def direction(self, g: np.ndarray) -> np.ndarray:
        """``-H g``; steepest descent of unit length when there are no pairs yet."""
        if not self.k:
            return -g / max(float(np.sqrt(g @ g)), 1e-300)
        gamma = self.d[-1] / self.yy[-1, -1]  # initial inverse Hessian: s.y / y.y of the newest pair
        p, q = self._products(g)
        u = self.r_inv @ p
        v = self.r_inv.T @ (self.d * u + gamma * (self.yy @ u) - gamma * q)
        if self.k < self.size:
            return -(gamma * g + v @ self.S[: self.k] - gamma * (u @ self.Y[: self.k]))
        ring = np.empty((2, self.k))
        ring[:, (self.head + np.arange(self.k)) % self.size] = v, -gamma * u
        return -(gamma * g + ring[0] @ self.S + ring[1] @ self.Y)


def _lbfgs(
    fun: Callable[[np.ndarray], tuple[float, np.ndarray]],
    x: np.ndarray,
    mem: _Memory,
    *,
    gtol: float,
    max_iter: int,
    scale: np.ndarray | None = None,
) -> tuple[np.ndarray, int]:
    """Minimise a smooth convex ``fun`` from ``x`` until ``max |gradient| <= gtol`` (L-BFGS-B's
    criterion, scikit-learn's ``tol``); updates ``mem``. ``scale``: a diagonal inverse Hessian
    for the first step, before there is any curvature (else a step of unit length, doubled while
    it still decreases).

    Own code rather than ``scipy.optimize.minimize``: with 2,000 unknowns L-BFGS-B's bound
    handling and scipy's wrappers took longer than the loss itself (1.1 ms vs 0.7 ms a call on
    the loaded development machine), and a warm start here keeps its curvature
    (:meth:`_Memory.moved`). The line search backtracks from the L-BFGS step (Armijo). There is
    no relative-decrease stop (L-BFGS-B's ``ftol``): with a strong penalty the objective is a
    large constant plus changes below its rounding while the gradient still falls (measured: it
    stopped fits at 1e-6 asked for 1e-9), so only STALLED steps in a row without any decrease
    stop a fit early."""
    f, g = fun(x)
    nit = stalled = 0
    while nit < max_iter and float(np.abs(g).max()) > gtol and stalled < STALLED:
        nit += 1
        d = -g * scale if scale is not None and not len(mem) else mem.direction(g)
        gd = float(g @ d)
        if not gd < 0:  # rounding spoilt the memory: start it again
            mem.clear()
            d = mem.direction(g)
            gd = float(g @ d)
        t, grow = 1.0, not len(mem) and scale is None  # no curvature at all: also try longer steps
        for _ in range(50):  # backtracking (Armijo, c1 = 1e-4; L-BFGS-B: maxls 50)
            f_new, g_new = fun(x + t * d)
            if f_new <= f + 1e-4 * t * gd:
                break
            grow = False
            curv = f_new - f - gd * t  # quadratic model through f, f' and f_new
            t = min(max(-gd * t * t / (2 * curv), 0.1 * t), 0.5 * t) if curv > 0 else 0.5 * t
        else:
            break  # no decrease along d: as converged as rounding allows
        for _ in range(50 if grow else 0):
            f_up, g_up = fun(x + 2 * t * d)
            if not f_up < f_new:
                break
            t, f_new, g_new = 2 * t, f_up, g_up
        mem.add(t * d, g_new - g)
        stalled = stalled + 1 if f_new >= f else 0
        x, f, g = x + t * d, f_new, g_new
    return x, nit


class LogisticPath:
    """Multinomial logistic regression on ``F`` (``n x r``) for any number of C, warm-started.

    ``y_idx``: class index per row in ``0..k-1``; ``sw``: one weight per row (class weights).
    Every solution is kept, so the next fit starts from the nearest C solved (in log C).
    """

    def __init__(self, F: np.ndarray, y_idx: np.ndarray, k: int, sw: np.ndarray, *, max_iter: int = 1000) -> None:
        self.Fb = np.hstack([np.asarray(F, np.float64), np.ones((len(F), 1))])
        self.FbT = np.ascontiguousarray(self.Fb.T)
        self.k, self.m = k, (1 if k == 2 else k)
        self.target = np.asarray(y_idx, np.intp) * len(F) + np.arange(len(F))  # into [k, n] logits
        sw = np.asarray(sw, np.float64)
        self.sw_sum = float(sw.sum())
        self.sw_n = sw / self.sw_sum
        self.max_iter = max_iter
        self.penalised = np.ones((self.m, self.Fb.shape[1]))
        self.penalised[:, -1] = 0.0  # the intercepts
        self.penalised = self.penalised.ravel()
        self.solved: dict[float, tuple[np.ndarray, _Memory, float]] = {}  # log10 C -> (theta, memory, l2)
        self.n_iter = 0  # L-BFGS iterations over all fits

    def fit(self, C: float, gtol: float = SKLEARN_GTOL) -> tuple[np.ndarray, np.ndarray]:
        """``(coef [m x r], intercept [m])`` at ``C``, from the nearest C solved so far (or from
        this C's own earlier, looser solution: a re-fit to a smaller ``gtol`` continues it)."""
        log_c = float(np.log10(C))
        l2 = 1.0 / (C * self.sw_sum)
        scale = None
        if self.solved:
            theta, mem, l2_then = self.solved[min(self.solved, key=lambda k: (abs(k - log_c), k))]
            mem = mem.moved(l2 - l2_then, self.penalised)
        else:
            theta, scale = self._first_start(l2)
            mem = _Memory(MEMORY, np.zeros((0, len(theta))), np.zeros((0, len(theta))))
        args = (self.Fb, self.FbT, self.target, self.sw_n, l2, self.m)
        theta, nit = _lbfgs(
            lambda th: _loss_grad(th, *args), theta, mem, gtol=gtol, max_iter=self.max_iter, scale=scale
        )
        self.solved[log_c] = (theta, mem, l2)
        self.n_iter += nit
        Wb = theta.reshape(self.m, self.Fb.shape[1])
        return Wb[:, :-1], Wb[:, -1]

    def _first_start(self, l2: float) -> tuple[np.ndarray, np.ndarray]:
        """One Newton step from 0 with the Hessian's diagonal - exact in the row space, whose
        columns are orthogonal: at 0 every probability is ``1/k``, so the loss's curvature there
        is ``sum_i sw_n_i F_ij^2`` times ``1/k`` (``1/4`` for one binomial logit). Kept if it
        beats 0 (it saves the iterations L-BFGS spends finding the scale of the solution), and
        the inverse diagonal scales the first L-BFGS step."""
        zero = np.zeros(self.m * self.Fb.shape[1])
        args = (self.Fb, self.FbT, self.target, self.sw_n, l2, self.m)
        f0, g0 = _loss_grad(zero, *args)
        h = (self.sw_n @ (self.Fb * self.Fb)) * (0.25 if self.m == 1 else 1.0 / self.k)
        scale = 1.0 / (np.tile(h, self.m) + l2 * self.penalised)
        step = -g0 * scale
        return (step if _loss_grad(step, *args)[0] < f0 else zero), scale

    def logits(self, F_other: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
        """``[N, k]`` logits (two classes: ``[0, z]``) of rows in the same coordinates."""
        z = np.asarray(F_other, np.float64) @ coef.T + intercept
        return np.concatenate([np.zeros_like(z), z], axis=1) if self.m == 1 else z


def fit_in_row_space(
    Z: np.ndarray, y_idx: np.ndarray, k: int, sw: np.ndarray, C: float, max_iter: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """One fit on standardised rows ``Z`` (``n < d``) to scikit-learn's default tolerance:
    ``(coef [m x d], intercept [m], iterations)``, shaped like ``LogisticRegression``'s
    (``m = 1`` for two classes). :class:`.estimators.LogisticHead`'s CPU solver."""
    space = RowSpace(Z)
    path = LogisticPath(space.features, y_idx, k, sw, max_iter=max_iter)
    c, intercept = path.fit(C)
    return space.coef(c), intercept, path.n_iter
