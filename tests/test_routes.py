"""The compiled route (numba) of the stateful step equals the PyTorch reference route.

Same selections (bit for bit) and logits within 1e-5 on the tiny models of every family,
for every stateful policy, left-padded batches and split points, on the accuracy path,
the decode path, dense prefill and the runtime (with offload and recomputation).
"""

import warnings

import pytest
import torch

import alisa
from alisa import _fast, attention
from alisa.policies import PolicyState, topk_mask
from alisa.runtime.engine import Engine
from alisa.runtime.tiered import Plan
from conftest import padded_batch, tiny_model
from test_equivalence import decode

SETTINGS = [("h2o", dict(sparsity=0.8)), ("h2o", dict(budget=9)), ("swa", dict(sparsity=0.8)),
            ("swa", dict(sparsity=0.5)), ("swa", dict(budget=9)), ("tova", dict(sparsity=0.8)),
            ("tova", dict(budget=9)), ("snapkv", dict(sparsity=0.8, window=4, pool=3)),
            ("snapkv", dict(budget=9, window=6))]
IDS = [f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for n, kw in SETTINGS]
T = 40


def recorded(monkeypatch, route, fn):
    """Run ``fn`` on ``route``; returns its result and every selection the step made, in order."""
    monkeypatch.setattr(attention, "ROUTE", route)
    keeps, inner = [], attention.attend_with_feedback

    def spy(*args, **kw):
        probs, keep = inner(*args, **kw)
        keeps.append(keep.clone())
        return probs, keep

    monkeypatch.setattr(attention, "attend_with_feedback", spy)
    monkeypatch.setattr("alisa.runtime.tiered.attend_with_feedback", spy)
    try:
        return fn(), keeps
    finally:
        monkeypatch.setattr(attention, "attend_with_feedback", inner)
        monkeypatch.setattr("alisa.runtime.tiered.attend_with_feedback", inner)


def same_selections(a, b):
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), f"call {i}: {int((x != y).sum())} selections differ"


@torch.no_grad()
@pytest.mark.parametrize("name,kw", SETTINGS, ids=IDS)
def test_accuracy_and_decode_paths(monkeypatch, family_model, name, kw):
    ids, mask = padded_batch(T)
    real = mask.bool()

    def run():
        with alisa.apply(family_model, name, **kw):
            sim = family_model(ids, attention_mask=mask, use_cache=False).logits
            decs = [decode(family_model, ids, mask, split)[0] for split in (1, 13, 30)]
        return sim, decs

    (sim_r, dec_r), keep_r = recorded(monkeypatch, "reference", run)
    (sim_c, dec_c), keep_c = recorded(monkeypatch, "auto", run)
    same_selections(keep_r, keep_c)
    assert (sim_r - sim_c)[real].abs().max().item() < 1e-5
    for a, b in zip(dec_r, dec_c):
        assert (a - b)[real].abs().max().item() < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("name", ["h2o", "swa", "tova", "snapkv"])
def test_dense_prefill_and_sliding_window(monkeypatch, name):
    model = tiny_model("mistral", sliding_window=8)
    ids, mask = padded_batch(T)
    real = mask.bool()

    def run():
        outs = []
        for prefill in ("sparse", "dense"):
            with alisa.apply(model, name, prefill=prefill, sparsity=0.5):
                outs.append(model(ids, attention_mask=mask, use_cache=False).logits)
                outs.append(decode(model, ids, mask, 25)[0])
        return outs

    ref, keep_r = recorded(monkeypatch, "reference", run)
    got, keep_c = recorded(monkeypatch, "auto", run)
    same_selections(keep_r, keep_c)
    for a, b in zip(ref, got):
        assert (a - b)[real].abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["llama", "opt"])
@pytest.mark.parametrize("name,kw", SETTINGS[::2], ids=IDS[::2])
def test_runtime(monkeypatch, family, name, kw):
    model = tiny_model(family)
    ids, mask = padded_batch(24)
    plan = Plan(alpha=0.7, beta=0.5, p1=1, p2=4)  # offload, fetch and recompute all take part

    def run():
        return [Engine(model, name, prefill=prefill, plan=plan, **kw).generate(ids, mask, 10, keep_logits=True)
                for prefill in ("sparse", "dense")]

    ref, keep_r = recorded(monkeypatch, "reference", run)
    got, keep_c = recorded(monkeypatch, "auto", run)
    same_selections(keep_r, keep_c)
    for a, b in zip(ref, got):
        assert torch.equal(a.tokens, b.tokens)
        torch.testing.assert_close(a.extra["logits"], b.extra["logits"], atol=1e-5, rtol=0)
        assert a.traffic.tokens_fetched == b.traffic.tokens_fetched and a.traffic.tokens_recomputed == b.traffic.tokens_recomputed
    assert got[0].traffic.tokens_fetched > 0 and got[0].traffic.tokens_recomputed > 0


