"""Attention of a chunk of queries over a :class:`~alisa.kvstore.SlotStore`, under a policy.

This is the one place where a policy's selection turns into attention. It serves the
accuracy path (a whole sequence as one chunk: every query masked exactly as if the
sequence had been decoded token by token) and the decode path (one new token, or a
prompt, against what the cache still holds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .kvstore import SlotStore
from .policies import Policy, causal


OBSERVE_BLOCK = 128  # query rows whose probabilities a dense stateful chunk materialises at once


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
    still observes the rows (SPEC §3, ``prefill=dense``). Returns (B, Q, H_q, D_v).
    """
    key, value, pos = store.kv()
    B, Hq, Q, D = query.shape
    Hkv = key.shape[1]

    def allowed(sel: torch.Tensor, p: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return sel if sliding_window is None else sel & (t - p < sliding_window)  # the model's own window

    if not policy.stateful:
        pos_b, t = pos[:, None, :], q_pos[:, :, None]  # (B, 1, C), (B, Q, 1)
        keep = allowed(causal(pos_b, t) if dense else policy.select(pos_b, t, None), pos_b, t)  # (B, Q, C)
        if stats is not None:
            stats.add(layer, keep, q_pos)
        # A padding query attends everything: its output is never used, but must stay finite.
        mask = keep | (q_pos < 0)[:, :, None]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scaling, enable_gqa=Hq != Hkv)
        return out.transpose(1, 2)

    # Stateful: each query's selection depends on the rows of the queries before it.
    if dense:  # every row attends all its causal keys: SDPA for the output, rows only to observe
        keep = allowed(causal(pos[:, None, :], q_pos[:, :, None]), pos[:, None, :], q_pos[:, :, None])
        if stats is not None:
            stats.add(layer, keep, q_pos)
        mask = keep | (q_pos < 0)[:, :, None]
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask[:, None], scale=scaling, enable_gqa=Hq != Hkv)
        for i0 in range(0, Q if policy.needs_rows else 0, OBSERVE_BLOCK):  # bounded memory: (B, H, block, C) at a time
            i1 = min(Q, i0 + OBSERVE_BLOCK)
            p = torch.softmax(grouped_logits(query[:, :, i0:i1], key, scaling).masked_fill(~mask[:, None, None, i0:i1], float("-inf")), dim=-1)
            rows = p.sum((1, 2)) * (q_pos[:, i0:i1] >= 0)[..., None]  # (B, block, C)
            for i in range(i0, i1):
                policy.observe(store.state, pos, q_pos[:, i], keep[:, i], rows[:, i - i0])
        return out.transpose(1, 2)
    G = Hq // Hkv
    outs, keeps = [], []
    for i0 in range(0, Q, OBSERVE_BLOCK):  # logits of a block of queries at a time: bounded memory
        i1 = min(Q, i0 + OBSERVE_BLOCK)
        logits = grouped_logits(query[:, :, i0:i1], key, scaling)  # (B, Hkv, G, block, C)
        probs = torch.empty_like(logits)
        for i in range(i0, i1):
            t = q_pos[:, i]
            keep = allowed(policy.select(pos, t, store.state), pos, t[:, None])
            attend = keep | (t < 0)[:, None]
            p = torch.softmax(logits[:, :, :, i - i0].masked_fill(~attend[:, None, None], float("-inf")), dim=-1)
            probs[:, :, :, i - i0] = p
            row = p.detach().sum((1, 2)) * (t >= 0)[:, None]  # A_t summed over all query heads, (B, C)
            policy.observe(store.state, pos, t, keep, row)
            keeps.append(keep)
        out = torch.matmul(probs.to(value.dtype).view(B, Hkv, G * (i1 - i0), -1), value)  # (B, Hkv, G*block, Dv)
        outs.append(out.view(B, Hkv, G, i1 - i0, -1))
    if stats is not None:
        stats.add(layer, torch.stack(keeps, 1), q_pos)
    return torch.cat(outs, 3).reshape(B, Hq, Q, -1).transpose(1, 2)


def grouped_logits(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """float32 logits (B, H_kv, G, Q, C) of query (B, H_q, Q, D) against key (B, H_kv, C, D).

    Grouped-query heads share their key head through one batched matmul over
    (B, H_kv): the keys are read once, never repeated in memory.
    """
    B, Hq, Q, D = query.shape
    Hkv = key.shape[1]
    G = Hq // Hkv
    logits = torch.matmul(query.reshape(B, Hkv, G * Q, D), key.transpose(-1, -2))
    return logits.float().view(B, Hkv, G, Q, -1) * scaling
