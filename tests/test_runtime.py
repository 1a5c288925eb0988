"""The runtime engine computes what the core decode path computes, moves what it says it moves."""

import re
import shutil

import pytest
import torch

import alisa
from alisa.runtime.costmodel import Profile, Workload, device_floor, predict, search
from alisa.runtime.engine import BudgetExceeded, Engine
from alisa.runtime.recompute import input_bytes_per_token, kv_bytes_per_token
from alisa.runtime.tiered import GONE, Plan, Pool
from conftest import padded_batch, tiny_model

NEW = 10
POLICIES = [("dense", {}), ("swa", {"sparsity": 0.5}), ("h2o", {"sparsity": 0.5}), ("local", {"sparsity": 0.5}),
            ("sinks", {"sparsity": 0.7}), ("tova", {"sparsity": 0.5}), ("snapkv", {"sparsity": 0.5, "window": 4}),
            ("quest", {"sparsity": 0.5, "page_size": 4})]


def core_generate(model, ids, mask, policy, prefill, kw):
    with torch.no_grad(), alisa.apply(model, policy, prefill, **kw):
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]


@pytest.mark.parametrize("prefill", ["sparse", "dense"])
@pytest.mark.parametrize("policy,kw", POLICIES, ids=[p for p, _ in POLICIES])
def test_engine_tokens_equal_core_decode(family_model, policy, kw, prefill):
    ids, mask = padded_batch(24)
    ref = core_generate(family_model, ids, mask, policy, prefill, kw)
    got = Engine(family_model, policy, prefill=prefill, **kw).generate(ids, mask, NEW).tokens
    static = Engine(family_model, policy, prefill=prefill, static=True, **kw).generate(ids, mask, NEW)
    assert torch.equal(static.tokens, got) and static.extra["graph"].startswith("eager")  # the fixed-shape step
    # generate stops a row at its end-of-sequence token and pads it; the engine decodes on
    eos = family_model.generation_config.eos_token_id
    is_eos = torch.isin(ref, torch.tensor(eos if isinstance(eos, list) else [eos if eos is not None else -1]))
    done = torch.cumsum(torch.cat([torch.zeros_like(ref[:, :1]), is_eos[:, :-1].long()], 1), 1) > 0
    assert torch.equal(got.masked_fill(done, -1), ref.masked_fill(done, -1))


@pytest.mark.parametrize("policy,kw", POLICIES, ids=[p for p, _ in POLICIES])
def test_static_step_equals_eager_on_the_reference_route(policy, kw, monkeypatch):
    """The fixed-shape step (every slot and column made ready, device-side write indices) on the
    route CUDA runs: the eager step's tokens, logits within float rounding (sums over more columns)."""
    from alisa import attention

    monkeypatch.setattr(attention, "ROUTE", "reference")
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    for prefill in ("sparse", "dense"):
        ref = Engine(model, policy, prefill=prefill, **kw).generate(ids, mask, NEW, keep_logits=True)
        got = Engine(model, policy, prefill=prefill, static=True, **kw).generate(ids, mask, NEW, keep_logits=True)
        assert torch.equal(got.tokens, ref.tokens)
        torch.testing.assert_close(got.extra["logits"], ref.extra["logits"], atol=1e-5, rtol=0)
        assert got.kv["device"] == ref.kv["device"]  # the same live tokens, measured the same way


@pytest.mark.parametrize("policy", ["dense", "swa"])
def test_static_step_with_int8_kv(policy):
    """INT8 KV in the fixed-shape step (codes, scales and zeros in fixed pools, moved as they are
    stored): the eager INT8 step's tokens, tokens moved and live bytes, for every kind of plan."""
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    kw = {} if policy == "dense" else {"sparsity": 0.5}
    for plan in (Plan(), Plan(alpha=0.5, p1=2), Plan(alpha=0.7, beta=0.5, p1=1, p2=4), Plan(alpha=0.6, p1=1, local_on_device=False)):
        ref = Engine(model, policy, plan=plan, int8=True, **kw).generate(ids, mask, NEW, keep_logits=True)
        g = Engine(model, policy, plan=plan, int8=True, static=True, **kw).generate(ids, mask, NEW, keep_logits=True)
        assert_static_equals_eager(g, ref, plan)


