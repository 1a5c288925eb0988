"""TOVA, SnapKV and Quest (docs/semantics.md §2): behaviour on hand-checkable cases, the prompt
semantics of SnapKV, the runtime with offload, and the memory each one measurably holds.

Simulation ≡ decode ≡ runtime on every family is in tests/test_equivalence.py and
tests/test_runtime.py (their policy lists include these three)."""

import pytest
import torch

import alisa
from alisa.kvstore import SlotStore
from alisa.runtime.costmodel import Profile, Workload, search
from alisa.runtime.engine import Engine
from alisa.runtime.tiered import Plan
from conftest import padded_batch, tiny_model
from test_equivalence import decode


def store_of(policy, n, key=None, pos=None):
    """A store holding keys at positions 0..n-1 (or ``pos``), as the accuracy path builds it."""
    store = SlotStore(policy)
    pos = torch.arange(n)[None] if pos is None else pos
    key = torch.zeros(pos.shape[0], 1, pos.shape[1], 1) if key is None else key
    store.append(key, torch.zeros_like(key), pos)
    return store


def run_rows(policy, n, row_fn):
    """Queries 0..n-1 of one sequence in order: select, then observe ``row_fn(t, keep)`` (C,) float64.
    Returns each query's selection (list of positions) and the state."""
    store = store_of(policy, n)
    pos = store.kv()[2]
    keeps = []
    for t in range(n):
        tt = torch.tensor([t])
        keep = policy.select(pos, tt, store.state)
        policy.observe(store.state, pos, tt, keep, (row_fn(t, keep[0]) * keep[0])[None])
        keeps.append(keep[0].nonzero().flatten().tolist())
    return keeps, store.state


# --- TOVA -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(budget=5), dict(sparsity=0.6)])
def test_tova_attends_k_and_evicts_the_lowest_attended(kw):
    p = alisa.make_policy("tova", **kw)
    g = torch.Generator().manual_seed(3)
    vals = (torch.randint(0, 4, (30, 30), generator=g) / 4).double() + 0.25  # quarters: many ties

    keeps, state = run_rows(p, 30, lambda t, keep: vals[t])
    held = []  # reference: the paper's rule with this project's budget (docs/semantics.md §2)
    for t, got in enumerate(keeps):
        att = held + [t]
        assert got == att, t
        assert len(got) == p.full_count(t + 1)  # the query attends exactly K keys
        k_next = p.full_count(t + 2) - 1
        held = sorted(sorted(att, key=lambda j: (vals[t][j].item(), j), reverse=True)[:k_next])  # ties: the older goes
    assert (~state.slot["evicted"][0]).nonzero().flatten().tolist() == held


