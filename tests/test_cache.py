"""The decode cache really holds only what docs/semantics.md allows, measured from the live slots and buffers."""

import pytest
import torch

import alisa
from conftest import tiny_model

PROMPT, STEPS = 8, 60


def run_decode(model, policy):
    """Yield (n tokens seen, cache) after the prompt and after each decode step."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(2, 101, (1, PROMPT + STEPS), generator=g)
    with torch.no_grad(), alisa.apply(model, policy):
        cache = model(ids[:, :PROMPT], use_cache=True).cache
        yield PROMPT, cache
        for i in range(PROMPT, PROMPT + STEPS):
            cache = model(ids[:, i:i + 1], cache=cache, use_cache=True).cache
            yield i + 1, cache


def bound(policy, n):
    """Most tokens docs/semantics.md lets the cache hold after n tokens (the next query is at t = n)."""
    N = torch.tensor(n + 1)
    if policy.name in ("dense", "strided"):
        return n
    if policy.name == "local":
        return min(n, int(policy.full_count(N)) - 1)
    if policy.name == "sinks":
        return min(n, max(5, int(policy.full_count(N))) - 1)
    if n + 1 <= policy.dense_horizon:
        return n
    k = int(policy.half_count(torch.tensor(n)))
    if policy.name == "h2o":
        return min(n, 2 * k)  # what the last query attended
    k_next = int(policy.half_count(N))
    return min(n, k_next - 1 + k_next * 2 * k)  # L' plus the support of k' rows of <= 2k keys


@pytest.mark.parametrize("name,kw", [("dense", {}), ("local", dict(sparsity=0.8)), ("strided", dict(sparsity=0.8)),
                                     ("sinks", dict(sparsity=0.8)), ("h2o", dict(sparsity=0.8)), ("swa", dict(sparsity=0.8)),
                                     ("swa", dict(budget=16)), ("h2o", dict(sparsity=0.3))])
def test_cache_holds_within_spec(name, kw):
    model = tiny_model("llama")
    policy = alisa.make_policy(name, **kw)
    per_token = 2 * model.config.num_key_value_heads * (model.config.hidden_size // model.config.num_attention_heads) * 4
    for n, cache in run_decode(model, policy):
        held = cache.tokens_held()
        limit = bound(policy, n)
        assert max(held) <= limit, (n, held, limit)
        if name in ("dense", "strided", "local", "sinks"):
            assert min(held) == limit  # exactly the window
        for layer, b in zip(cache.layers, cache.bytes_allocated()):
            assert b["kv"] == layer.store.capacity * per_token
            assert layer.store.capacity >= layer.store.used >= max(held)
    if name not in ("dense", "strided") and kw.get("sparsity") == 0.8:
        assert max(held) < 0.6 * n


def test_swa_holds_far_less_than_dense_on_smollm2_1024_tokens(smollm2):
    model, tok = smollm2
    text = open(alisa.policies.__file__).read() * 2  # any 1,024 tokens of real text
    ids = tok(text, return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    held = {}
    with torch.no_grad():
        for name, kw in [("dense", {}), ("swa", dict(sparsity=0.8))]:
            with alisa.apply(model, name, **kw) as run:
                cache = model(ids, use_cache=True).cache
                held[name] = (cache.tokens_held(), sum(b["kv"] for b in cache.bytes_allocated()), run.kept_fraction()["overall"])
    dense, swa = held["dense"], held["swa"]
    print(f"\nSmolLM2, 1024 tokens, tokens held per layer: dense {sum(dense[0]) / 30:.0f}, "
          f"swa@0.8 mean {sum(swa[0]) / 30:.1f} (min {min(swa[0]):.0f}, max {max(swa[0]):.0f}); "
          f"KV bytes allocated {swa[1] / dense[1]:.2f}x dense; measured kept fraction {swa[2]:.3f}")
    assert min(dense[0]) == 1024
    assert max(swa[0]) < 0.35 * 1024
    assert swa[1] < 0.5 * dense[1]
    assert 0.19 < swa[2] < 0.25
