"""Behavioural tests of each policy on small hand-checkable cases (docs/semantics.md §2)."""

import pytest
import torch

import alisa
from alisa.kvstore import SlotStore
from alisa.policies import topk_mask


def kept(policy, n):
    """Positions a stateless policy keeps for the query at t = n - 1 over keys 0..n-1."""
    pos = torch.arange(n)[None]
    keep = policy.select(pos, torch.tensor([[n - 1]]), None)
    return pos[keep].tolist()


def test_counts_round_half_up_exactly():
    p = alisa.make_policy("local", sparsity=0.8)  # r = 1/5 exactly, not 0.19999...
    n = torch.arange(1, 16)
    assert p.full_count(n).tolist() == [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3]
    assert int(p.half_count(torch.tensor(15))) == 2  # 1.5 rounds up; float arithmetic gives 1
    b = alisa.make_policy("swa", budget=5)
    assert int(b.half_count(torch.tensor(100))) == 3 and b.full_count(torch.tensor([3, 9])).tolist() == [3, 5]


def test_local_window():
    assert kept(alisa.make_policy("local", sparsity=0.7), 10) == [7, 8, 9]
    assert kept(alisa.make_policy("local", sparsity=0.7), 5) == [3, 4]  # round(1.5) = 2
    assert kept(alisa.make_policy("local", budget=5), 3) == [0, 1, 2]
    assert kept(alisa.make_policy("local", budget=5), 12) == [7, 8, 9, 10, 11]


def test_strided_stride():
    # n = 20, r = 0.2: k = 2 recent, s = ceil(18 / 2) = 9 -> j with (19 - j) % 9 == 0
    assert kept(alisa.make_policy("strided", sparsity=0.8), 20) == [1, 10, 18, 19]
    # n = 9, r = 0.5: k = round(2.25) = 2, s = ceil(7/2) = 4
    assert kept(alisa.make_policy("strided", sparsity=0.5), 9) == [0, 4, 7, 8]


def test_sinks_keeps_first_four():
    assert kept(alisa.make_policy("sinks", sparsity=0.7), 30) == [0, 1, 2, 3, 25, 26, 27, 28, 29]
    assert kept(alisa.make_policy("sinks", sparsity=0.9), 6) == [0, 1, 2, 3, 5]  # K at least 5
    assert kept(alisa.make_policy("sinks", sparsity=0.9), 5) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("name", sorted(alisa.POLICIES))
def test_sparsity_zero_selects_everything(name):
    p = alisa.make_policy(name, sparsity=0.0)
    store = SlotStore(p)
    n = 25
    store.append(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1), torch.arange(n)[None])
    pos = store.kv()[2]
    for t in range(n):
        tt = torch.tensor([t])
        keep = p.select(pos, tt, store.state) if p.stateful else p.select(pos, tt[:, None], None)
        assert keep.sum().item() == t + 1
        if p.stateful:
            p.observe(store.state, pos, tt, keep, keep.double() / (t + 1))


def test_topk_ties_go_to_the_more_recent():
    score = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    cand = torch.tensor([[True, True, True, True, True, False]])
    assert topk_mask(score, cand, torch.tensor([2]))[0].nonzero().flatten().tolist() == [2, 4]
    assert topk_mask(score, cand, torch.tensor([10]))[0].tolist() == cand[0].tolist()


def _topk_by_sort(score, cand, k):
    """The definition, by a full stable sort: rank candidates by score, the more recent first among equals."""
    flipped = torch.where(cand, score, float("-inf")).flip(-1)
    order = torch.sort(flipped, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    return cand & (rank.flip(-1) < k[:, None])


def test_threshold_topk_is_the_sorted_definition():
    """topk_mask (a threshold, O(C)) selects what a full stable sort selects, ties and all,
    with k per row, with or without a host bound k_max, k beyond the candidates and k = 0."""
    g = torch.Generator().manual_seed(0)
    for case in range(300):
        B, C = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(1, 40, (1,), generator=g))
        score = torch.randint(0, 1 + case % 6, (B, C), generator=g).double() / 3  # few values: many ties
        cand = torch.rand(B, C, generator=g) < 0.7
        k = torch.randint(0, C + 3, (B,), generator=g)
        want = _topk_by_sort(score, cand, k)
        assert torch.equal(topk_mask(score, cand, k), want), case
        assert torch.equal(topk_mask(score, cand, k, k_max=int(k.max()) + int(case % 3)), want), case
        assert torch.equal(topk_mask(score.float(), cand, k), want), case


