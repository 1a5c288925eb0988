"""docs/semantics.md §3: the simulation (one forward) and the decode path compute the same function."""

import pytest
import torch

import alisa
from alisa.testing import decode
from conftest import padded_batch

POLICY_SETTINGS = [
    ("dense", {}),
    ("local", dict(sparsity=0.8)),
    ("strided", dict(sparsity=0.5)),
    ("sinks", dict(sparsity=0.7)),
    ("h2o", dict(sparsity=0.8)),
    ("h2o", dict(budget=9)),
    ("swa", dict(sparsity=0.8)),
    ("swa", dict(sparsity=0.5)),
    ("swa", dict(budget=9)),
    # tova/snapkv/quest run on the per-query reference route (no kernel): their second budget
    # form (the other of sparsity/budget, already covered for h2o/swa) runs with -m slow only
    ("tova", dict(budget=9)),
    pytest.param("tova", dict(sparsity=0.8), marks=pytest.mark.slow),
    ("snapkv", dict(sparsity=0.7, window=4, prompt=20)),  # prompt=: the same prompt whatever the split
    pytest.param("snapkv", dict(budget=9, window=4, pool=3, prompt=20), marks=pytest.mark.slow),
    ("quest", dict(sparsity=0.5, page_size=4)),
    pytest.param("quest", dict(budget=9, page_size=4), marks=pytest.mark.slow),
]
T = 40
SPLITS = (1, 13, 30)


@torch.no_grad()
@pytest.mark.parametrize("name,kw", POLICY_SETTINGS, ids=[f"{n}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
                                                         for n, kw in (getattr(s, "values", s) for s in POLICY_SETTINGS)])
def test_simulation_equals_decode(family_model, name, kw):
    ids, mask = padded_batch(T)
    real = mask.bool()
    with alisa.apply(family_model, name, **kw):
        sim = family_model(ids, attention_mask=mask, use_cache=False).logits
        for split in SPLITS:
            dec, cache = decode(family_model, ids, mask, split)
            err = (sim - dec)[real].abs().max().item()
            assert err < 1e-4, f"{name} {kw} split {split}: max |sim - decode| = {err:.2e}"
            assert isinstance(cache, alisa.AlisaCache)


@torch.no_grad()
def test_dense_equals_unmodified_model(family_model):
    ids, mask = padded_batch(T)
    real = mask.bool()
    ref = family_model(ids, attention_mask=mask, use_cache=False).logits
    with alisa.apply(family_model, "dense"):
        sim = family_model(ids, attention_mask=mask, use_cache=False).logits
        dec, _ = decode(family_model, ids, mask, 17)
    assert (sim - ref)[real].abs().max().item() < 1e-5
    assert (dec - ref)[real].abs().max().item() < 1e-5


@torch.no_grad()
def test_generate_uses_evicting_cache(family_model):
    ids, mask = padded_batch(24)
    gen = dict(max_new_tokens=6, do_sample=False, pad_token_id=1)
    ref = family_model.generate(ids, attention_mask=mask, **gen)
    with alisa.apply(family_model, "dense") as run:
        assert torch.equal(family_model.generate(ids, attention_mask=mask, **gen), ref)
        assert isinstance(run.last_cache, alisa.AlisaCache)
    with alisa.apply(family_model, "swa", sparsity=0.8) as run:
        out = family_model.generate(ids, attention_mask=mask, **gen)
        held = run.last_cache.tokens_held()
    assert out.shape == ref.shape
    seen = 24 + 6 - 1
    assert max(held) < seen / 2, held