def assert_static_equals_eager(g, ref, plan):
    """The fixed-shape step with a plan: the eager step's tokens and logits (float rounding: sums
    over more columns), the same tokens moved and the same live bytes per tier; the bytes are
    those of the fixed fetch and offload slots (at least the eager step's)."""
    assert torch.equal(g.tokens, ref.tokens), plan
    torch.testing.assert_close(g.extra["logits"], ref.extra["logits"], atol=1e-5, rtol=0)
    for k in ("tokens_offloaded", "tokens_fetched", "tokens_deleted", "tokens_recomputed"):
        assert getattr(g.traffic, k) == getattr(ref.traffic, k), (plan, k)
    assert g.traffic.h2d_bytes >= ref.traffic.h2d_bytes and g.traffic.d2h_bytes >= ref.traffic.d2h_bytes, plan
    assert all(g.kv[k] == ref.kv[k] for k in ("device", "host", "inputs")), (plan, g.kv, ref.kv)
    assert g.kv["device_allocated"] <= ref.kv["device_allocated"] or plan.device_only, (plan, g.kv, ref.kv)


PLANS = [Plan(alpha=0.5, p1=2), Plan(alpha=1.0, p1=0), Plan(alpha=0.7, beta=0.5, p1=1, p2=4), Plan(alpha=1.0, beta=1.0, p1=0, p2=0),
         Plan(alpha=0.6, p1=1, local_on_device=False)]


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])
@pytest.mark.parametrize("policy,kw", POLICIES[:3], ids=[p for p, _ in POLICIES[:3]])
def test_offload_and_recompute_keep_tokens_exact(family, policy, kw):
    model = tiny_model(family)
    ids, mask = padded_batch(24)
    ref = Engine(model, policy, **kw).generate(ids, mask, NEW, keep_logits=True)
    for plan in PLANS:
        g = Engine(model, policy, plan=plan, **kw).generate(ids, mask, NEW, keep_logits=True)
        assert torch.equal(g.tokens, ref.tokens), plan
        torch.testing.assert_close(g.extra["logits"], ref.extra["logits"], atol=1e-5, rtol=0)
        assert g.traffic.tokens_offloaded > 0
        if plan.beta:
            assert g.traffic.tokens_recomputed > 0
        static = Engine(model, policy, plan=plan, static=True, **kw).generate(ids, mask, NEW, keep_logits=True)
        assert_static_equals_eager(static, g, plan)


@pytest.mark.parametrize("policy,kw", POLICIES, ids=[p for p, _ in POLICIES])
def test_static_step_with_offload_and_recompute_plans(policy, kw, monkeypatch):
    """Every policy, on the route CUDA runs: the fixed-shape step moves tiers between steps and
    fetches (recomputes) the selected host (deleted) keys in fixed slots; the eager step's tokens."""
    from alisa import attention

    monkeypatch.setattr(attention, "ROUTE", "reference")
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    for plan in (Plan(alpha=1.0, p1=0), Plan(alpha=0.7, beta=0.5, p1=1, p2=4), Plan(alpha=0.6, p1=1, local_on_device=False)):
        ref = Engine(model, policy, plan=plan, **kw).generate(ids, mask, NEW, keep_logits=True)
        g = Engine(model, policy, plan=plan, static=True, **kw).generate(ids, mask, NEW, keep_logits=True)
        assert_static_equals_eager(g, ref, plan)
        assert g.traffic.tokens_fetched + g.traffic.tokens_recomputed > 0, plan


