"""Policies people compare against: TOVA, SnapKV, Quest (docs/semantics.md §2).

Each is one small class on the interface of :mod:`alisa.policies`, used unchanged by the
accuracy path, the decode path and the runtime, and exact between them. TOVA and SnapKV
have a compiled kernel (``alisa._fast``) beside the PyTorch reference route of
:func:`alisa.attention.attend_with_feedback`; Quest is stateless (its page bounds follow the
keys, not the rows) and runs as one masked attention.

References: TOVA, Oren et al., "Transformers are Multi-State RNNs" (EMNLP 2024,
arXiv 2401.06104); SnapKV, Li et al., "SnapKV: LLM Knows What You are Looking for Before
Generation" (NeurIPS 2024, arXiv 2404.14469); Quest, Tang et al., "Quest: Query-Aware
Sparsity for Efficient Long-Context LLM Inference" (ICML 2024, arXiv 2406.10774).
"""

from __future__ import annotations

import torch

from .policies import Policy, PolicyState, causal, register, topk_mask


def _int_param(name: str, value, allowed: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"{name}={value!r} is invalid: allowed is {allowed}")


def _at_most(n, m: int):
    """min(n, m) on an int or an int64 tensor."""
    return min(n, m) if isinstance(n, int) else torch.clamp(n, max=m)


class _Evicting(Policy):
    """Shared by TOVA and SnapKV: a query attends every causal key not evicted; evicted keys never return."""

    stateful = True

    @property
    def needs_rows(self) -> bool:
        return self.budget is not None or self._p != self._q  # sparsity 0: nothing is ever evicted

    def select(self, pos, t, state):
        return causal(pos, t[:, None]) & ~state.slot["evicted"]

    def retain(self, pos, t_next, state):
        return (pos >= 0) & ~state.slot["evicted"]


@register
class TOVA(_Evicting):
    """TOVA: the query at t attends the K = K(n) keys held (t and the K − 1 kept after query
    t − 1); its own row A_t then keeps the K(n + 1) − 1 keys it attended most and evicts the
    rest for good (one key per step once K stops growing), ties to the more recent key.

    The budget counts the keys a query attends, as for every policy here: TOVA's
    "multi-state" between steps is K − 1 keys (the paper's cache size + the new token = K).
    The row is summed over all of the layer's query heads (the paper averages them: same order).

    State: ``evicted`` (B, C) bool.
    """

    name = "tova"
    kernel = 2  # alisa._fast.TOVA

    def new_state(self, batch, device):
        return PolicyState(slot={"evicted": torch.zeros(batch, 0, dtype=torch.bool, device=device)})

    def kernel_state(self, state, pos):
        return None, state.slot["evicted"], None, None

    def recent_count(self, n):
        return _at_most(n, 1)  # only the query's own token is certain to be attended

    def observe(self, state, pos, t, keep, row):
        if not self.needs_rows:
            return
        # keys the next query attends besides itself; K grows by at most one, so at most one key goes
        k_next = self.full_count(t + 2) - 1
        top = topk_mask(row, keep, k_next, None if state.n_max is None else self.full_count(state.n_max + 1) - 1)
        ev = state.slot["evicted"]
        # Assignment, not |=: with dense rows (prefill="dense") the last prompt row decides what is
        # held; with sparse rows every earlier eviction is outside ``keep``, so the two agree.
        ev.copy_(torch.where((t >= 0)[:, None], causal(pos, t[:, None]) & ~top, ev))


class _SnapState(PolicyState):
    """SnapKV's state, plus whether the prompt length ``P`` is known yet and whether every row
    is past its prompt (host flags: no device read)."""

    def __init__(self, slot, other, known: bool):
        super().__init__(slot, other)
        self.known = known
        self.past_prompt = False  # every row has observed its last prompt query: nothing left to compress


