"""Attention of a chunk of queries over a :class:`~alisa.kvstore.SlotStore`, under a policy.

This is the one place where a policy's selection turns into attention. It serves the
accuracy path (a whole sequence as one chunk: every query masked exactly as if the
sequence had been decoded token by token) and the decode path (one new token, or a
prompt, against what the cache still holds).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from .kvstore import SlotStore
from .policies import Policy, PolicyState, causal


OBSERVE_BLOCK = 128  # queries per call of a stateful chunk (the reference route materialises their logits)


class KeptStats:
    """Measured fraction of the causal keys each real query attended, per layer."""

    def __init__(self):
        self._sum: dict[int, torch.Tensor] = {}
        self._rows: dict[int, torch.Tensor] = {}

    def add(self, layer: int, keep: torch.Tensor, q_pos: torch.Tensor) -> None:
        # keep (B, Q, C) bool, q_pos (B, Q)
        real = q_pos >= 0
        frac = keep.sum(-1).double() / (q_pos + 1).clamp(min=1)
        s, r = (frac * real).sum(), real.sum()
        self.ready((layer,), s.device)  # accumulators updated in place from then on
        self._sum[layer] += s
        self._rows[layer] += r

    def ready(self, layers, device) -> None:
        """Create the accumulators of ``layers`` now (a compiled step then only adds to them in
        place; one that created them would be traced again once they exist)."""
        for l in layers:
            if l not in self._sum:
                self._sum[l] = torch.zeros((), dtype=torch.float64, device=device)
                self._rows[l] = torch.zeros((), dtype=torch.long, device=device)

    def per_layer(self) -> dict[int, float]:
        return {l: float(self._sum[l] / self._rows[l]) for l in sorted(self._sum) if int(self._rows[l]) > 0}

    def overall(self) -> float | None:
        per = self.per_layer()
        return sum(per.values()) / len(per) if per else None


ROUTE = os.environ.get("ALISA_ROUTE", "auto")  # "auto": compiled where it applies; "reference": PyTorch only
_warned: set[str] = set()


def route(policy: Policy, pos: torch.Tensor, query: torch.Tensor | None = None) -> str:
    """Which implementation runs a stateful step: ``"compiled"`` (numba, CPU tensors, a policy
    with a kernel) or ``"reference"`` (PyTorch, one query at a time; any device, any policy; the
    one ``torch.compile`` traces: a numba call would break its graph)."""
    if ROUTE == "reference" or policy.kernel is None or pos.device.type != "cpu" or torch.compiler.is_compiling():
        return "reference"
    if query is not None and query.requires_grad:
        return "reference"  # the compiled route is not differentiable
    if policy.budget is None and policy._q > 2 ** 31:  # p·n must fit in int64 inside the kernel
        return "reference"
    from . import _fast  # compiles (once per machine, then cached) on first use

    if not _fast.available():
        if "numba" not in _warned:
            _warned.add("numba")
            warnings.warn("alisa: numba is not installed; stateful policies run on the slower PyTorch reference route", stacklevel=3)
        return "reference"
    return "compiled"


def select_stateless(policy: Policy, pos: torch.Tensor, t: torch.Tensor, state: PolicyState | None,
                     query: torch.Tensor | None) -> torch.Tensor:
    """A stateless policy's selection; a query-aware one (``needs_qk``, e.g. quest) also gets the
    store's state (its page bounds) and the queries. [issue 12 hook]"""
    if getattr(policy, "needs_qk", False):
        return policy.select(pos, t, state, query=query)
    return policy.select(pos, t, None)