def test_static_tier_moves_finish_outside_the_step_when_they_do_not_fit(monkeypatch):
    """In a steady phase the fixed step offloads at most ``move_slots`` tokens per row; a row with
    more to move (evictions come in bursts) is finished by the schedule outside the step, so the
    tiers, the tokens moved and the output equal the eager step's, and the record counts it."""
    from alisa.runtime.tiered import TieredStore

    monkeypatch.setattr(TieredStore, "MOVE_SLOTS", 1)
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    for policy, plan in (("swa", Plan(alpha=0.5, p1=2)), ("swa", Plan(alpha=0.7, beta=0.5, p1=1, p2=4))):
        ref = Engine(model, policy, plan=plan, sparsity=0.5).generate(ids, mask, NEW, keep_logits=True)
        g = Engine(model, policy, plan=plan, static=True, sparsity=0.5).generate(ids, mask, NEW, keep_logits=True)
        assert_static_equals_eager(g, ref, plan)
        assert g.traffic.moves_late > 0 and g.summary()["moves_late"] == g.traffic.moves_late, (policy, plan)


def test_a_wrong_selection_bound_is_an_error_not_wrong_tokens(monkeypatch):
    """The static step counts, on the device, rows that selected more host keys than its fetch
    slots (``Policy.max_selected_old`` too small): the run ends with one line saying so."""
    from alisa.policies import TwoPart

    monkeypatch.setattr(TwoPart, "max_selected_old", lambda self, n: 1)
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    with pytest.raises(RuntimeError, match=r"selected more off-device keys than its 1 fetch slots") as e:
        Engine(model, "swa", plan=Plan(alpha=1.0, p1=0), static=True, sparsity=0.5).generate(ids, mask, NEW)
    assert "\n" not in str(e.value)


HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


def test_compiled_static_step_equals_the_uncompiled_one(monkeypatch):
    """``Engine(static=True, compiled=True)``: the fixed step compiled by inductor (its small ops
    fused) gives the uncompiled step's tokens, logits within float rounding, one graph per run,
    and writes the KV pools in place: the generated code allocates nothing of a pool's shape (a
    ``scatter_`` into a pool compiled to a copy of the whole pool and a copy back, every layer and
    step). (Without a C++ compiler inductor cannot build the CPU kernels: then the record must say
    so and the step run uncompiled, with the same tokens.)"""
    from torch._inductor.utils import run_and_get_code

    from alisa import attention

    monkeypatch.setattr(attention, "ROUTE", "reference")  # the route the compiled step traces
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    for policy, kw in POLICIES[:3]:
        ref = Engine(model, policy, prefill="sparse", static=True, **kw).generate(ids, mask, NEW, keep_logits=True)
        got, code = run_and_get_code(lambda: Engine(model, policy, prefill="sparse", static=True, compiled=True, **kw).generate(
            ids, mask, NEW, keep_logits=True))
        assert torch.equal(got.tokens, ref.tokens), policy
        torch.testing.assert_close(got.extra["logits"], ref.extra["logits"], atol=1e-5, rtol=0)
        if not HAS_CXX:
            assert "not compiled (compile failed: " in got.extra["graph"], got.extra["graph"]
            continue
        assert got.extra["graph"].endswith("compiled (inductor, 1 graph)"), (policy, got.extra["graph"])
        assert got.extra["compile_s"] > 0 and got.summary()["compile_s"] == got.extra["compile_s"]
        src = "\n".join(code)
        pools = set(re.findall(r"assert_size_stride\(\w+, (\(\d+, \d+, \d+, \d+\))", src))  # the 4-d inputs: K, V pools
        assert pools and not [p for p in pools if f"empty_strided_cpu({p}" in src], (policy, pools)


