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


OBSERVE_BLOCK = 128  # query rows whose logits and probabilities a stateful chunk materialises at once


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
        self._sum[layer] = self._sum.get(layer, 0) + s
        self._rows[layer] = self._rows.get(layer, 0) + r

    def per_layer(self) -> dict[int, float]:
        return {l: float(self._sum[l] / self._rows[l]) for l in sorted(self._sum) if int(self._rows[l]) > 0}

    def overall(self) -> float | None:
        per = self.per_layer()
        return sum(per.values()) / len(per) if per else None


ROUTE = os.environ.get("ALISA_ROUTE", "auto")  # "auto": compiled where it applies; "reference": PyTorch only
_warned: set[str] = set()


def route(policy: Policy, pos: torch.Tensor, logits: torch.Tensor | None = None) -> str:
    """Which implementation runs a stateful step: ``"compiled"`` (numba, CPU tensors, a policy
    with a kernel) or ``"reference"`` (PyTorch, one query at a time; any device, any policy)."""
    if ROUTE == "reference" or policy.kernel is None or pos.device.type != "cpu":
        return "reference"
    if logits is not None and logits.requires_grad:
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
    logits: torch.Tensor | None,
    scale: float = 1.0,
    *,
    keep: torch.Tensor | None = None,
    dense: bool = False,
    sliding_window: int | None = None,
    n_max: int | None = None,
    query: torch.Tensor | None = None,  # (B, H_q, Q, D), for a query-aware policy (needs_qk: quest) [issue 12 hook]
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The one select → softmax → observe step, for a block of queries in order.

    logits (B, H_kv, G, Q, C) float32 (multiplied by ``scale`` here: one pass less) of the queries at ``q_pos`` (B, Q;
    -1 = padding) against the slots at ``pos`` (B, C): every key the step may attend,
    whatever its tier (the runtime passes device-resident, fetched and recomputed keys in
    slot order). Each query selects its keys (``dense``: all causal keys), attends them with
    one softmax, and its attention row summed over all query heads goes back to the policy
    (:meth:`~alisa.policies.Policy.observe`) before the next query selects.

    ``logits=None``: select only (one query per row), e.g. to fetch the selected keys first;
    then call again with ``keep=`` that selection. ``n_max``: a bound on ``q_pos + 1``
    known on the host (sizes the policy's state without reading the device).

    The logits may cover only the first ``C' <= C`` slots when no query of the block can
    attend a later one (the accuracy path's causal blocks): the step then reads and writes
    only those columns.

    Returns probs (B, H_kv, G, Q, C') float32 (zero outside the selection; a padding query
    attends every slot, its output unused) or None, and the selection keep (B, Q, C').
    """
    B, Q = q_pos.shape
    if logits is None and Q != 1:
        raise ValueError(f"select-only needs one query per row (got {Q}): later selections depend on earlier rows")
    observing = policy.stateful and policy.needs_rows
    if observing:
        policy.prepare(state, int(q_pos.max()) + 1 if n_max is None else n_max)
    if observing and route(policy, pos, logits) == "compiled":
        return _compiled(policy, state, pos, q_pos, logits, scale, keep, dense, sliding_window)
    C = pos.shape[1]
    cols = C if logits is None else logits.shape[-1]
    if cols < C:  # later slots are never attended by these queries (their rows are zero there)
        logits = F.pad(logits, (0, C - cols))

    def allowed(sel: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sel if sliding_window is None else sel & (t - pos < sliding_window)  # the model's own window

    probs = None if logits is None else torch.zeros_like(logits)
    keeps = []
    for i in range(Q):
        t = q_pos[:, i]
        if keep is not None:
            k_i = keep[:, i]
        elif dense or (policy.stateful and not observing):  # sparsity 0: every row is dense
            k_i = allowed(causal(pos, t[:, None]), t[:, None])
        else:
            k_i = allowed(policy.select(pos, t, state) if policy.stateful else
                          select_stateless(policy, pos, t[:, None], state, None if query is None else query[:, :, i:i + 1]), t[:, None])
        keeps.append(k_i)
        if logits is None:
            continue
        attend = k_i | (t < 0)[:, None]
        p = torch.softmax((logits[:, :, :, i] * scale).masked_fill(~attend[:, None, None], float("-inf")), dim=-1)
        probs[:, :, :, i] = p
        if observing:
            row = p.detach().sum((1, 2)) * (t >= 0)[:, None]  # A_t summed over all query heads, (B, C)
            policy.observe(state, pos, t, k_i, row)
    keep = torch.stack(keeps, 1)[..., :cols]
    return (None if probs is None else probs[..., :cols]), keep


def _compiled(policy, state, pos, q_pos, logits, scale, keep, dense, sliding_window):
    """:func:`attend_with_feedback` on the numba route (same arguments, same results)."""
    from . import _fast

    B, Q = q_pos.shape
    C = pos.shape[1] if logits is None else logits.shape[-1]  # slots this block may attend: a prefix
    score, elig, ring, ring_q = policy.kernel_state(state)
    pos, score, elig = pos[:, :C], score[:, :C], elig[:, :C]
    if ring is None:
        ring, ring_q = _NO_RING
    else:
        ring = ring[:, :, :C]  # a ring row is zero past its query's own slot, so the prefix is the row
    mode = 1 if logits is None else (2 if keep is not None else 0)
    if logits is None:
        lg = probs = _NO_PROBS
    else:
        _, Hkv, G, _, _ = logits.shape
        lg = logits.detach().reshape(B, Hkv * G, Q, C)
        probs = torch.empty(B, Hkv * G, Q, C, dtype=torch.float32)  # the kernel writes every entry
    keep_out = torch.empty(B, Q, C, dtype=torch.bool)
    given = keep.contiguous() if keep is not None else keep_out
    _fast.run(policy.kernel, _np(lg), np.float32(scale), _np(pos), _np(q_pos), policy._p, policy._q,
              -1 if policy.budget is None else policy.budget, -1 if sliding_window is None else sliding_window,
              bool(dense), mode, _np(given), _np(score), _np(elig), _np(ring), _np(ring_q), _np(probs), _np(keep_out))
    return (None if logits is None else probs.view(B, Hkv, G, Q, C)), keep_out


def _np(t: torch.Tensor):
    return t.detach().numpy()


_NO_RING = (torch.zeros(1, 1, 1, dtype=torch.float32), torch.zeros(1, 1, dtype=torch.long))
_NO_PROBS = torch.zeros(1, 1, 1, 1, dtype=torch.float32)


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
    G = Hq // Hkv
    outs = []
    C = pos.shape[1]
    for i0 in range(0, Q, OBSERVE_BLOCK):  # logits of a block of queries at a time: bounded memory
        i1 = min(Q, i0 + OBSERVE_BLOCK)
        cend = C - Q + i1  # the chunk is the last Q slots: later slots hold keys after every query of the block
        logits = grouped_logits(query[:, :, i0:i1], key[:, :, :cend])  # (B, Hkv, G, block, cend)
        probs, keep = attend_with_feedback(policy, store.state, pos, q_pos[:, i0:i1], logits, scaling, dense=dense,
                                           sliding_window=sliding_window, n_max=store.seen)
        out = torch.matmul(probs.to(value.dtype).view(B, Hkv, G * (i1 - i0), -1), value[:, :, :cend])  # (B, Hkv, G*block, Dv)
        outs.append(out.view(B, Hkv, G, i1 - i0, -1))
        if stats is not None:
            stats.add(layer, keep, q_pos[:, i0:i1])
    return torch.cat(outs, 3).reshape(B, Hq, Q, -1).transpose(1, 2)


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