@register
class SnapKV(_Evicting):
    """SnapKV: the prompt (positions 0..P−1) attends fully; at its end the layer keeps
    K = K(P) prompt keys: the last min(w, K) (the window) plus the top-(K − min(w, K)) of the
    earlier ones by S̄, where S_j = Σ A_q[j] over the last min(w, P) prompt queries q and S̄ is S
    summed over a box of ``pool`` positions centred on j (zero outside the candidates; SnapKV's
    average pooling, same order). Later queries attend the kept prompt keys and every key after
    the prompt; nothing after the prompt is ever evicted.

    The prompt: ``prompt=P`` real tokens (every path, every chunking: exact between them), or
    ``prompt=None`` (default) the keys the store holds when its first query attends — the
    prefill call of a cache; a forward without a cache is then all prompt (dense).

    Parameters
    ----------
    window : int
        w, the observation window (SnapKV: 32).
    pool : int
        Odd width of the pooling box over key positions (SnapKV: 5; 1 = no pooling).
    prompt : int, optional
        Prompt length in real tokens; ``None``: the first chunk a cache sees.

    State: ``S`` (B, C) float64, ``evicted`` (B, C) bool, ``P`` (B,) prompt length per row.
    """

    name = "snapkv"
    kernel = 3  # alisa._fast.SNAPKV

    def __init__(self, sparsity=None, budget=None, window: int = 32, pool: int = 5, prompt: int | None = None):
        super().__init__(sparsity=sparsity, budget=budget)
        _int_param("window", window, "an integer >= 1 (prompt queries)", lambda v: v >= 1)
        _int_param("pool", pool, "an odd integer >= 1 (key positions)", lambda v: v >= 1 and v % 2 == 1)
        if prompt is not None:
            _int_param("prompt", prompt, "an integer >= 1 (real tokens) or None (the first chunk)", lambda v: v >= 1)
        self.window, self.pool, self.prompt = window, pool, prompt

    @property
    def params(self):
        return {"window": self.window, "pool": self.pool, "prompt": self.prompt}

    @property
    def kernel_params(self):
        return (self.window, self.pool)

    def expected_held(self, n):
        if self.prompt is None:
            return float(n)  # the prompt length is not known here: the bound (K(P) + n − P <= n)
        if n <= self.prompt:
            return float(n)
        return float(min(n, self.full_count(self.prompt) + n - self.prompt))

    expected_selected = expected_held  # a query attends every key held

    def recent_count(self, n):
        return _at_most(n, self.window)

    def new_state(self, batch, device):
        return _SnapState(
            slot={"S": torch.zeros(batch, 0, dtype=torch.float64, device=device),
                  "evicted": torch.zeros(batch, 0, dtype=torch.bool, device=device)},
            other={"P": torch.full((batch,), -1 if self.prompt is None else self.prompt, dtype=torch.long, device=device)},
            known=self.prompt is not None)

    def _know_prompt(self, state, pos):
        if not state.known:  # the first query of this store: every slot it holds is prompt
            state.other["P"].copy_(pos.max(1).values.clamp(min=-1) + 1)
            state.known = True

    def kernel_state(self, state, pos):
        self._know_prompt(state, pos)  # the kernel reads P: fix it before the first query, as observe() would
        return state.slot["S"], state.slot["evicted"], None, state.other["P"][:, None]

    def observe(self, state, pos, t, keep, row):
        if not self.needs_rows:
            return
        self._know_prompt(state, pos)
        P = state.other["P"]
        real = t >= 0
        window = real & (t >= P - self.window) & (t < P)
        state.slot["S"] += torch.where(window[:, None], row.to(torch.float64), 0.0)
        if state.past_prompt or state.fixed:  # decode: the window and the compression are behind every row
            return
        last = real & (t == P - 1)
        any_last, past = torch.stack([last.any(), (real & (t >= P - 1)).all()]).tolist()  # one read-back
        if any_last:
            self._compress(state, pos, last)
        state.past_prompt = bool(past)

    def _compress(self, state, pos, rows):
        """After the last prompt query of ``rows`` (B,): evict the prompt keys SnapKV drops."""
        P, S = state.other["P"], state.slot["S"]
        K = self.full_count(P.clamp(min=1))
        kw = K.clamp(max=self.window)  # window keys kept
        edge = (P - kw)[:, None]
        cand = (pos >= 0) & (pos < edge)
        # S̄ by position: candidates' S at position + h, a dump column last, then a box sum
        B, h, L = pos.shape[0], self.pool // 2, int(P.max())
        by_pos = S.new_zeros(B, L + 2 * h + 1).scatter_add_(1, torch.where(cand, pos + h, L + 2 * h), S)
        pooled = by_pos[:, :L + 2 * h].unfold(1, 2 * h + 1, 1).sum(-1)  # (B, L): pooled[j] = Σ_{|i-j|<=h} S_i
        score = pooled.gather(1, pos.clamp(0, L - 1))
        kept = topk_mask(score, cand, K - kw) | ((pos >= edge) & (pos < P[:, None]))
        state.slot["evicted"] |= rows[:, None] & (pos >= 0) & (pos < P[:, None]) & ~kept


