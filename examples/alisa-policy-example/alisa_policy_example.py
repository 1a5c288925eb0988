"""An alisa policy plug-in: H2O whose accumulated attention decays (a recency-weighted heavy hitter)."""

import torch

from alisa.policies import Policy, PolicyState, causal, topk_mask


class DecayedHeavyHitters(Policy):
    """The k = max(1, round(r·n/2)) most recent keys plus the top-k older ones by attention received,
    each query's row added to a score that first decays by ``decay``; a key neither part selects is
    evicted for good. ``decay=1`` is H2O."""

    name = "h2o_decay"
    stateful = True

    def __init__(self, sparsity=None, budget=None, decay: float = 0.9):
        super().__init__(sparsity=sparsity, budget=budget)
        if not 0 < decay <= 1:
            raise ValueError(f"decay={decay!r} is invalid: allowed is a number in (0, 1]")
        self.decay = decay

    @property
    def params(self):
        return {"decay": self.decay}

    def new_state(self, batch, device):
        return PolicyState(slot={"score": torch.zeros(batch, 0, dtype=torch.float64, device=device),
                                 "evicted": torch.zeros(batch, 0, dtype=torch.bool, device=device)})

    def select(self, pos, t, state):  # pos (B, C), t (B,) -> (B, C) bool
        t = t[:, None]
        k = self.half_count(t + 1)
        recent = causal(pos, t) & (pos > t - k)
        older = causal(pos, t) & ~recent & ~state.slot["evicted"]
        return recent | topk_mask(state.slot["score"], older, k[:, 0])

    def observe(self, state, pos, t, keep, row):  # row (B, C): the attention the query at t paid each slot
        real = (t >= 0)[:, None]
        state.slot["score"].mul_(torch.where(real, self.decay, 1.0)).add_(row)
        state.slot["evicted"] |= causal(pos, t[:, None]) & ~keep

    def retain(self, pos, t_next, state):  # what any query at t_next or later may still select
        return (pos >= 0) & ~state.slot["evicted"]