def drive(policy, n, row_fn):
    """Run a stateful policy over queries 0..n-1 with rows from ``row_fn(t, keep, state)``."""
    store = SlotStore(policy)
    store.append(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1), torch.arange(n)[None])
    pos = store.kv()[2]
    keeps = []
    for t in range(n):
        tt = torch.tensor([t])
        keep = policy.select(pos, tt, store.state)
        policy.observe(store.state, pos, tt, keep, row_fn(t, keep[0], store.state)[None])
        keeps.append(keep[0].clone())
    return keeps, store.state


def test_h2o_never_readmits_an_evicted_token():
    p = alisa.make_policy("h2o", budget=4)  # k = 2: 2 recent + 2 heavy
    evicted_at = {}

    def rows(t, keep, state):
        row = keep.double() * 0.01
        row[: min(2, t + 1)] += 1.0  # tokens 0 and 1 are the heavy hitters
        ev = state.slot["evicted"][0]
        if ev[5]:
            row[5] += 100.0  # even a huge score cannot bring an evicted token back
        for j in ev.nonzero().flatten().tolist():
            evicted_at.setdefault(j, t)
        return row

    keeps, state = drive(p, 20, rows)
    assert 5 in evicted_at
    for t, keep in enumerate(keeps):
        assert keep.sum() <= min(t + 1, 4)
        assert all(not keep[j] for j, t0 in evicted_at.items() if t > t0), (t, keep.nonzero().flatten().tolist())
        if t >= 4:
            assert keep[0] and keep[1]  # heavy hitters stay
    assert state.slot["evicted"][0].sum() == 20 - 4


def test_swa_picks_only_positive_window_scores_ties_to_recent():
    p = alisa.make_policy("swa", budget=4)  # k = 2: L = {t-1, t}, window = rows t-2, t-1

    def rows(t, keep, state):
        row = torch.zeros(keep.shape[0], dtype=torch.float64)
        if t <= 6:
            row[0] = row[2] = 0.5  # heavy early, but these rows leave the window
        elif t <= 9:
            row[1] = row[3] = row[5] = 1 / 3  # equal scores: ties
        else:
            row[3] = 1.0  # only token 3 has S > 0
        return row

    keeps, _ = drive(p, 14, rows)
    at = lambda t: keeps[t].nonzero().flatten().tolist()
    assert at(3) == [0, 1, 2, 3]  # n = 4 <= 2k: dense
    assert at(6) == [0, 2, 5, 6]  # window rows 4, 5 put mass on 0 and 2
    assert at(10) == [3, 5, 9, 10]  # window rows 8, 9: {1, 3, 5} tie -> the two most recent
    assert at(12) == [3, 11, 12]  # window rows 10, 11: only token 3 has S > 0; no filler
    assert at(13) == [3, 12, 13]


def test_swa_window_follows_k_with_sparsity():
    # r = 0.5: k(n) = round(n/4); the ring must hold k rows as k grows.
    p = alisa.make_policy("swa", sparsity=0.5)
    n = 60
    keeps, state = drive(p, n, lambda t, keep, st: keep.double() / keep.sum())
    t = n - 1
    k_next = int(p.half_count(torch.tensor(n + 1)))
    assert int((state.other["ring_q"] >= 0).sum()) == k_next  # rows t+1-k'..t
    for t, keep in enumerate(keeps):
        k = int(p.half_count(torch.tensor(t + 1)))
        assert keep.sum() <= max(2 * k, t + 1 if 2 * k >= t + 1 else 0)
