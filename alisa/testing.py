"""Tiny random models and the decode loop that the tests and ``python -m alisa.check_policy`` share.

Logic checks, not accuracy: every covered family in a few kilobytes of random weights, a
left-padded batch, and token-by-token decoding through whatever cache ``alisa.apply`` installs.
"""

from __future__ import annotations

import torch

# Tiny random models of every covered family (alisa.integration.COVERED_FAMILIES).
_COMMON = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
FAMILIES = {
    "llama": dict(intermediate_size=96, num_key_value_heads=2),  # GQA, like SmolLM2
    "mistral": dict(intermediate_size=96, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(intermediate_size=96, num_key_value_heads=2),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64, pad_token_id=1),
    "gpt_neox": dict(intermediate_size=96),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    """A float32 causal LM of ``family`` with random weights (seeded), in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family], **overrides})
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def padded_batch(T: int, seed: int = 1, pads=(0, 5, 11), vocab: int = 101):
    """A left-padded batch of 3: ids (3, T), mask (3, T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(pads), T), generator=g)
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = 1
    return ids, mask


def decode(model, ids, mask, split, **kw):
    """Prefill ids[:, :split], then one token at a time; logits (B, T, V) and the final cache."""
    out = model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True, **kw)
    cache, logits = out.cache, [out.logits]
    for i in range(split, ids.shape[1]):
        out = model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1], cache=cache, use_cache=True)
        cache = out.cache
        logits.append(out.logits)
    return torch.cat(logits, 1), cache