def attend_with_feedback(
    policy: Policy,
    state: PolicyState | None,
    pos: torch.Tensor,
    q_pos: torch.Tensor,
    query: torch.Tensor,
    keys: torch.Tensor | None = None,
    values: torch.Tensor | None = None,
    scale: float = 1.0,
    *,
    loc: torch.Tensor | None = None,
    xkeys: torch.Tensor | None = None,
    xvals: torch.Tensor | None = None,
    cols: int | None = None,
    keep: torch.Tensor | None = None,
    select_only: bool = False,
    dense: bool = False,
    sliding_window: int | None = None,
    n_max: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The one select → attend → observe step, for a block of queries in order.

    ``query`` (B, H_q, Q, D) at positions ``q_pos`` (B, Q; -1 = padding) against the slots at
    ``pos`` (B, C): every key the step may attend, whatever its tier. Slot c's key is
    ``keys[:, :, c]`` (keys (B, H_kv, U >= C, D)) or, with ``loc`` (B, C), ``keys[:, :, loc]``
    where ``0 <= loc < U`` and ``xkeys[:, :, loc - U]`` where ``loc >= U`` (the runtime's device
    pool plus the keys it fetched or recomputed for this step; -1: a slot no query selects);
    values alike. Every column must be finite, also one no slot maps to (the reference route
    multiplies the whole buffer by probabilities that are zero there; a :class:`Pool` zeroes
    the columns it has not written). Each query
    selects its keys (``dense``: all causal keys), attends them with one softmax, and its
    attention row summed over all query heads goes back to the policy
    (:meth:`~alisa.policies.Policy.observe`) before the next query selects.

    ``select_only``: one query per row, select and return (None, keep), e.g. to fetch the
    selected keys first; then call again with ``keep=`` that selection. ``cols``: no query of
    the block can attend a slot >= cols (the accuracy path's causal blocks): the step reads and
    writes only those slots. ``n_max``: a bound on ``q_pos + 1`` known on the host (sizes the
    policy's state without reading the device).

    Returns the output (B, H_q, Q, D_v) in the values' dtype (a padding query's is unused) and
    the selection keep (B, Q, cols).
    """
    B, Q = q_pos.shape
    if select_only and Q != 1:
        raise ValueError(f"select-only needs one query per row (got {Q}): later selections depend on earlier rows")
    cols = pos.shape[1] if cols is None else cols
    observing = policy.stateful and policy.needs_rows
    if observing:
        policy.prepare(state, int(q_pos.max()) + 1 if n_max is None else n_max)
    if observing and route(policy, pos, query) == "compiled":
        return _compiled(policy, state, pos, q_pos, query, keys, values, scale, loc, xkeys, xvals, cols, keep,
                         select_only, dense, sliding_window)
    C = pos.shape[1]
    logits = None
    if not select_only:
        if loc is None:  # slot c is column c
            logits = grouped_logits(query, keys[:, :, :cols])  # (B, H_kv, G, Q, cols)
            if cols < C:  # later slots are never attended by these queries (their rows are zero there)
                logits = F.pad(logits, (0, C - cols))
        else:  # in column space: the buffer's columns, then the extra ones; no gather of K or V
            logits = grouped_logits(query, keys)
            if xkeys is not None:
                logits = torch.cat([logits, grouped_logits(query, xkeys)], -1)
    N = C if logits is None else logits.shape[-1]
    dump = None if loc is None else torch.where(loc >= 0, loc, N)  # slot -> column; N: a slot with no column

    def allowed(sel: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sel if sliding_window is None else sel & (t - pos < sliding_window)  # the model's own window

    def columns(sel: torch.Tensor) -> torch.Tensor:  # a selection over slots (B, C) -> over columns (B, N)
        if loc is None:
            return sel
        return sel.new_zeros(B, N + 1).scatter_(1, torch.where(sel, dump, N), True)[:, :N]

    # Q == 1 (decode): the one row is probs (a view); else rows are written in place (not stacked: that holds them twice)
    probs = None if logits is None or Q == 1 else torch.zeros_like(logits)
    keeps = []
    for i in range(Q):
        t = q_pos[:, i]
        if keep is not None:
            k_i = keep[:, i]
            if k_i.shape[-1] < C:
                k_i = F.pad(k_i, (0, C - k_i.shape[-1]))
        elif dense or (policy.stateful and not observing):  # sparsity 0: every row is dense
            k_i = allowed(causal(pos, t[:, None]), t[:, None])
        else:
            k_i = allowed(policy.select(pos, t, state) if policy.stateful else
                          select_stateless(policy, pos, t[:, None], state, None if query is None else query[:, :, i:i + 1]),
                          t[:, None])
        keeps.append(k_i)
        if logits is None:
            continue
        attend = columns(k_i) | (t < 0)[:, None]  # a padding query attends everything: unused, but finite
        p = torch.softmax(torch.where(attend[:, None, None], logits[:, :, :, i] * scale, float("-inf")), dim=-1)
        if Q == 1:
            probs = p[:, :, :, None]
        else:
            probs[:, :, :, i] = p
        if observing:
            row = p.detach().sum((1, 2)) * (t >= 0)[:, None]  # A_t summed over all query heads, (B, N)
            if loc is not None:  # back to slot order; zero for a slot with no column (column N)
                row = F.pad(row, (0, 1)).gather(1, dump)
            policy.observe(state, pos, t, k_i, row)
    keep = (keeps[0][:, None] if Q == 1 else torch.stack(keeps, 1))[..., :cols]
    if probs is None:
        return None, keep
    Hkv, G = probs.shape[1], probs.shape[2]
    if loc is None:
        out = torch.matmul(probs[..., :cols].to(values.dtype).view(B, Hkv, G * Q, cols), values[:, :, :cols])
    else:
        U = keys.shape[2]
        out = torch.matmul(probs[..., :U].to(values.dtype).view(B, Hkv, G * Q, U), values)
        if xvals is not None:
            out = out + torch.matmul(probs[..., U:].to(xvals.dtype).view(B, Hkv, G * Q, N - U), xvals)
    return out.view(B, Hkv * G, Q, -1), keep  # (B, H_q, Q, D_v)


def _compiled(policy, state, pos, q_pos, query, keys, values, scale, loc, xkeys, xvals, C, keep, select_only, dense,
              sliding_window):
    """:func:`attend_with_feedback` on the numba route (same arguments, same results)."""
    from . import _fast

    B, Q = q_pos.shape
    score, elig, ring, ring_q = policy.kernel_state(state, pos)
    pos, elig = pos[:, :C], elig[:, :C]
    score = pos.new_zeros(B, 0, dtype=torch.float64) if score is None else score[:, :C]
    # a ring row is zero past its query's own slot, so the prefix is the row
    ring = _NO_RING[0] if ring is None else ring[:, :, :C]
    ring_q = _NO_RING[1] if ring_q is None else ring_q
    f32 = lambda t: t.detach().to(torch.float32).contiguous()  # no copy for a float32 buffer
    if select_only:
        mode, qry = 1, _NO_QUERY
        k = v = xk = xv = _NO_KV
        out = _NO_OUT
    else:
        mode = 2 if keep is not None else 0
        Hq, D = query.shape[1], query.shape[3]
        Hkv = keys.shape[1]
        qry = f32(query.reshape(B, Hkv, Hq // Hkv, Q, D))
        k, v = f32(keys), f32(values)
        xk, xv = (f32(xkeys), f32(xvals)) if xkeys is not None else (k[:, :, :0], v[:, :, :0])
        out = torch.empty(B, Hkv, Hq // Hkv, Q, v.shape[3], dtype=torch.float32)
    keep_out = torch.empty(B, Q, C, dtype=torch.bool)
    given = keep.contiguous() if keep is not None else keep_out
    _fast.attend(policy.kernel, _np(qry), _np(k), _np(v), _np(xk), _np(xv), _np(_NO_LOC if loc is None else loc[:, :C]),
                 np.float32(scale), _np(pos), _np(q_pos), policy._p, policy._q,
                 -1 if policy.budget is None else policy.budget, -1 if sliding_window is None else sliding_window,
                 bool(dense), mode, _np(given), _np(score), _np(elig), _np(ring), _np(ring_q),
                 np.asarray(policy.kernel_params, dtype=np.int64), _np(out), _np(keep_out))
    if select_only:
        return None, keep_out
    return out.view(B, -1, Q, out.shape[-1]).to(values.dtype), keep_out


def _np(t: torch.Tensor):
    return t.detach().numpy()


_NO_RING = (torch.zeros(1, 1, 1, dtype=torch.float32), torch.zeros(1, 1, dtype=torch.long))
_NO_QUERY = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float32)
_NO_KV = torch.zeros(1, 1, 1, 1, dtype=torch.float32)
_NO_OUT = torch.zeros(1, 1, 1, 1, 1, dtype=torch.float32)
_NO_LOC = torch.zeros(1, 0, dtype=torch.long)


def policy_attention(
    policy: Policy,
    store: SlotStore,
    query: torch.Tensor,
    q_pos: torch.Tensor,
    scaling: float,
    *,
    dense: bool = False,
    sliding_window: int | None = None,
    stats: KeptStats | None = None,
    layer: int = 0,
) -> torch.Tensor:
    """Attend ``query`` (B, H_q, Q, D) at positions ``q_pos`` (B, Q; -1 = padding) over ``store``.

    ``dense=True`` makes every query attend all its causal keys while a stateful policy
    still observes the rows (docs/semantics.md §3, ``prefill=dense``). Returns (B, Q, H_q, D_v).
    """
    key, value, pos = store.kv()
    B, Hq, Q, D = query.shape
    Hkv = key.shape[1]

    if not (policy.stateful and policy.needs_rows):  # every query's keys are known up front: one SDPA
        pos_b, t = pos[:, None, :], q_pos[:, :, None]  # (B, 1, C), (B, Q, 1)
        keep = causal(pos_b, t) if dense or policy.stateful else select_stateless(policy, pos_b, t, store.state, query)
        if sliding_window is not None:
            keep = keep & (t - pos_b < sliding_window)  # the model's own window
        if stats is not None:
            stats.add(layer, keep, q_pos)
        # A padding query attends everything: its output is never used, but must stay finite.
        mask = keep | (q_pos < 0)[:, :, None]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scaling, enable_gqa=Hq != Hkv)
        return out.transpose(1, 2)

    # Stateful: each query's selection depends on the rows of the queries before it.
    outs = []
    C = pos.shape[1]
    for i0 in range(0, Q, OBSERVE_BLOCK):  # a block of queries at a time: bounded memory
        i1 = min(Q, i0 + OBSERVE_BLOCK)
        cend = C - Q + i1  # the chunk is the last Q slots: later slots hold keys after every query of the block
        out, keep = attend_with_feedback(policy, store.state, pos, q_pos[:, i0:i1], query[:, :, i0:i1], store.keys,
                                         store.values, scaling, cols=cend, dense=dense, sliding_window=sliding_window,
                                         n_max=store.seen)
        outs.append(out)
        if stats is not None:
            stats.add(layer, keep, q_pos[:, i0:i1])
    return torch.cat(outs, 2).transpose(1, 2)


def grouped_logits(query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Unscaled float32 logits (B, H_kv, G, Q, C) of query (B, H_q, Q, D) against key (B, H_kv, C, D).

    Grouped-query heads share their key head through one batched matmul over
    (B, H_kv): the keys are read once, never repeated in memory.
    """
    B, Hq, Q, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    logits = torch.matmul(query.reshape(B, Hkv, G * Q, D), key.transpose(-1, -2))
    return logits.float().view(B, Hkv, G, Q, -1)
