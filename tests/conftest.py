import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.utils import logging as hf_logging

hf_logging.set_verbosity_error()

# Tiny random models of every covered family: logic tests, not accuracy.
_COMMON = dict(vocab_size=101, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512)
FAMILIES = {
    "llama": dict(intermediate_size=96, num_key_value_heads=2),  # GQA, like SmolLM2
    "mistral": dict(intermediate_size=96, num_key_value_heads=2, sliding_window=None),
    "qwen2": dict(intermediate_size=96, num_key_value_heads=2),
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64, pad_token_id=1),
    "gpt_neox": dict(intermediate_size=96),
}


def tiny_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = AutoConfig.for_model(family, **{**_COMMON, **FAMILIES[family], **overrides})
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


_MODELS = {}


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request):
    if request.param not in _MODELS:
        _MODELS[request.param] = tiny_model(request.param)
    return _MODELS[request.param]


def padded_batch(T: int, seed: int = 1, pads=(0, 5, 11), vocab: int = 101):
    """A left-padded batch of 3: ids (3, T), mask (3, T)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (len(pads), T), generator=g)
    mask = torch.ones(len(pads), T, dtype=torch.long)
    for b, p in enumerate(pads):
        mask[b, :p] = 0
        ids[b, :p] = 1
    return ids, mask


@pytest.fixture(scope="session")
def smollm2():
    import alisa

    return alisa.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def data_root():
    """The prepared offline task data: $ALISA_DATA_DIR if prepared, else ~/.cache/alisa/data (prepared once here)."""
    from pathlib import Path

    from alisa import data as D

    env = os.environ.get("ALISA_DATA_DIR")
    if env and D.is_prepared(env):
        return Path(env)
    root = Path.home() / ".cache" / "alisa" / "data"
    if not D.is_prepared(root):
        D.prepare(root)
    return root
