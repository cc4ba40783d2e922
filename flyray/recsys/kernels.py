"""Compiled inner loops of FunkSVD (numba).

numba, because the SGD update is a sequential loop over ratings with random row access that no
vectorised library expresses, and numba compiles it to SIMD machine code from plain Python with
no build step (Cython would need a compiler in every image; Surprise itself is Cython).
Every kernel updates arrays in place and releases the GIL.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(nogil=True, cache=True)
def gather_runs(
    values: np.ndarray, starts: np.ndarray, lengths: np.ndarray, perm: np.ndarray, out: np.ndarray
) -> None:
    """out = the runs values[starts[p] : starts[p] + lengths[p]] for p in perm, concatenated
    (numpy would build two index arrays of out's length to do it)."""
    pos = 0
    for p in perm:
        for s in range(starts[p], starts[p] + lengths[p]):
            out[pos] = values[s]
            pos += 1


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
def alias_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table of a discrete distribution (Vose's construction): draw column k
    uniformly, keep it with probability prob[k], else take alias[k]. O(1) a draw, where a
    binary search of the cumulative weights took 150 ns (a fifth of an epoch at 1M events)."""
    n = weights.shape[0]
    prob = weights * (n / weights.sum())
    alias = np.arange(n)
    small = np.empty(n, np.int64)
    large = np.empty(n, np.int64)
    ns = nl = 0
    for k in range(n):
        if prob[k] < 1.0:
            small[ns] = k
            ns += 1
        else:
            large[nl] = k
            nl += 1
    while ns > 0 and nl > 0:
        ns -= 1
        s = small[ns]
        g = large[nl - 1]
        alias[s] = g
        prob[g] -= 1.0 - prob[s]
        if prob[g] < 1.0:
            nl -= 1
            small[ns] = g
            ns += 1
    for k in range(nl):
        prob[large[k]] = 1.0
    for k in range(ns):
        prob[small[k]] = 1.0
    return prob, alias


@numba.njit(inline="always")
def _splitmix64(state: np.uint64) -> tuple[np.uint64, float]:
    """(next state, a uniform float in [0, 1)): SplitMix64, a few ns a draw where numba's
    np.random takes 45 ns; the stream depends only on the seed."""
    state = state + np.uint64(0x9E3779B97F4A7C15)
    z = state
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return state, float(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@numba.njit(nogil=True, cache=True)
def sample_negatives(
    users: np.ndarray,
    prob: np.ndarray,
    alias: np.ndarray,
    seen_indptr: np.ndarray,
    seen_items: np.ndarray,
    seed: int,
    out: np.ndarray,
) -> None:
    """out[n] = an item drawn from the distribution of the alias table (prob, alias), redrawn
    (up to 16 times) while it is one of users[n]'s seen items (sorted per user in the CSR
    seen_indptr/seen_items). One uniform draw picks the column (its integer part, scaled) and
    the coin (its fractional part). Deterministic for a seed."""
    state = np.uint64(seed)
    n_items = prob.shape[0]
    for n in range(users.shape[0]):
        u = users[n]
        item = 0
        for _ in range(16):
            state, x = _splitmix64(state)
            x *= n_items
            k = min(int(x), n_items - 1)
            item = k if x - k < prob[k] else alias[k]
            lo, hi = seen_indptr[u], seen_indptr[u + 1]
            while lo < hi:  # binary search of the user's sorted seen items
                mid = (lo + hi) // 2
                if seen_items[mid] < item:
                    lo = mid + 1
                else:
                    hi = mid
            if lo == seen_indptr[u + 1] or seen_items[lo] != item:
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


@numba.njit(inline="always")
def _before(s1: float, j1: int, s2: float, j2: int) -> bool:
    """Rank order: the higher score first, the lower item row on a tie."""
    return s1 > s2 or (s1 == s2 and j1 < j2)


@numba.njit(inline="always")
def _sift_down(scores: np.ndarray, items: np.ndarray, i: int, size: int) -> None:
    """Restore the heap below i: the worst-ranked entry sits at the root."""
    while True:
        child = 2 * i + 1
        if child >= size:
            return
        if child + 1 < size and _before(scores[child], items[child], scores[child + 1],
                                        items[child + 1]):  # fmt: skip
            child += 1
        if not _before(scores[i], items[i], scores[child], items[child]):
            return
        scores[i], scores[child] = scores[child], scores[i]
        items[i], items[child] = items[child], items[i]
        i = child


@numba.njit(nogil=True, cache=True)
def top_n(
    product: np.ndarray,
    rows: np.ndarray,
    row_bias: np.ndarray,
    item_base: np.ndarray,
    seen_indptr: np.ndarray,
    seen_items: np.ndarray,
    out_items: np.ndarray,
    out_scores: np.ndarray,
) -> None:
    """Per line b of `product` (a block of user x item dot products, overwritten): the n best
    items by product + row_bias[b] + item_base, best first, leaving out the items of user row
    rows[b] in the CSR seen_indptr/seen_items (none for rows[b] = -1). A bounded heap per line:
    O(items x log n), no sort of the whole line. Lines where fewer than n items remain get -1."""
    n = out_items.shape[1]
    n_items = product.shape[1]
    for b in range(product.shape[0]):
        line = product[b]
        row = rows[b]
        if row >= 0:
            for s in range(seen_indptr[row], seen_indptr[row + 1]):
                line[seen_items[s]] = -np.inf
        heap_s = out_scores[b]
        heap_i = out_items[b]
        size = 0
        bias = row_bias[b]
        j = 0
        while size < n and j < n_items:  # fill the heap with the first n unseen items
            if line[j] != -np.inf:
                # Sift up: the new entry climbs while it ranks below its parent.
                i = size
                size += 1
                heap_s[i], heap_i[i] = line[j] + bias + item_base[j], j
                while i > 0:
                    parent = (i - 1) // 2
                    if not _before(heap_s[parent], heap_i[parent], heap_s[i], heap_i[i]):
                        break
                    heap_s[i], heap_s[parent] = heap_s[parent], heap_s[i]
                    heap_i[i], heap_i[parent] = heap_i[parent], heap_i[i]
                    i = parent
            j += 1
        # Items come in ascending order, so one that only ties the worst kept ranks after it:
        # a single comparison per item (seen items score -inf and never pass it).
        worst = heap_s[0] if size == n else np.inf
        for item in range(j, n_items):
            score = line[item] + bias + item_base[item]
            if score > worst:
                heap_s[0], heap_i[0] = score, item
                _sift_down(heap_s, heap_i, 0, size)
                worst = heap_s[0]
        # Heap sort in place: the root (worst) goes to the end each time, so best ends first.
        for end in range(size - 1, 0, -1):
            heap_s[0], heap_s[end] = heap_s[end], heap_s[0]
            heap_i[0], heap_i[end] = heap_i[end], heap_i[0]
            _sift_down(heap_s, heap_i, 0, end)
        for i in range(size, n):
            heap_s[i], heap_i[i] = -np.inf, -1


@numba.njit(nogil=True, cache=True)
def ranking_metrics(
    recs: np.ndarray, rows: np.ndarray, relevant_indptr: np.ndarray, relevant: np.ndarray
) -> np.ndarray:
    """Per user b (top-k item rows recs[b], held-out items of user row rows[b] sorted in the
    CSR relevant_indptr/relevant): precision@k, recall@k, NDCG@k and average precision@k
    (normalised by min(held-out, k)), as columns of a (users, 4) array."""
    k = recs.shape[1]
    out = np.zeros((recs.shape[0], 4))
    for b in range(recs.shape[0]):
        lo = relevant_indptr[rows[b]]
        hi = relevant_indptr[rows[b] + 1]
        if hi == lo:
            continue
        hits = 0
        dcg = 0.0
        ap = 0.0
        for p in range(k):
            item = recs[b, p]
            pos = lo + np.searchsorted(relevant[lo:hi], item)
            if item >= 0 and pos < hi and relevant[pos] == item:
                hits += 1
                dcg += 1.0 / np.log2(p + 2.0)
                ap += hits / (p + 1.0)
        ideal = 0.0
        top = min(hi - lo, k)
        for p in range(top):
            ideal += 1.0 / np.log2(p + 2.0)
        out[b, 0] = hits / k
        out[b, 1] = hits / (hi - lo)
        out[b, 2] = dcg / ideal
        out[b, 3] = ap / top
    return out
