"""Token-granular KV storage of one layer, with real eviction.

A :class:`SlotStore` holds keys and values in buffers ``(B, H_kv, capacity, D)``; slots
``[0, used)`` are in use and ``pos`` (B, capacity) gives each slot's real position
(``-1``: empty, padding or evicted). Appends write into spare capacity (amortised, no
re-concatenation every step); evicted slots are reclaimed by compaction when the buffer
is full, and the buffer shrinks when far fewer tokens are live than it can hold. The
policy's per-slot state follows every append, compaction and batch reorder.
"""

from __future__ import annotations

import torch

from .policies import Policy, PolicyState


class SlotStore:
    GROWTH = 1.5

    def __init__(self, policy: Policy):
        self.policy = policy
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.pos: torch.Tensor | None = None
        self.state: PolicyState | None = None
        self.used = 0
        self.seen = 0  # columns appended, padding included: what transformers calls the sequence length

    # --- views ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def kv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys, values (B, H_kv, used, D) and positions (B, used)."""
        u = self.used
        return self.keys[:, :, :u], self.values[:, :, :u], self.pos[:, :u]

    # --- mutation ---------------------------------------------------------------------
    def append(self, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor) -> None:
        """key, value: (B, H_kv, Q, D); pos: (B, Q), -1 for padding."""
        B, H, Q, D = key.shape
        if self.keys is None:
            self.keys = key.new_empty(B, H, Q, D)
            self.values = value.new_empty(B, H, Q, value.shape[-1])
            self.pos = pos.new_full((B, Q), -1)
            self.state = self.policy.new_state(B, key.device)
        if self.used + Q > self.capacity:
            self.compact(extra=Q)
        u = self.used
        self.keys[:, :, u:u + Q] = key
        self.values[:, :, u:u + Q] = value
        self.pos[:, u:u + Q] = pos
        if self.state is not None:
            self.state.append(Q)
        if getattr(self.policy, "needs_qk", False):  # quest: page bounds of the keys [issue 12 hook]
            self.policy.observe_keys(self.state, key, pos)
        self.used += Q
        self.seen += Q

    def evict(self, retain: torch.Tensor) -> None:
        """Forget every slot not in ``retain`` (B, used): it is never attended again."""
        self.pos[:, :self.used] = torch.where(retain, self.pos[:, :self.used], -1)
        if 2 * int(self.tokens_held().max()) < self.capacity:  # e.g. after a prompt: give the memory back now
            self.compact()

    def compact(self, extra: int = 0) -> None:
        """Move live slots to the front (order kept) and resize to fit them plus ``extra``."""
        u = self.used
        live = self.pos[:, :u] >= 0
        n_live = live.sum(1)
        keep = int(n_live.max()) if u else 0
        # Stable sort puts live slots first, in position order.
        idx = torch.sort((~live).to(torch.int8), dim=1, stable=True).indices[:, :keep]
        pos = self.pos[:, :u].gather(1, idx)
        pos = torch.where(torch.arange(keep, device=pos.device) < n_live[:, None], pos, -1)
        B, H, _, D = self.keys.shape
        cap, need = self.capacity, keep + extra
        if need > cap or cap > 2 * need:
            cap = int(need * self.GROWTH) + 1
        gi = idx[:, None, :, None]
        keys, values = self.keys[:, :, :u].gather(2, gi.expand(B, H, keep, D)), self.values[:, :, :u].gather(2, gi.expand(B, H, keep, self.values.shape[-1]))
        if cap != self.capacity:
            self.keys = self.keys.new_empty(B, H, cap, D)
            self.values = self.values.new_empty(B, H, cap, self.values.shape[-1])
            self.pos = self.pos.new_full((B, cap), -1)
        self.keys[:, :, :keep] = keys
        self.values[:, :, :keep] = values
        self.pos[:, :keep] = pos
        self.pos[:, keep:] = -1
        if self.state is not None:
            self.state.gather(idx)
        self.used = keep

    def batch_select(self, index: torch.Tensor) -> None:
        """Reorder or repeat the batch (beam search, ``num_return_sequences``)."""
        if self.keys is None:
            return
        self.keys, self.values, self.pos = self.keys[index], self.values[index], self.pos[index]
        if self.state is not None:
            self.state.reorder(index)

    # --- measurement -----------------------------------------------------------------
    def tokens_held(self) -> torch.Tensor:
        """Live tokens per sequence, (B,)."""
        if self.keys is None:
            return torch.zeros(0, dtype=torch.long)
        return (self.pos[:, :self.used] >= 0).sum(1)

    def bytes_allocated(self) -> dict[str, int]:
        if self.keys is None:
            return {"kv": 0, "state": 0}
        kv = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        state = self.pos.numel() * self.pos.element_size()
        if self.state is not None:
            state += self.state.nbytes()
        return {"kv": kv, "state": state}
