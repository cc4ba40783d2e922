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