@pytest.mark.parametrize("policy,kw", POLICIES, ids=[p for p, _ in POLICIES])
def test_every_policy_compiles_to_one_graph(policy, kw, monkeypatch):
    """Every built-in policy's fixed step traces as one graph (no break, no host read, no per-step
    Python number: snapkv's prompt flag and quest's column count are left alone once the state is
    fixed), with and without host keys; tokens and logits are the uncompiled step's (numba route
    on the CPU there: logits within float rounding)."""
    from alisa.runtime.engine import Compiled

    monkeypatch.setattr(Compiled, "BACKEND", "eager")
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    for plan in (Plan(), Plan(alpha=1.0, p1=0)):
        ref = Engine(model, policy, prefill="sparse", plan=plan, static=True, **kw).generate(ids, mask, NEW, keep_logits=True)
        got = Engine(model, policy, prefill="sparse", plan=plan, static=True, compiled=True, **kw).generate(
            ids, mask, NEW, keep_logits=True)
        assert got.extra["graph"].endswith("compiled (eager, 1 graph)"), (plan, got.extra["graph"])
        assert torch.equal(got.tokens, ref.tokens), plan
        torch.testing.assert_close(got.extra["logits"], ref.extra["logits"], atol=1e-5, rtol=0)


def test_compiled_step_specializes_per_phase_and_starts_afresh_each_run(monkeypatch):
    """Dynamo's tracing and guards (backend "eager": no code generation): with an offload and
    recomputation plan the compiled step is traced again only where what it does changes (a
    phase, the host pool's first tokens), not every step (no per-step Python int in it); a second
    run traces as many graphs again (the first run's are dropped, not piled up against dynamo's
    recompile limit); tokens, tokens moved and live bytes are the uncompiled step's."""
    from alisa.runtime.engine import Compiled

    monkeypatch.setattr(Compiled, "BACKEND", "eager")
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    plan = Plan(alpha=0.7, beta=0.5, p1=1, p2=4)
    ref = Engine(model, "swa", plan=plan, static=True, sparsity=0.5).generate(ids, mask, NEW, keep_logits=True)
    graphs = []
    for _ in range(2):
        g = Engine(model, "swa", plan=plan, static=True, compiled=True, sparsity=0.5).generate(ids, mask, NEW, keep_logits=True)
        assert_static_equals_eager(g, ref, plan)
        graphs.append(int(g.extra["graph"].rsplit("(eager, ", 1)[1].split()[0]))
    assert graphs[0] == graphs[1] and 2 <= graphs[0] <= 5 < NEW - 1, graphs


def test_a_failed_compile_runs_the_step_uncompiled_and_says_why(monkeypatch):
    from alisa.runtime.engine import Compiled

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(Compiled, "BACKEND", broken)
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    ref = Engine(model, "h2o", static=True, sparsity=0.5).generate(ids, mask, NEW)
    g = Engine(model, "h2o", static=True, compiled=True, sparsity=0.5).generate(ids, mask, NEW)
    assert torch.equal(g.tokens, ref.tokens)
    assert g.extra["graph"].endswith("not compiled (compile failed: BackendCompilerFailed: RuntimeError: no compiler here)")
    with pytest.raises(ValueError, match=r"^compiled=True needs static=True"):
        Engine(model, "dense", compiled=True)
    monkeypatch.setattr(Compiled, "BACKEND", None)  # the environment's
    monkeypatch.setenv("ALISA_COMPILE_BACKEND", "tvm")
    with pytest.raises(ValueError, match=r"^ALISA_COMPILE_BACKEND='tvm' is invalid: allowed are inductor, aot_eager, eager$"):
        Engine(model, "dense", static=True, compiled=True)


