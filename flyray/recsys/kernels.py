"""Compiled inner loops of FunkSVD (numba).

numba, because the SGD update is a sequential loop over ratings with random row access that no
vectorised library expresses, and numba compiles it to SIMD machine code from plain Python with
no build step (Cython would need a compiler in every image; Surprise itself is Cython).
Every kernel updates arrays in place and releases the GIL.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, fastmath=True, cache=True)
def sgd_epoch(
    users: np.ndarray,
    items: np.ndarray,
    ratings: np.ndarray,
    order: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    bu: np.ndarray,
    bi: np.ndarray,
    global_mean: float,
    lr: float,
    reg: float,
    biased: bool,
) -> float:
    """One pass of SGD over ratings[order], Surprise's update rule; returns the summed squared
    error seen before each update."""
    k = P.shape[1]
    # All arithmetic in float32, like the factors, so that the loops over k vectorise.
    mu = np.float32(global_mean) if biased else np.float32(0.0)
    lr32 = np.float32(lr)
    reg32 = np.float32(reg)
    sse = 0.0
    for n in range(order.shape[0]):
        idx = order[n]
        u = users[idx]
        i = items[idx]
        pu = P[u]
        qi = Q[i]
        dot = np.float32(0.0)
        for f in range(k):
            dot += pu[f] * qi[f]
        pred = dot + mu
        if biased:
            pred += bu[u] + bi[i]
        err = np.float32(ratings[idx] - pred)
        sse += err * err
        if biased:
            bu[u] += lr32 * (err - reg32 * bu[u])
            bi[i] += lr32 * (err - reg32 * bi[i])
        for f in range(k):
            puf = pu[f]
            qif = qi[f]
            pu[f] = puf + lr32 * (err * qif - reg32 * puf)
            qi[f] = qif + lr32 * (err * puf - reg32 * qif)
    return sse


@numba.njit(nogil=True, fastmath=True, cache=True)
def predict(
    users: np.ndarray,
    items: np.ndarray,
    P: np.ndarray,
    Q: np.ndarray,
    bu: np.ndarray,
    bi: np.ndarray,
    global_mean: float,
    biased: bool,
    lo: float,
    hi: float,
) -> np.ndarray:
    """Clipped predictions; a negative index (unknown user or item) contributes nothing."""
    out = np.empty(users.shape[0], dtype=np.float32)
    k = P.shape[1]
    for n in range(users.shape[0]):
        u = users[n]
        i = items[n]
        pred = global_mean if biased else 0.0
        if biased and u >= 0:
            pred += bu[u]
        if biased and i >= 0:
            pred += bi[i]
        if u >= 0 and i >= 0:
            for f in range(k):
                pred += P[u, f] * Q[i, f]
        out[n] = min(max(pred, lo), hi)
    return out


@numba.njit(nogil=True, cache=True)
def sample_negatives(
    users: np.ndarray,
    cdf: np.ndarray,
    seen_indptr: np.ndarray,
    seen_items: np.ndarray,
    seed: int,
    out: np.ndarray,
) -> None:
    """out[n] = an item drawn from the distribution whose cumulative weights are `cdf`, redrawn
    (up to 16 times) while it is one of users[n]'s seen items (sorted per user in the CSR
    seen_indptr/seen_items). Deterministic for a seed: numba's generator, seeded here, serves
    this thread only."""
    np.random.seed(seed)
    total = cdf[-1]
    n_items = cdf.shape[0]
    for n in range(users.shape[0]):
        u = users[n]
        lo_seen = seen_indptr[u]
        hi_seen = seen_indptr[u + 1]
        item = 0
        for _ in range(16):
            item = min(np.searchsorted(cdf, np.random.random() * total, side="right"), n_items - 1)
            k = np.searchsorted(seen_items[lo_seen:hi_seen], item)
            if k == hi_seen - lo_seen or seen_items[lo_seen + k] != item:
                break
        out[n] = item


@numba.njit(nogil=True, fastmath=True, cache=True)
def ials_solve(
    indptr: np.ndarray,
    indices: np.ndarray,
    confidence: np.ndarray,
    X: np.ndarray,
    Y: np.ndarray,
    gram: np.ndarray,
    cg_steps: int,
) -> float:
    """One iALS half-step for the rows of X (Hu, Koren, Volinsky 2008), solved in place by
    conjugate gradient warm-started at the current X, as in Takacs et al. 2011 and `implicit`.

    Row u minimises sum_i c_ui (p_ui - x_u . y_i)^2 + reg |x_u|^2 over every item, with
    p_ui = 1, c_ui = 1 + confidence on the row's items and p_ui = 0, c_ui = 1 elsewhere. The
    normal equations (Y'Y + reg I + sum_i (c_ui - 1) y_i y_i') x_u = sum_i c_ui y_i only touch
    the row's items once `gram` = Y'Y + reg I is known (the Gramian trick). Returns the summed
    squared residual norm left by the solves."""
    k = X.shape[1]
    r = np.empty(k, np.float64)
    p = np.empty(k, np.float64)
    ap = np.empty(k, np.float64)
    x = np.empty(k, np.float64)
    residual = 0.0
    for u in range(X.shape[0]):
        for f in range(k):
            x[f] = X[u, f]
        # r = b - A x
        for f in range(k):
            acc = 0.0
            for g in range(k):
                acc += gram[f, g] * x[g]
            r[f] = -acc
        for n in range(indptr[u], indptr[u + 1]):
            y = Y[indices[n]]
            c1 = confidence[n]
            dot = 0.0
            for f in range(k):
                dot += y[f] * x[f]
            coef = (1.0 + c1) - c1 * dot
            for f in range(k):
                r[f] += coef * y[f]
        rs_old = 0.0
        for f in range(k):
            p[f] = r[f]
            rs_old += r[f] * r[f]
        for _ in range(cg_steps):
            if rs_old < 1e-20:
                break
            for f in range(k):
                acc = 0.0
                for g in range(k):
                    acc += gram[f, g] * p[g]
                ap[f] = acc
            for n in range(indptr[u], indptr[u + 1]):
                y = Y[indices[n]]
                dot = 0.0
                for f in range(k):
                    dot += y[f] * p[f]
                coef = confidence[n] * dot
                for f in range(k):
                    ap[f] += coef * y[f]
            pap = 0.0
            for f in range(k):
                pap += p[f] * ap[f]
            step = rs_old / pap
            rs_new = 0.0
            for f in range(k):
                x[f] += step * p[f]
                r[f] -= step * ap[f]
                rs_new += r[f] * r[f]
            for f in range(k):
                p[f] = r[f] + (rs_new / rs_old) * p[f]
            rs_old = rs_new
        residual += rs_old
        for f in range(k):
            X[u, f] = x[f]
    return residual
