"""Compiled (numba) route of the stateful select → softmax → observe recurrence, for CPU tensors.

The same function as the pure-PyTorch reference route in :mod:`alisa.attention` (the
semantics in ``docs/semantics.md``): for each query of a block, in order, select the keys
(the k most recent plus the top-k of the policy's score among eligible keys, ties to the
more recent slot; a dense row when 2k >= n), softmax the given logits over them, sum the
probabilities over heads and feed that row back into the policy state, so the next
query's selection sees it. One query costs O(C + H·K) scalar work instead of ~40-130
PyTorch calls; top-k is an O(C) partition with the tie rule resolved at the threshold.

Everything here works on numpy views of the torch tensors (``Tensor.numpy()`` shares
memory): the policy state is updated in place. ``available()`` says whether numba
imports; :func:`alisa.attention.attend_with_feedback` falls back to the reference route
with one warning line when it does not.
"""

from __future__ import annotations

import os

import numpy as np

try:  # pragma: no cover - exercised by the fallback test
    import numba
    from numba import njit, prange

    # numba's OpenMP layer would load a second OpenMP runtime beside PyTorch's, whose idle
    # threads spin against PyTorch's on a small machine; the work-queue layer does not spin.
    if os.environ.get("NUMBA_THREADING_LAYER") is None:
        numba.config.THREADING_LAYER = "workqueue"
except ImportError:  # pragma: no cover
    numba = None

H2O, SWA = 0, 1  # kernel kinds; the state arrays each one uses are listed in run()


def available() -> bool:
    return numba is not None