@pytest.mark.parametrize("policy,kw", POLICIES, ids=[p for p, _ in POLICIES])
def test_prefetch_fetches_exactly_what_the_next_step_selects(policy, kw, monkeypatch):
    """Layer l + 1's host keys are fetched after layer l's step, before layer l + 1's query exists:
    for a policy that selects ahead that fetch is every time exactly the host keys the step then
    selects (no miss, the same tokens, logits and bytes as fetching on demand), and the bytes
    counted are those of the tensors that crossed the link."""
    from alisa.runtime import tiered

    moved = []
    fetch = tiered.Link.fetch

    def counting(self, host, traffic, t0):
        out = fetch(self, host, traffic, t0)
        moved.append(sum(v.numel() * v.element_size() for v in out[0].values()))
        return out

    monkeypatch.setattr(tiered.Link, "fetch", counting)
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    for plan in (Plan(alpha=0.5, p1=2), Plan(alpha=0.7, beta=0.5, p1=1, p2=4), Plan(alpha=0.6, p1=1, local_on_device=False)):
        base = Engine(model, policy, plan=plan, prefetch=False, **kw).generate(ids, mask, NEW, keep_logits=True)
        moved.clear()
        g = Engine(model, policy, plan=plan, prefetch=True, **kw).generate(ids, mask, NEW, keep_logits=True)
        assert torch.equal(g.tokens, base.tokens), plan
        torch.testing.assert_close(g.extra["logits"], base.extra["logits"], atol=0, rtol=0)
        tr = g.traffic
        assert tr.h2d_bytes == sum(moved) == base.traffic.h2d_bytes, plan
        assert tr.tokens_fetched == base.traffic.tokens_fetched > 0, plan
        assert tr.prefetch_misses == 0, plan
        if alisa.policies.policy_class(policy).selects_ahead:
            assert tr.prefetch_hits > 0, plan
        else:  # quest selects with its query: nothing is fetched ahead
            assert tr.prefetch_hits == 0, plan


def test_a_wrong_fetch_ahead_is_fetched_again():
    """A fetch ahead that is not the step's selection (here: for another query position) is a
    miss: the step fetches its own keys, the tokens stay exact, and both fetches' bytes count."""
    from alisa.runtime import tiered

    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    plan = Plan(alpha=1.0, p1=0)
    base = Engine(model, "h2o", plan=plan, prefetch=False, sparsity=0.5).generate(ids, mask, NEW)
    prefetch = tiered.TieredStore.prefetch
    try:
        tiered.TieredStore.prefetch = lambda self, t: prefetch(self, t - 3)
        g = Engine(model, "h2o", plan=plan, prefetch=True, sparsity=0.5).generate(ids, mask, NEW)
    finally:
        tiered.TieredStore.prefetch = prefetch
    assert torch.equal(g.tokens, base.tokens)
    assert g.traffic.prefetch_misses > 0 and g.traffic.prefetch_hits == 0
    assert g.traffic.h2d_bytes > base.traffic.h2d_bytes


@pytest.mark.parametrize("policy,kw", POLICIES[:3], ids=[p for p, _ in POLICIES[:3]])
def test_evict_reads_nothing_back_between_compaction_looks(policy, kw, monkeypatch):
    """A decode step's eviction is masks only (no .item(), bool() or int() of a tensor, which on
    a GPU would wait for the device); only every COMPACT_EVERY-th eviction looks at the counts."""
    from alisa.runtime import tiered

    inside, reads = [False], []
    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        orig = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=orig, **k):
            if inside[0]:
                reads[-1] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    evict = tiered.TieredStore.evict

    def watched(self, retain):
        inside[0] = True
        reads.append(0)
        try:
            return evict(self, retain)
        finally:
            inside[0] = False
            if (self._evictions - 1) % self.COMPACT_EVERY == 0:
                reads[-1] = None  # a compaction look: reads counts back by design

    monkeypatch.setattr(tiered.TieredStore, "evict", watched)
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    ref = Engine(model, policy, **kw).generate(ids, mask, 20).tokens
    if policy == "dense":  # it never evicts: nothing is asked (Policy.evicts)
        assert reads == []
        return
    assert any(r is None for r in reads) and sum(r is not None for r in reads) > 10
    assert all(r == 0 for r in reads if r is not None), reads
    monkeypatch.setattr(tiered.TieredStore, "COMPACT_EVERY", 1)  # compacting at every eviction computes the same
    assert torch.equal(Engine(model, policy, **kw).generate(ids, mask, 20).tokens, ref)


