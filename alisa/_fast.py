"""Compiled (numba) route of the stateful select → attend → observe recurrence, for CPU tensors.

The same function as the pure-PyTorch reference route in :mod:`alisa.attention` (the
semantics in ``docs/semantics.md``): for each query of a block, in order, select the keys
(the k most recent plus the top-k of the policy's score among eligible keys, ties to the
more recent slot; a dense row when 2k >= n), attend those keys only (q·k, one softmax, P·V:
O(H·K·D) work where a dense matmul costs O(H·C·D)), sum the probabilities over heads and
feed that row back into the policy state, so the next query's selection sees it. Top-k is
an O(C) partition with the tie rule resolved at the threshold. The reference route computes
the logits with one matmul; here they are float32 dot products in another order, so logits
differ by float rounding (~1e-7 relative) and a near-tie can in principle flip a selection
(measured: none of 789,690 on SmolLM2, ``scripts/bench_core.py``).

Everything here works on numpy views of the torch tensors (``Tensor.numpy()`` shares
memory): the policy state is updated in place. ``available()`` says whether numba
imports; :func:`alisa.attention.attend_with_feedback` falls back to the reference route
with one warning line when it does not.
"""

from __future__ import annotations

import numpy as np

try:  # pragma: no cover - exercised by the fallback test
    import numba
    from numba import njit, prange

    # Threading layer: numba's own choice (tbb, OpenMP, else its work queue; NUMBA_THREADING_LAYER
    # overrides). Not the work queue by force: ~120 us per call against OpenMP's ~2 us, and the
    # kernel ~2x slower inside a decode step (NOTES.md, session 8).
except ImportError:  # pragma: no cover
    numba = None

H2O, SWA, TOVA, SNAPKV = 0, 1, 2, 3  # kernel kinds; the state arrays each one uses are listed in attend()
AHEAD = 8  # kept key rows the attention loops ask the CPU to load ahead (software prefetch)
PREFETCH = False  # whether the prefetch hint compiled (else it is a no-op: same results, slower)


def available() -> bool:
    return numba is not None