class _PageState(PolicyState):
    """Quest's state: per page of ``P`` positions, the min and max of each key channel.

    ``other["kmin"]``, ``other["kmax"]``: (B, H_kv, pages + 1, D) float32 (the last page is a
    dump for padding columns); ``cols``: columns appended so far (a host bound on the pages).
    """

    def __init__(self):
        super().__init__()
        self.cols = 0


@register
class Quest(Policy):
    """Quest: query-aware page selection; nothing is evicted (sparse compute, full memory).

    Positions are split into pages of P (``page_size``) consecutive tokens. For each page
    the store keeps the min m and max M of every key channel; the query q at t bounds its
    logits in a page by U = Σ_heads Σ_d max(q_d·M_d, q_d·m_d) >= Σ_heads q·k_j for every key
    j in it. The query attends the page holding t (always: its keys are the newest, its
    bound would depend on keys not written yet) plus the top-(p − 1) earlier pages by U,
    p = ceil(K / P) pages for K = K(n) tokens, ties to the more recent page; when p reaches
    the pages up to t the row is dense. One page set per layer for all heads (bounds summed
    over query heads; the paper selects per head and keeps its first two layers dense).
    With P = 1 it is t plus the exact top-(K − 1) keys by Σ_heads q·k.

    It needs the query and the keys (``needs_qk``): the stores pass each appended key to
    :meth:`observe_keys` and the attention passes ``query=`` to :meth:`select`.
    """

    name = "quest"
    needs_qk = True
    selects_ahead = False  # its selection needs the query

    def __init__(self, sparsity=None, budget=None, page_size: int = 16):
        super().__init__(sparsity=sparsity, budget=budget)
        _int_param("page_size", page_size, "an integer >= 1 (tokens per page)", lambda v: v >= 1)
        self.page_size = page_size

    @property
    def params(self):
        return {"page_size": self.page_size}

    def expected_held(self, n):
        return float(n)  # every key, plus the page bounds (2·D floats per page and KV head)

    def expected_selected(self, n):
        return float(min(n, self._pages(n) * self.page_size))

    def max_selected(self, n):
        return int(self.expected_selected(n))  # exact: p pages (fewer tokens in the newest), or every key

    def recent_count(self, n):
        return _at_most(n, self.page_size)

    def shares_dense_prefill(self, prefill):
        return False  # its page bounds are built as the store appends keys

    def _pages(self, n):
        return (self.full_count(n) + self.page_size - 1) // self.page_size

    def new_state(self, batch, device):
        return _PageState()

    def observe_keys(self, state: _PageState, key: torch.Tensor, pos: torch.Tensor) -> None:
        """Fold appended keys (B, H_kv, Q, D) at positions ``pos`` (B, Q; -1 padding) into the page bounds."""
        B, H, Q, D = key.shape
        if not state.fixed:  # else sized for every position to come (prepare)
            state.cols += Q
            self._grow(state, -(-state.cols // self.page_size), key)  # real positions are < the columns appended
        dump = state.other["kmax"].shape[2] - 1
        page = torch.where(pos >= 0, torch.div(pos, self.page_size, rounding_mode="floor"), dump)
        idx = page[:, None, :, None].expand(B, H, Q, D)
        state.other["kmax"].scatter_reduce_(2, idx, key.float(), reduce="amax")
        state.other["kmin"].scatter_reduce_(2, idx, key.float(), reduce="amin")

    def prepare(self, state, n_max):
        """Also size the page bounds for every position < ``n_max`` now (no re-allocation later)."""
        super().prepare(state, n_max)
        if state is not None and "kmax" in state.other:
            self._grow(state, -(-n_max // self.page_size), state.other["kmax"])

    @staticmethod
    def _grow(state: _PageState, need: int, like: torch.Tensor) -> None:
        """Room for ``need`` pages (plus the dump page) in the bounds, keeping those known."""
        kmax = state.other.get("kmax")
        if kmax is not None and kmax.shape[2] - 1 >= need:
            return
        B, H, D = like.shape[0], like.shape[1], like.shape[-1]
        cap = need if kmax is None else max(need, int(1.5 * (kmax.shape[2] - 1)) + 4)
        grown = {"kmin": like.new_full((B, H, cap + 1, D), float("inf"), dtype=torch.float32),
                 "kmax": like.new_full((B, H, cap + 1, D), float("-inf"), dtype=torch.float32)}
        if kmax is not None:
            old = kmax.shape[2] - 1
            for name, buf in grown.items():
                buf[:, :, :old] = state.other[name][:, :, :old]
        state.other.update(grown)

    def page_scores(self, state: _PageState, query: torch.Tensor) -> torch.Tensor:
        """U (B, Q, pages) of query (B, H_q, Q, D) against every page's bounds, summed over query heads.

        Pages with no key yet give -inf or NaN; :meth:`select` never ranks them."""
        kmin, kmax = state.other["kmin"][:, :, :-1], state.other["kmax"][:, :, :-1]
        B, Hq, Q, D = query.shape
        Hkv, G = kmax.shape[1], Hq // kmax.shape[1]
        q = query.float().reshape(B, Hkv, G * Q, D)
        u = q.clamp(min=0) @ kmax.transpose(-1, -2) + q.clamp(max=0) @ kmin.transpose(-1, -2)
        return u.view(B, Hkv, G, Q, -1).sum((1, 2))

    def select(self, pos, t, state, query=None):
        """Keys of the queries at ``t``: ``pos`` (B, 1, C) with ``t`` (B, Q, 1) and ``query``
        (B, H_q, Q, D), or one query per row: ``pos`` (B, C), ``t`` (B, 1), ``query`` (B, H_q, 1, D)."""
        flat = pos.dim() == 2
        if flat:
            pos, t = pos[:, None], t[:, :, None]
        c = causal(pos, t)
        P = self.page_size
        page_t = torch.div(t, P, rounding_mode="floor")  # (B, Q, 1); -1 for padding queries
        p = self._pages(t + 1)
        dense = p >= page_t + 1
        bounds = query is not None and state is not None and "kmax" in state.other
        if not bounds:
            if bool(dense.all()):
                return c[:, 0] if flat else c
            raise ValueError("policy 'quest' selects with the query and its page bounds: pass query= and the store's state")
        u = self.page_scores(state, query)  # (B, Q, pages)
        B, Q, Np = u.shape
        ids = torch.arange(Np, device=u.device)
        cand = ids < page_t  # earlier pages (complete)
        k_max = None if state.n_max is None else self._pages(state.n_max) - 1  # no read-back of k
        top = topk_mask(u.reshape(B * Q, Np), cand.reshape(B * Q, Np), (p - 1).reshape(B * Q), k_max).view(B, Q, Np)
        on = top | (ids == page_t) | dense
        kp = torch.div(pos, P, rounding_mode="floor").clamp(0, Np - 1).expand(B, Q, pos.shape[-1])
        keep = c & on.gather(2, kp)
        return keep[:, 0] if flat else keep