@torch.no_grad()
@pytest.mark.parametrize("name", ["local", "sinks", "h2o", "swa", "tova", "snapkv"])
def test_dense_prefill(family_model, name):
    """prefill=dense: the prompt attends fully (its logits are the unmodified model's); then the policy runs."""
    ids, mask = padded_batch(T)
    split = 25
    ref = family_model(ids, attention_mask=mask, use_cache=False).logits
    with alisa.apply(family_model, name, sparsity=0.8, prefill="dense"):
        dec, cache = decode(family_model, ids, mask, split)
    real = mask.bool()
    assert (dec - ref)[:, :split][real[:, :split]].abs().max().item() < 1e-5
    assert (dec - ref)[:, split:].abs().max().item() > 1e-3  # the policy is active after the prompt
    assert max(cache.tokens_held()) < T


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(alisa.POLICIES))
def test_sparsity_zero_is_dense(family_model, name):
    ids, mask = padded_batch(T)
    real = mask.bool()
    ref = family_model(ids, attention_mask=mask, use_cache=False).logits
    with alisa.apply(family_model, name, sparsity=0.0):
        sim = family_model(ids, attention_mask=mask, use_cache=False).logits
        dec, _ = decode(family_model, ids, mask, 9)
    assert (sim - ref)[real].abs().max().item() < 1e-5
    assert (dec - ref)[real].abs().max().item() < 1e-5


def test_apply_restores_model(family_model):
    impl = family_model.config._attn_implementation
    n_hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in family_model.modules())
    ids, mask = padded_batch(8)
    with pytest.raises(RuntimeError, match="boom"):
        with alisa.apply(family_model, "swa", sparsity=0.5):
            assert family_model.config._attn_implementation == "alisa"
            raise RuntimeError("boom")
    assert family_model.config._attn_implementation == impl
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in family_model.modules()) == n_hooks
    with torch.no_grad():
        out = family_model(ids, attention_mask=mask, use_cache=True)
    assert not isinstance(out.cache, alisa.AlisaCache)


@torch.no_grad()
@pytest.mark.parametrize("gen", [dict(num_beams=3, num_return_sequences=2), dict(do_sample=True, num_return_sequences=2)])
def test_beam_search_and_repeated_sequences(gen):
    """Cache reorder / repeat moves keys and policy state together: dense matches stock generate."""
    from conftest import tiny_model

    model = tiny_model("llama")
    ids, mask = padded_batch(20)
    kw = dict(max_new_tokens=5, pad_token_id=1, **gen)
    torch.manual_seed(0)
    ref = model.generate(ids, attention_mask=mask, **kw)
    with alisa.apply(model, "dense"):
        torch.manual_seed(0)
        assert torch.equal(model.generate(ids, attention_mask=mask, **kw), ref)
    with alisa.apply(model, "swa", sparsity=0.8) as run:
        out = model.generate(ids, attention_mask=mask, **kw)
        assert out.shape == ref.shape
        assert run.last_cache.n_real.shape[0] == 3 * gen.get("num_beams", gen["num_return_sequences"])


@torch.no_grad()
@pytest.mark.parametrize("name,kw", [("h2o", dict(sparsity=0.8)), ("swa", dict(sparsity=0.8)), ("swa", dict(budget=9))])
def test_single_sequence_path_matches_batched(family_model, name, kw):
    """One sequence takes a faster route through the policy (Python counts); it is the same function."""
    ids, mask = padded_batch(T)
    with alisa.apply(family_model, name, **kw):
        batched = family_model(ids, attention_mask=mask, use_cache=False).logits
        for b in range(ids.shape[0]):
            real = mask[b].bool()
            one = ids[b, real][None]
            sim = family_model(one, use_cache=False).logits[0]
            assert (sim - batched[b, real]).abs().max().item() < 1e-4
            dec, _ = decode(family_model, one, torch.ones_like(one), 7)
            assert (sim - dec[0]).abs().max().item() < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("name,kw", [("dense", {}), ("swa", dict(sparsity=0.5)), ("local", dict(sparsity=0.3))])
def test_model_sliding_window_is_intersected(name, kw):
    """A Mistral with its own sliding window: dense equals the unmodified model; both paths agree."""
    from conftest import tiny_model

    model = tiny_model("mistral", sliding_window=8)
    ids, mask = padded_batch(T)
    real = mask.bool()
    ref = model(ids, attention_mask=mask, use_cache=False).logits
    with alisa.apply(model, name, **kw):
        sim = model(ids, attention_mask=mask, use_cache=False).logits
        dec, _ = decode(model, ids, mask, 11)
    assert (sim - dec)[real].abs().max().item() < 1e-4
    if name == "dense":
        assert (sim - ref)[real].abs().max().item() < 1e-5