if numba is not None:
    from llvmlite import binding as _llvm
    from llvmlite import ir as _ir
    from numba import types as _types
    from numba.core import cgutils as _cg
    from numba.extending import intrinsic as _intrinsic

    @_intrinsic
    def _prefetch_hint(typingctx, arr, h, c, d):
        """Ask the CPU to load the cache line of arr[h, c, d] (``llvm.prefetch``: read, keep in
        every cache level). The kept keys are scattered columns, which the hardware prefetcher
        does not follow: hinting row j + AHEAD while row j computes took the kernel from ~92 to
        ~72 ns per kept key row (SmolLM2 shape, 73% of the slots kept, cold, one thread)."""
        def codegen(context, builder, signature, args):
            aryty = signature.args[0]
            ary = context.make_array(aryty)(context, builder, args[0])
            ptr = _cg.get_item_pointer(context, builder, aryty, ary, list(args[1:]), wraparound=False)
            i8p = builder.bitcast(ptr, _ir.IntType(8).as_pointer())
            i32 = _ir.IntType(32)
            name = "llvm.prefetch.p0" if _llvm.llvm_version_info[0] >= 15 else "llvm.prefetch.p0i8"
            fn = _cg.get_or_insert_function(builder.module, _ir.FunctionType(_ir.VoidType(), [i8p.type, i32, i32, i32]), name)
            builder.call(fn, [i8p, i32(0), i32(3), i32(1)])
            return context.get_dummy_value()
        return _types.void(arr, h, c, d), codegen

    @njit(cache=True, inline="always")
    def _prefetch_row(arr, h, c):
        for d in range(0, arr.shape[2], 16):  # 16 float32 = one 64-byte line
            _prefetch_hint(arr, h, c, d)

    try:  # an llvmlite whose LLVM names the intrinsic otherwise: run without the hint
        _prefetch_row(np.zeros((1, 1, 16), np.float32), 0, 0)
        PREFETCH = True
    except Exception:  # noqa: BLE001 - the hint is an optimisation, never a failure
        @njit(cache=True, inline="always")
        def _prefetch_row(arr, h, c):
            pass

    @njit(cache=True, inline="always")
    def _half(n, p, q, budget):
        """k = max(1, round(r·n/2)) with r = p/q (round half up), or max(1, round(B/2))."""
        if budget >= 0:
            k = (budget + 1) // 2
        else:
            k = (p * n + q) // (2 * q)
        return max(1, k)

    @njit(cache=True, inline="always")
    def _full(n, p, q, budget):
        """K = max(1, round(r·n)) with r = p/q (round half up), or min(n, B)."""
        if budget >= 0:
            return min(n, budget)
        return max(1, (2 * p * n + q) // (2 * q))

    @njit(cache=True)
    def _kth_smallest(a, m, kth):
        """The kth smallest (0-based) of a[:m], in place (Hoare's selection, no allocation):
        afterwards a[:kth] <= a[kth] <= a[kth + 1:m]."""
        lo, hi = 0, m - 1
        while lo < hi:
            x, y, z = a[lo], a[(lo + hi) >> 1], a[hi]
            pivot = max(min(x, y), min(max(x, y), z))  # median of three
            i, j = lo, hi
            while i <= j:
                while a[i] < pivot:
                    i += 1
                while a[j] > pivot:
                    j -= 1
                if i <= j:
                    a[i], a[j] = a[j], a[i]
                    i += 1
                    j -= 1
            if kth <= j:
                hi = j
            elif kth >= i:
                lo = i
            else:
                break
        return a[kth]

    @njit(cache=True)
    def _top(vals, m, kk, scratch, top):
        """top[j] (j < m) = whether vals[j] is among the kk largest of vals[:m], ties to the larger j
        (the more recent slot); ``scratch`` is overwritten."""
        if kk >= m:
            top[:m] = True
            return
        top[:m] = False
        if kk <= 0:
            return
        for j in range(m):
            scratch[j] = vals[j]
        thr = _kth_smallest(scratch, m, m - kk)
        greater = 0
        for j in range(m - kk + 1, m):  # after the partition: the larger ones sit above m - kk
            if scratch[j] > thr:
                greater += 1
        need = kk - greater
        for j in range(m - 1, -1, -1):
            v = vals[j]
            if v > thr:
                top[j] = True
            elif v == thr and need > 0:
                top[j] = True
                need -= 1

    @njit(cache=True)
    def _snap_compress(pos, S, evicted, P, w, pool, p, q, budget):
        """SnapKV at the end of the prompt (positions < P) of one row: keep the last min(w, K(P))
        prompt keys and the top of the earlier ones by S summed over a box of ``pool`` positions
        (candidates only); evict the other prompt keys."""
        C = pos.shape[0]
        K = _full(max(P, 1), p, q, budget)
        kw = min(K, w)
        edge = P - kw
        h = pool // 2
        by_pos = np.zeros(P + 2 * h + 1, np.float64)
        for c in range(C):
            if pos[c] >= 0 and pos[c] < edge:
                by_pos[pos[c] + h] += S[c]
        vals = np.empty(C, np.float64)
        slot = np.empty(C, np.int64)
        m = 0
        for c in range(C):
            pc = pos[c]
            if pc >= 0 and pc < edge:
                s = 0.0
                for i in range(2 * h + 1):
                    s += by_pos[pc + i]
                vals[m] = s
                slot[m] = c
                m += 1
        top = np.empty(max(m, 1), np.bool_)
        _top(vals, m, K - kw, np.empty(max(m, 1), np.float64), top)
        for j in range(m):
            if not top[j]:
                evicted[slot[j]] = True

    @njit(cache=True)
    def _select(keep, pos, t, k, score, elig, kind, window, dense_all, cand, slot, top, scratch):
        """keep[:] = the keys of the query at t (bool row over C slots); ``cand``, ``slot``, ``top``
        and ``scratch`` (C entries each) are work space."""
        C = pos.shape[0]
        n = t + 1
        if dense_all or (kind <= SWA and 2 * k >= n):
            for c in range(C):
                keep[c] = pos[c] >= 0 and pos[c] <= t
        elif kind >= TOVA:  # every causal key not evicted
            for c in range(C):
                keep[c] = pos[c] >= 0 and pos[c] <= t and not elig[c]
        else:  # L, then the top-k eligible older keys by score (ties to the more recent)
            m = 0
            for c in range(C):
                pc = pos[c]
                causal = pc >= 0 and pc <= t
                recent = causal and pc > t - k
                keep[c] = recent
                if causal and not recent:
                    ok = elig[c] > 0 if kind == SWA else not elig[c]
                    if ok:
                        cand[m] = score[c]
                        slot[m] = c
                        m += 1
            _top(cand, m, k, scratch, top)
            for j in range(m):
                if top[j]:
                    keep[slot[j]] = True
        if window >= 0:  # the model's own sliding window
            for c in range(C):
                if keep[c] and t - pos[c] >= window:
                    keep[c] = False

    _LOG2E = np.float32(1.4426950408889634)
    _LN2_HI = np.float32(0.693359375)
    _LN2_LO = np.float32(-2.12194440e-4)

    @njit(cache=True, fastmath={"reassoc"})
    def _softmax(x, m, bits):
        """x[:m] = softmax(x[:m]) in place (float32, sum in float64). exp is Cody-Waite range
        reduction with the Cephes polynomial (<= 3 ulp of the rounded float32 exp), written so the
        loop vectorises (a libm call per element does not, and cost 5x more)."""
        mx = x[0]
        for j in range(1, m):
            mx = max(mx, x[j])
        for j in range(m):
            v = max(x[j] - mx, np.float32(-87.0))  # exp(-87) ~ 1.6e-38: below it a float32 softmax term is ~0
            n = np.floor(v * _LOG2E + np.float32(0.5))
            r = (v - n * _LN2_HI) - n * _LN2_LO
            p = np.float32(1.9875691500e-4)
            p = p * r + np.float32(1.3981999507e-3)
            p = p * r + np.float32(8.3334519073e-3)
            p = p * r + np.float32(4.1665795894e-2)
            p = p * r + np.float32(1.6666665459e-1)
            p = p * r + np.float32(5.0000001201e-1)
            x[j] = p * r * r + r + np.float32(1.0)
            bits[j] = np.int32((np.int32(n) + np.int32(127)) << np.int32(23))  # 2^n as float32 bits
        two_n = bits[:m].view(np.float32)
        s = 0.0
        for j in range(m):
            e = x[j] * two_n[j]
            x[j] = e
            s += e
        inv = 1.0 / s
        for j in range(m):
            x[j] = np.float32(x[j] * inv)

    @njit(cache=True, fastmath={"reassoc"})
    def _attend_one(qry, keys, vals, xkeys, xvals, cols, m, scale, lg, acc, bits, row, out):
        """Attention of one query (all heads) over the m kept keys at ``cols`` (< U: a column of
        keys/vals; >= U: column c - U of xkeys/xvals). qry (Hkv, G, D), out (Hkv, G, Dv) written;
        row[j] += the probability of kept key j summed over heads, in head order."""
        Hkv, G, D = qry.shape
        U = keys.shape[1]
        for h in range(Hkv):
            for j in range(m):
                if j + AHEAD < m and cols[j + AHEAD] < U:
                    _prefetch_row(keys, h, cols[j + AHEAD])
                c = cols[j]
                kr = keys[h, c] if c < U else xkeys[h, c - U]
                for g in range(G):
                    qv = qry[h, g]
                    s = np.float32(0.0)
                    for d in range(D):
                        s += qv[d] * kr[d]
                    lg[g, j] = s * scale  # float32 x float32, rounded as PyTorch rounds it
            for g in range(G):
                _softmax(lg[g], m, bits)
                for j in range(m):
                    row[j] += lg[g, j]
            acc[:, :] = 0.0
            for j in range(m):
                if j + AHEAD < m and cols[j + AHEAD] < U:
                    _prefetch_row(vals, h, cols[j + AHEAD])
                c = cols[j]
                vr = vals[h, c] if c < U else xvals[h, c - U]
                for g in range(G):
                    p = lg[g, j]
                    a = acc[g]
                    for d in range(vr.shape[0]):
                        a[d] += p * vr[d]
            out[h, :, :] = acc

    _F4 = "float32[:,:,:,::1]"
    _A = (f"float32[:,:,:,:,::1], {_F4}, {_F4}, {_F4}, {_F4}, int64[:,:], float32, int64[:,:], int64[:,:], "
          "int64, int64, int64, int64, boolean, int64, boolean[:,:,:]")
    _SIGS = [f"void(int64, {_A}, float64[:,:], {elig}[:,:], float32[:,:,:], int64[:,:], int64[:], float32[:,:,:,:,::1], boolean[:,:,::1])"
             for elig in ("boolean", "int32")]  # evicted flags (h2o, tova, snapkv), swa's counts: two compilations in all

    @njit(_SIGS, cache=True, parallel=True)
    def attend(kind, qry, keys, vals, xkeys, xvals, loc, scale, pos, qpos, p, q, budget, window, dense_all, mode,
               given, score, elig, ring, ring_q, hyper, out, keep_out):
        """A block of queries, in order, every row of the batch in parallel: select, attend the
        kept keys (logits, softmax and P·V over those keys only), feed the row back.

        qry (B, H_kv, G, Q, D) float32; the key of slot c is keys[b, :, loc[b, c]] (loc (B, C);
        an entry U + j, U = keys.shape[2], is column j of xkeys: the runtime's fetched or
        recomputed keys; ``loc.shape[1] == 0``: slot c is column c of keys); values alike. pos (B, C) int64,
        qpos (B, Q) int64 (-1: padding query: attends nothing, output zero).
        mode 0: select, attend, observe; 1: select only; 2: attend + observe the selection ``given`` (B, Q, C).
        State: h2o: score = acc (B, C) f64, elig = evicted (B, C) bool; swa: score = S (B, C)
        f64, elig = nz (B, C) int32, ring (B, R, C) float32, ring_q (B, R) int64; tova: elig =
        evicted; snapkv: score = S, elig = evicted, ring_q = the prompt length P (B, 1), hyper =
        (window, pool). ``hyper``: the policy's integer hyperparameters (``Policy.kernel_params``).
        Outputs (every entry written): out (B, H_kv, G, Q, Dv) float32 (not in mode 1),
        keep_out (B, Q, C) bool.
        """
        B, C = pos.shape
        Hkv, G, Q = qry.shape[1], qry.shape[2], qry.shape[3]
        Dv = vals.shape[3]
        ident = loc.shape[1] == 0
        for b in prange(B):
            scratch = np.empty(C, np.float64)
            cand = np.empty(C, np.float64)
            idx = np.empty(C, np.int64)
            cols = np.empty(C, np.int64)
            row = np.empty(C, np.float32)
            lg = np.empty((G, C), np.float32)
            acc = np.empty((G, Dv), np.float32)
            bits = np.empty(C, np.int32)
            qbuf = np.empty((Hkv, G, qry.shape[4]), np.float32)  # contiguous: the dot products vectorise
            top = np.empty(C, np.bool_)
            for i in range(Q):
                t = qpos[b, i]
                keep = keep_out[b, i]
                if t < 0:
                    keep[:] = False
                    if mode != 1:
                        out[b, :, :, i, :] = 0.0
                    continue
                k = _half(t + 1, p, q, budget)
                if mode == 2:
                    keep[:] = given[b, i]
                else:
                    _select(keep, pos[b], t, k, score[b], elig[b], kind, window, dense_all, cand, idx, top, scratch)
                m = 0
                for c in range(C):
                    if keep[c]:
                        idx[m] = c
                        cols[m] = c if ident else loc[b, c]
                        m += 1
                if mode == 1:
                    continue
                row[:m] = 0.0
                qbuf[:, :, :] = qry[b, :, :, i]
                _attend_one(qbuf, keys[b], vals[b], xkeys[b], xvals[b], cols, m, scale, lg, acc, bits, row,
                            out[b, :, :, i])
                # observe: the row (zero outside the selection) enters the policy state
                if kind == H2O:
                    for j in range(m):
                        score[b, idx[j]] += row[j]
                    for c in range(C):
                        pc = pos[b, c]
                        if pc >= 0 and pc <= t and not keep[c]:
                            elig[b, c] = True
                elif kind == TOVA:  # the row keeps its top K(n + 1) - 1 keys; every other causal key goes
                    _top(row, m, _full(t + 2, p, q, budget) - 1, scratch, top)
                    for c in range(C):
                        pc = pos[b, c]
                        if pc >= 0 and pc <= t:
                            elig[b, c] = True
                    for j in range(m):
                        if top[j]:
                            elig[b, idx[j]] = False
                elif kind == SNAPKV:  # the observation window's rows accumulate; compress after the prompt
                    P = ring_q[b, 0]
                    if t >= P - hyper[0] and t < P:
                        for j in range(m):
                            score[b, idx[j]] += row[j]
                    if t == P - 1:
                        _snap_compress(pos[b], score[b], elig[b], P, hyper[0], hyper[1], p, q, budget)
                else:
                    R = ring.shape[1]
                    st = t % R
                    ring[b, st, :] = 0.0
                    for j in range(m):
                        c = idx[j]
                        v = row[j]
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