def test_tova_dense_prompt_keeps_the_last_rows_top():
    """prefill=dense: every prompt row attends fully; what is held after it is the last row's top K-1."""
    p = alisa.make_policy("tova", budget=4)
    store = store_of(p, 10)
    pos = store.kv()[2]
    rows = torch.rand(10, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for t in range(10):
        keep = pos <= t  # a dense row
        p.observe(store.state, pos, torch.tensor([t]), keep, (rows[t] * keep[0])[None])
    kept = p.retain(pos, torch.tensor([10]), store.state)[0].nonzero().flatten().tolist()
    assert kept == sorted(rows[9].topk(3).indices.tolist())


# --- SnapKV -----------------------------------------------------------------------------------
def test_snapkv_keeps_the_window_plus_top_pooled_keys_and_never_evicts_in_decode():
    p = alisa.make_policy("snapkv", budget=7, window=3, pool=3, prompt=12)  # K = 7: window 9..11 + 4 pooled

    def rows(t, keep):
        row = torch.full((20,), 2.0 ** -7, dtype=torch.float64)  # binary fractions: the sums below are exact
        if t < 9:
            row[0] = 100.0  # queries before the observation window do not count
        elif t < 12:
            row[2], row[6] = 1.0, 0.75  # the window's rows: S_2 = 3, S_6 = 2.25 (+ 3·2^-7 everywhere)
        else:
            row[4] = 100.0  # decode rows never evict anything
        return row

    keeps, state = run_rows(p, 20, rows)
    for t in range(12):
        assert keeps[t] == list(range(t + 1))  # the prompt attends fully
    # pooled over 3 positions: S̄_1..3 = 3 + 6·2^-7 > S̄_5..7 = 2.25 + 6·2^-7 (tie: 7 is more recent) > the rest;
    # without pooling it would be {2, 6} and two filler keys
    kept = [1, 2, 3, 7, 9, 10, 11]
    for t in range(12, 20):
        assert keeps[t] == kept + list(range(12, t + 1)), t
    assert p.retain(torch.arange(20)[None], torch.tensor([20]), state)[0].nonzero().flatten().tolist() == kept + list(range(12, 20))


def test_snapkv_first_chunk_is_the_prompt_and_a_cacheless_forward_is_dense():
    """prompt=None: the prompt is what the store holds when its first query attends."""
    p = alisa.make_policy("snapkv", sparsity=0.8, window=2, pool=1)
    keeps, state = run_rows(p, 30, lambda t, keep: torch.ones(30, dtype=torch.float64))
    assert all(k == list(range(t + 1)) for t, k in enumerate(keeps))  # all 30 are prompt: dense
    assert int(state.other["P"]) == 30


@torch.no_grad()
def test_snapkv_prompt_none_is_the_prefill_chunk_in_every_path():
    """Decode with prompt=None (prompt = the prefill chunk) equals, row by row, the one-forward
    simulation with prompt = that row's real prompt length (the runtime: tests/test_runtime.py)."""
    model = tiny_model("llama")
    ids, mask = padded_batch(36)
    split, kw = 24, dict(sparsity=0.7, window=4, pool=3)
    with alisa.apply(model, "snapkv", **kw) as run:
        dec, cache = decode(model, ids, mask, split)
        full = model(ids, attention_mask=mask, use_cache=False).logits
    ref = model(ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    assert (full - ref)[real].abs().max().item() < 1e-5  # a forward without a cache is all prompt
    for b in range(ids.shape[0]):
        one = ids[b, real[b]][None]
        P = int(mask[b, :split].sum())
        with alisa.apply(model, "snapkv", prompt=P, **kw):
            sim = model(one, use_cache=False).logits[0]
        assert (sim - dec[b, real[b]]).abs().max().item() < 1e-4, b
        assert (sim - ref[b, real[b]]).abs().max().item() > 1e-3  # compression changed something
    assert run.kept_fraction()["overall"] < 1


# --- Quest ------------------------------------------------------------------------------------
def quest_case(page_size, sparsity=0.5, seed=0, n=30):
    """Random keys (B=2, H_kv=2, D=8; row 1 left-padded by 3) in a store, and random queries (H_q=4)."""
    g = torch.Generator().manual_seed(seed)
    p = alisa.make_policy("quest", sparsity=sparsity, page_size=page_size)
    pos = torch.arange(n).repeat(2, 1)
    pos[1] = torch.where(pos[1] < 3, -1, pos[1] - 3)
    key = torch.randn(2, 2, n, 8, generator=g)
    return p, store_of(p, n, key, pos), key, torch.randn(2, 4, 1, 8, generator=g)


def qk(key, query, pos):
    """Σ over query heads of q·k for every slot, (B, C) (GQA: heads 2h, 2h+1 share key head h)."""
    k = key.repeat_interleave(2, 1)
    return (query[:, :, 0, None, :] * k).sum(-1).sum(1)


@pytest.mark.parametrize("page_size", [1, 4, 7])
def test_quest_bound_covers_every_key_of_its_page(page_size):
    p, store, key, query = quest_case(page_size)
    pos = store.kv()[2]
    u = p.page_scores(store.state, query)[:, 0]  # (B, pages)
    true = qk(key, query, pos)
    page = pos // page_size
    for b in range(2):
        for j in (pos[b] >= 0).nonzero().flatten().tolist():
            assert u[b, page[b, j]] >= true[b, j] - 1e-5
    if page_size == 1:  # a page of one key: the bound is the key's q·k
        for b in range(2):
            real = pos[b] >= 0
            torch.testing.assert_close(u[b, pos[b, real]], true[b, real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("page_size,sparsity", [(4, 0.5), (5, 0.8), (3, 0.3)])
def test_quest_selects_whole_top_pages_and_the_current_page(page_size, sparsity):
    p, store, key, query = quest_case(page_size, sparsity, seed=1)
    pos = store.kv()[2]
    for t in (9, 17, 25):
        tt = torch.tensor([t, t])
        keep = p.select(pos, tt[:, None], store.state, query=query)
        u = p.page_scores(store.state, query)[:, 0]
        pages = (p.full_count(t + 1) + page_size - 1) // page_size
        for b in range(2):
            real = (pos[b] >= 0) & (pos[b] <= t)
            on = set((pos[b][keep[b]] // page_size).tolist())
            for pg in on:  # whole pages: every causal key of a selected page
                assert bool(keep[b][real & (pos[b] // page_size == pg)].all())
            cur = t // page_size
            assert cur in on  # the page holding t, always
            earlier = sorted(on - {cur})
            if pages >= cur + 1:
                assert earlier == list(range(cur))  # dense row
                continue
            assert len(earlier) == pages - 1
            rank = sorted(range(cur), key=lambda pg: (u[b, pg].item(), pg), reverse=True)  # ties: more recent page
            assert earlier == sorted(rank[:pages - 1])


def test_quest_with_pages_of_one_is_exact_topk_by_qk():
    p, store, key, query = quest_case(1, sparsity=0.7, seed=2)
    pos = store.kv()[2]
    true = qk(key, query, pos)
    for t in (10, 20, 26):
        keep = p.select(pos, torch.tensor([[t], [t]]), store.state, query=query)
        k = p.full_count(t + 1)
        for b in range(2):
            others = ((pos[b] >= 0) & (pos[b] < t)).nonzero().flatten()
            top = others[true[b, others].topk(k - 1).indices]
            want = sorted([*pos[b, top].tolist(), t])
            assert pos[b][keep[b]].tolist() == want


def test_quest_without_query_is_refused_unless_dense():
    p, store, key, query = quest_case(4)
    pos = store.kv()[2]
    assert bool(p.select(pos, torch.tensor([[2], [2]]), None).eq((pos >= 0) & (pos <= 2)).all())  # dense: no query needed
    with pytest.raises(ValueError, match="query="):
        p.select(pos, torch.tensor([[20], [20]]), store.state)


# --- runtime, memory, cost model, bad input -------------------------------------------------
NEW_POLICIES = [("tova", dict(sparsity=0.7)), ("snapkv", dict(sparsity=0.7, window=4)), ("quest", dict(sparsity=0.5, page_size=4))]


@torch.no_grad()
@pytest.mark.parametrize("name,kw", NEW_POLICIES, ids=[n for n, _ in NEW_POLICIES])
def test_runtime_with_offload_and_recompute_keeps_tokens(name, kw):
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    ref = Engine(model, name, prefill="sparse", **kw).generate(ids, mask, 8, keep_logits=True)
    g = Engine(model, name, prefill="sparse", plan=Plan(alpha=0.7, beta=0.5, p1=1, p2=4), **kw).generate(ids, mask, 8, keep_logits=True)
    assert torch.equal(g.tokens, ref.tokens)
    torch.testing.assert_close(g.extra["logits"], ref.extra["logits"], atol=1e-5, rtol=0)
    assert g.traffic.tokens_fetched > 0 and g.traffic.tokens_recomputed > 0


def held_after(policy, t_next, prompt):
    """Tokens the decode cache holds between steps, before the token at t_next joins."""
    if policy.name == "tova":
        return policy.full_count(t_next + 1) - 1
    if policy.name == "snapkv":
        return policy.full_count(prompt) + (t_next - prompt)
    return t_next  # quest: everything


@torch.no_grad()
@pytest.mark.parametrize("name,kw", NEW_POLICIES, ids=[n for n, _ in NEW_POLICIES])
def test_measured_memory(name, kw):
    """What each policy says it holds (expected_held) is what the decode cache and the runtime hold."""
    model = tiny_model("llama")
    T, new = 30, 8
    ids = torch.randint(2, 101, (2, T), generator=torch.Generator().manual_seed(4))
    pol = alisa.make_policy(name, **({"prompt": T} if name == "snapkv" else {}), **kw)  # expected_held needs the prompt
    with alisa.apply(model, pol) as run:
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
        cache = run.last_cache
    t_next = T + new - 1  # the last generated token is never fed back
    want = held_after(pol, t_next, T)
    assert cache.tokens_held() == [float(want)] * 2
    assert pol.expected_held(t_next + 1) == want + 1  # the cache plus the token that joins it
    cfg = model.config
    per_head = (cfg.hidden_size // cfg.num_attention_heads) * 4  # one float32 vector of a head
    kv_per_token = 2 * cfg.num_key_value_heads * per_head  # K and V of one token, one sequence
    for b in cache.bytes_allocated():
        assert b["kv"] >= 2 * want * kv_per_token
        if name == "quest":  # page bounds: min and max per page, KV head and channel, sequence
            pages = -(-t_next // pol.page_size)
            assert b["state"] >= 2 * 2 * pages * cfg.num_key_value_heads * per_head
        else:
            assert b["kv"] < 2 * t_next * kv_per_token  # evicted keys gave their memory back
    g = Engine(model, pol, prefill="sparse").generate(ids, None, new)
    for j, tiers in enumerate(g.tiers, start=1):  # before decode step j - 1: T + j - 1 tokens seen
        assert tiers["device"] == held_after(pol, T + j - 1, T), j
    if name == "quest":
        assert g.kv["policy_state"] > 0


def test_cost_model_plans_each_policy():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("llama", vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=4, intermediate_size=96)
    prof = Profile(device="cpu", hardware={}, model="x", dtype="float32", step_base_s=0.01, step_per_seq_s=0.001,
                   attn_read_bw=1e10, copy_bw=1e9, recompute_flops=1e12, device_capacity=1 << 30, host_capacity=1 << 32)
    wl = Workload(batch=4, prompt=256, new_tokens=64)
    for name, kw in [*NEW_POLICIES, ("snapkv", dict(sparsity=0.7, prompt=256))]:
        pol = alisa.make_policy(name, **kw)
        roomy = search(prof, cfg, "float32", pol, wl, device_budget=1e12, host_budget=1e12)
        assert roomy.plan == Plan()
        need = roomy.peak_device_bytes
        tight = search(prof, cfg, "float32", pol, wl, device_budget=0.7 * need, host_budget=1e12)
        assert tight.feasible and tight.plan.alpha > 0, (name, tight.note)
    held = {n: alisa.make_policy(n, **kw).expected_held(320) for n, kw in NEW_POLICIES}
    assert held == {"tova": 96.0, "snapkv": 320.0, "quest": 320.0}  # snapkv without prompt=: the bound n
    assert alisa.make_policy("snapkv", sparsity=0.7, prompt=256).expected_held(320) == 77 + 64


@pytest.mark.parametrize("name,kw,match", [
    ("quest", dict(page_size=0), r"page_size=0 is invalid: allowed is an integer >= 1"),
    ("snapkv", dict(window=0), r"window=0 is invalid: allowed is an integer >= 1"),
    ("snapkv", dict(pool=4), r"pool=4 is invalid: allowed is an odd integer >= 1"),
    ("snapkv", dict(prompt=0), r"prompt=0 is invalid: allowed is an integer >= 1"),
])
def test_bad_hyperparameters_are_one_clear_line(name, kw, match):
    with pytest.raises(ValueError, match=match) as e:
        alisa.make_policy(name, sparsity=0.5, **kw)
    assert "\n" not in str(e.value)