@pytest.mark.parametrize("name", ["h2o", "swa"])
def test_topk_ties_go_to_the_more_recent_on_both_routes(monkeypatch, name):
    """Scores with many exact ties: the compiled O(C) threshold selects what the stable sort selects."""
    g = torch.Generator().manual_seed(3)
    B, C = 6, 200
    policy = alisa.make_policy(name, sparsity=0.8)
    pos = torch.arange(C).expand(B, C).clone()
    pos[1, :9] = -1
    for trial in range(20):
        state = policy.new_state(B, torch.device("cpu"))
        state.append(C)
        score, elig, _, _ = policy.kernel_state(state, pos)
        score.copy_(torch.randint(0, 4, (B, C), generator=g).double())
        if name == "swa":
            elig.copy_(torch.randint(0, 2, (B, C), generator=g, dtype=torch.int32))
        else:
            elig.copy_(torch.rand(B, C, generator=g) < 0.3)
        t = torch.randint(C // 2, C, (B,), generator=g)
        monkeypatch.setattr(attention, "ROUTE", "reference")
        ref = attention.attend_with_feedback(policy, state, pos, t[:, None], None, select_only=True)[1]
        monkeypatch.setattr(attention, "ROUTE", "auto")
        got = attention.attend_with_feedback(policy, state, pos, t[:, None], None, select_only=True)[1]
        assert torch.equal(ref, got), trial
    # and the reference itself is the stable sort with the tie rule
    score = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0]])
    assert topk_mask(score, torch.ones(1, 6, dtype=torch.bool), torch.tensor([2]))[0].nonzero().flatten().tolist() == [2, 4]


def test_kernel_top_is_topk_mask_with_ties():
    """The compiled top-k of a row (TOVA's eviction, SnapKV's compression) is topk_mask's, ties included."""
    g = torch.Generator().manual_seed(5)
    for trial in range(200):
        m = int(torch.randint(1, 40, (1,), generator=g))
        vals = torch.randint(0, 5, (m,), generator=g).float()
        kk = int(torch.randint(-1, m + 2, (1,), generator=g))
        top = torch.zeros(m, dtype=torch.bool)
        _fast._top(vals.numpy(), m, kk, torch.empty(m, dtype=torch.float64).numpy(), top.numpy())
        ref = topk_mask(vals[None], torch.ones(1, m, dtype=torch.bool), torch.tensor([max(kk, 0)]))[0]
        assert torch.equal(top, ref), (trial, vals, kk)


def test_missing_numba_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(_fast, "numba", None)
    monkeypatch.setattr(attention, "_warned", set())
    policy = alisa.make_policy("swa", sparsity=0.5)
    pos = torch.arange(10)[None]
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            assert attention.route(policy, pos) == "reference"
    assert len(w) == 1 and "numba" in str(w[0].message)


def test_state_follows_slots_through_one_helper():
    """append (amortised, in place), gather (compaction) and reorder move every slot tensor together."""
    st = PolicyState(slot={"a": torch.zeros(2, 0), "r": torch.zeros(2, 3, 0)}, other={"q": torch.tensor([[1], [2]])})
    st.append(4)
    st.slot["a"][:] = torch.arange(8.0).view(2, 4)
    st.slot["r"][:] = torch.arange(4.0)
    ptr = st.slot["a"].data_ptr()
    st.append(1)
    assert st.slot["a"].data_ptr() == ptr and st.slot["a"][:, -1].tolist() == [0, 0]  # in place
    st.gather(torch.tensor([[0, 2], [1, 3]]))
    assert st.slot["a"].tolist() == [[0, 2], [5, 7]] and st.slot["r"][0, 0].tolist() == [0, 2]
    st.reorder(torch.tensor([1, 1]))
    assert st.slot["a"].tolist() == [[5, 7], [5, 7]] and st.other["q"].tolist() == [[2], [2]]


@pytest.mark.skipif(not _fast.available(), reason="numba is not installed")
def test_the_prefetch_hint_compiles_here():
    """The attention loops hint the next kept rows (``llvm.prefetch``); where an llvmlite cannot
    compile it the kernel runs without (same results). The pinned environment must have it."""
    assert _fast.PREFETCH