def test_phases_switch_at_planned_steps_and_bytes_are_the_tensors_moved():
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(2, 101, (1, 40), generator=torch.Generator().manual_seed(0))
    plan = Plan(alpha=0.5, beta=0.5, p1=3, p2=7)
    g = Engine(model, "dense", plan=plan).generate(ids, None, 12)
    s = g.summary()
    assert s["phase_per_step"] == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert s["phase_switch_steps"] == {"phase2": 3, "phase3": 7}
    host = [t["host"] + t["recompute"] for t in s["tiers_per_step"]]
    gone = [t["recompute"] for t in s["tiers_per_step"]]
    assert host[:3] == [0, 0, 0] and all(h > 0 for h in host[3:])
    assert gone[:7] == [0] * 7 and all(x > 0 for x in gone[7:])
    cfg, L = model.config, model.config.num_hidden_layers
    kvb, xb = kv_bytes_per_token(cfg, torch.float32), input_bytes_per_token(cfg, torch.float32)
    tr = g.traffic
    # One sequence: no padding columns, so every byte moved is a token's K, V or input.
    n_inputs = 40 * L + 11 * L  # inputs are recorded for every token when Phase III is planned
    assert tr.d2h_bytes == tr.tokens_offloaded * kvb + n_inputs * xb
    assert tr.h2d_bytes == tr.tokens_fetched * kvb + tr.tokens_recomputed * xb
    assert tr.tokens_fetched > 0 and tr.tokens_recomputed > 0 and tr.tokens_deleted > 0
    # dense selects everything: each step fetches every host token and recomputes every deleted one
    assert tr.tokens_recomputed == sum(int(round(x * L)) for x in gone[7:])