if numba is not None:

    @njit(cache=True, inline="always")
    def _half(n, p, q, budget):
        """k = max(1, round(r·n/2)) with r = p/q (round half up), or max(1, round(B/2))."""
        if budget >= 0:
            k = (budget + 1) // 2
        else:
            k = (p * n + q) // (2 * q)
        return max(1, k)

    @njit(cache=True)
    def _select(keep, pos, t, k, score, elig, kind, window, dense_all, scratch):
        """keep[:] = the keys of the query at t (bool row over C slots). Returns the count."""
        C = pos.shape[0]
        n = t + 1
        if dense_all or 2 * k >= n:
            for c in range(C):
                keep[c] = pos[c] >= 0 and pos[c] <= t
        else:
            m = 0
            for c in range(C):
                pc = pos[c]
                causal = pc >= 0 and pc <= t
                recent = causal and pc > t - k
                keep[c] = recent
                if causal and not recent:
                    ok = elig[c] > 0 if kind == SWA else not elig[c]
                    if ok:
                        scratch[m] = score[c]
                        m += 1
            if m <= k:  # every candidate
                thr = -np.inf
                need = m
            else:  # the k-th largest score; ties at it go to the more recent slots
                part = np.partition(scratch[:m], m - k)
                thr = part[m - k]
                greater = 0
                for j in range(m):
                    if scratch[j] > thr:
                        greater += 1
                need = k - greater
            for c in range(C - 1, -1, -1):
                pc = pos[c]
                if pc >= 0 and pc <= t - k:
                    ok = elig[c] > 0 if kind == SWA else not elig[c]
                    if ok:
                        s = score[c]
                        if s > thr:
                            keep[c] = True
                        elif s == thr and need > 0:
                            keep[c] = True
                            need -= 1
        count = 0
        for c in range(C):
            if keep[c] and window >= 0 and t - pos[c] >= window:
                keep[c] = False
            if keep[c]:
                count += 1
        return count

    @njit(cache=True)
    def _softmax(probs, logits, scale, idx, m, row):
        """probs[h] = softmax over the columns idx[:m] of logits[h] (zero elsewhere);
        row[c] = Σ_h probs[h, c] for those columns."""
        H = logits.shape[0]
        probs[:, :] = 0.0
        for j in range(m):
            row[idx[j]] = 0.0
        for h in range(H):
            mx = -np.inf
            for j in range(m):
                v = logits[h, idx[j]] * scale  # float32 x float32, rounded as PyTorch rounds it
                if v > mx:
                    mx = v
            s = 0.0
            for j in range(m):
                e = np.exp(np.float32(logits[h, idx[j]] * scale - mx))
                probs[h, idx[j]] = e
                s += e
            inv = 1.0 / s
            for j in range(m):
                c = idx[j]
                p = np.float32(probs[h, c] * inv)
                probs[h, c] = p
                row[c] += p

    _A = "float32[:,:,:,:], float32, int64[:,:], int64[:,:], int64, int64, int64, int64, boolean, int64, boolean[:,:,:]"
    _SIGS = [f"void(int64, {_A}, float64[:,:], {elig}[:,:], float32[:,:,:], int64[:,:], float32[:,:,:,:], boolean[:,:,:])"
             for elig in ("boolean", "int32")]  # h2o, swa; one layout ('A') each: two compilations in all

    @njit(_SIGS, cache=True, parallel=True)
    def run(kind, logits, scale, pos, qpos, p, q, budget, window, dense_all, mode, given,
            score, elig, ring, ring_q, probs, keep_out):
        """One block of queries, every row of the batch in parallel.

        logits (B, H, Q, C) float32, unscaled (unused when mode == 1), pos (B, C) int64, qpos (B, Q)
        int64 (-1: padding query). mode 0: select, softmax, observe; 1: select only (into
        keep_out); 2: softmax + observe of the selection ``given`` (B, Q, C).
        State: h2o: score = acc (B, C) f64, elig = evicted (B, C) bool; swa: score = S (B, C)
        f64, elig = nz (B, C) int32, ring (B, R, C) float32, ring_q (B, R) int64.
        Outputs (every entry written): probs (B, H, Q, C) float32 (zero outside the selection; a padding query
        attends every column), keep_out (B, Q, C) bool.
        """
        B, C = pos.shape
        Q = qpos.shape[1]
        for b in prange(B):
            scratch = np.empty(C, np.float64)
            idx = np.empty(C, np.int64)
            row = np.zeros(C, np.float32)
            for i in range(Q):
                t = qpos[b, i]
                keep = keep_out[b, i]
                if t < 0:
                    keep[:] = False
                    if mode != 1:
                        for c in range(C):
                            idx[c] = c
                        _softmax(probs[b, :, i], logits[b, :, i], scale, idx, C, row)
                    continue
                k = _half(t + 1, p, q, budget)
                if mode == 2:
                    keep[:] = given[b, i]
                else:
                    _select(keep, pos[b], t, k, score[b], elig[b], kind, window, dense_all, scratch)
                if mode == 1:
                    continue
                m = 0
                for c in range(C):
                    if keep[c]:
                        idx[m] = c
                        m += 1
                _softmax(probs[b, :, i], logits[b, :, i], scale, idx, m, row)
                # observe: the row (zero outside the selection) enters the policy state
                if kind == H2O:
                    for j in range(m):
                        score[b, idx[j]] += row[idx[j]]
                    for c in range(C):
                        pc = pos[b, c]
                        if pc >= 0 and pc <= t and not keep[c]:
                            elig[b, c] = True
                else:
                    R = ring.shape[1]
                    st = t % R
                    ring[b, st, :] = 0.0
                    for j in range(m):
                        c = idx[j]
                        v = row[c]
                        score[b, c] += v
                        if v > 0:
                            elig[b, c] += 1
                        ring[b, st, c] = v
                    ring_q[b, st] = t
                    left_now = t - k
                    left_next = t + 1 - _half(t + 2, p, q, budget)
                    if left_next > left_now and left_now >= 0:
                        sl = left_now % R
                        if ring_q[b, sl] == left_now:
                            for c in range(C):
                                v = ring[b, sl, c]
                                if v != 0.0:
                                    score[b, c] -= v
                                    if v > 0:
                                        elig[b, c] -= 1
                            ring_q[b, sl] = -1