def test_recomputed_kv_equal_the_cached_kv():
    model = tiny_model("llama")
    ids = torch.randint(2, 101, (2, 30), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model(ids, use_cache=True).past_key_values
    from alisa.runtime import engine as E

    seen = {}
    init = E.TieredCache.__init__

    def spy(self, *a, **k):
        init(self, *a, **k)
        seen["cache"] = self

    E.TieredCache.__init__ = spy
    try:
        Engine(model, "dense", plan=Plan(alpha=1.0, beta=1.0, p1=0, p2=0, local_on_device=False)).generate(ids, None, 1)
    finally:
        E.TieredCache.__init__ = init
    from alisa.runtime.recompute import kv_from_inputs

    for l, ts in enumerate(seen["cache"].tiered):
        assert bool((ts.tier == GONE).all())
        x = ts.xs.read_raw(ts.xloc)["x"][:, 0]
        k, v = kv_from_inputs(model, l, x, ts.pos)
        torch.testing.assert_close(k, ref.layers[l].keys, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, ref.layers[l].values, atol=1e-5, rtol=0)


def test_int8_pool_round_trip_within_half_a_step():
    pool = Pool("cpu", int8=True)
    k = torch.randn(2, 3, 7, 16) * 5
    cols, _ = pool.write({"k": k}, torch.ones(2, 7, dtype=torch.bool))
    back = pool.read(cols, torch.float32)["k"]
    lam = (k.amax(-1, keepdim=True) - k.amin(-1, keepdim=True)) / 255
    assert bool(((back - k).abs() <= lam / 2 + 1e-5).all())
    assert pool.bytes_live() == 2 * 7 * 3 * (16 + 8)  # uint8 codes + float32 scale and zero per (token, head)


def test_int8_engine_close_to_fp32(smollm2):
    """Documented tolerance: on real text the INT8 KV changes next-token logits by < 0.5 (of a ~10-wide range)
    and leaves the greedy tokens of the first steps unchanged."""
    model, tok = smollm2
    tok.padding_side = "left"
    enc = tok(["The capital of France is", "Water boils at a temperature of"], return_tensors="pt", padding=True)
    for policy, kw in [("dense", {}), ("swa", {"sparsity": 0.5})]:
        ref = Engine(model, policy, prefill="sparse", **kw).generate(enc.input_ids, enc.attention_mask, 6, keep_logits=True)
        q = Engine(model, policy, prefill="sparse", int8=True, **kw).generate(enc.input_ids, enc.attention_mask, 6, keep_logits=True)
        assert torch.equal(q.tokens[:, :4], ref.tokens[:, :4])
        assert float((q.extra["logits"][:, 1] - ref.extra["logits"][:, 1]).abs().max()) < 0.5
        assert q.kv["device"] < 0.3 * ref.kv["device"]


def test_budget_exceeded_is_raised():
    """Above the floor every plan needs, a budget Phase I exceeds is a measurement (out of memory);
    below it, bad input: one line naming the value and the minimum, before anything runs."""
    model = tiny_model("llama")
    ids, mask = padded_batch(24)
    floor = device_floor(model.config, model.dtype, alisa.make_policy("dense"), Workload(*ids.shape, 4))
    assert floor > 0
    with pytest.raises(BudgetExceeded, match="device budget"):
        Engine(model, "dense", device_budget=floor).generate(ids, mask, 4)
    with pytest.raises(ValueError, match=f"^device_budget={floor - 1} B is below .* allowed is >= {floor} B$"):
        Engine(model, "dense", device_budget=floor - 1).generate(ids, mask, 4)
    # under alpha = 1 the floor is enough: the local window alone stays on the device
    plan = Plan(alpha=1.0, p1=0)
    Engine(model, "dense", plan=plan, device_budget=floor).generate(ids, mask, 4)


def _profile(**kw):
    base = dict(device="cpu", hardware={}, model="x", dtype="float16", step_base_s=0.02, step_per_seq_s=0.001,
                attn_read_bw=20e9, copy_bw=10e9, recompute_flops=50e12, device_capacity=16 << 30, host_capacity=128 << 30)
    return Profile(**{**base, **kw})


def _config(path):
    from omegaconf import OmegaConf
    from transformers import AutoConfig

    c = OmegaConf.to_container(OmegaConf.load(path).hf_config)
    return AutoConfig.for_model(c.pop("model_type"), **c)


LLAMA = "conf/model/llama-7b.yaml"
SMOL = "conf/model/smollm2-135m.yaml"


def test_plan_search_reacts_to_budgets_and_profile(request):
    root = request.config.rootpath
    llama, smol = _config(root / LLAMA), _config(root / SMOL)
    pol = alisa.make_policy("swa", sparsity=0.8)
    wl = Workload(batch=32, prompt=128, new_tokens=512)
    prof = _profile()
    roomy = search(prof, llama, "float16", pol, wl, device_budget=1e12, host_budget=1e12)
    assert roomy.plan == Plan()  # everything fits: Phase I
    need = predict(prof, llama, "float16", pol, wl, Plan()).peak_device_bytes
    tight = search(prof, llama, "float16", pol, wl, device_budget=0.6 * need, host_budget=1e12)
    tighter = search(prof, llama, "float16", pol, wl, device_budget=0.45 * need, host_budget=1e12)
    assert tight.feasible and tighter.feasible
    assert tighter.plan.p1 <= tight.plan.p1 and tighter.plan.alpha > tight.plan.alpha
    assert tight.peak_device_bytes <= 0.6 * need
    # A slow link makes recomputation pay (MHA: the input is half the KV); a fast one does not.
    slow = search(_profile(copy_bw=1e9), llama, "float16", pol, wl, device_budget=0.45 * need, host_budget=1e12)
    fast = search(_profile(copy_bw=1e12, recompute_flops=1e9), llama, "float16", pol, wl, device_budget=0.45 * need, host_budget=1e12)
    assert slow.plan.beta > 0 and slow.plan.p2 is not None
    assert fast.plan.beta == 0
    # GQA (SmolLM2): the input is larger than the KV, so recomputation is never chosen, and the note says why.
    need_s = predict(prof, smol, "float32", pol, wl, Plan()).peak_device_bytes
    gqa = search(_profile(copy_bw=1e8), smol, "float32", pol, wl, device_budget=0.6 * need_s, host_budget=1e12)
    assert gqa.plan.beta == 0 and "not smaller than its KV" in gqa.note
