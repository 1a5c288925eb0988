"""Model loading: the embedded SmolLM2 offline, random shapes, clear errors."""

import subprocess
import sys

import pytest
import torch

import alisa
from alisa.models import random_shapes
from conftest import tiny_model


@torch.no_grad()
def test_embedded_model_generates_paris_and_swa_zero_is_dense(smollm2):
    model, tok = smollm2
    assert model.dtype == torch.float32 and model.config.num_hidden_layers == 30
    inputs = tok("The capital of France is", return_tensors="pt")
    n = inputs.input_ids.shape[1]
    dense = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert tok.decode(dense[0, n:]).startswith(" Paris")
    with alisa.apply(model, "swa", sparsity=0.0):
        assert torch.equal(model.generate(**inputs, max_new_tokens=12, do_sample=False), dense)


def test_random_shape_is_labelled_and_matches_config():
    assert {"smollm2-135m", "llama-7b", "opt-6.7b"} <= set(random_shapes())
    model, tok = alisa.load_model("random:smollm2-135m")
    assert tok is None and model.config.name_or_path == "random:smollm2-135m"
    assert (model.config.num_hidden_layers, model.config.num_key_value_heads, model.config.hidden_size) == (30, 3, 576)
    again, _ = alisa.load_model("random:smollm2-135m")
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)  # seeded


@pytest.mark.parametrize("kwargs,match", [
    (dict(name_or_path="random:llama-70b"), "unknown random shape 'llama-70b'"),
    (dict(name_or_path="no-such-org/no-such-model"), "hub is offline"),
    (dict(name_or_path="smollm2-135m", dtype="float8"), "dtype='float8'"),
])
def test_load_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        alisa.load_model(**kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message; this machine has a GPU")
def test_cuda_asked_without_gpu():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        alisa.load_model("random:smollm2-135m", device="cuda")


def test_uncovered_family_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model family 'gpt2' is not covered: covered are llama, mistral"):
        with alisa.apply(model, "swa", sparsity=0.5):
            pass


def test_quickstart_cli_bad_policy_one_line_error():
    r = subprocess.run([sys.executable, "-m", "alisa.quickstart", "--policy", "nope"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown policy 'nope': allowed are dense, h2o, local, quest, sinks, snapkv, strided, swa, tova"]


def test_nested_apply_and_bad_prefill_are_refused():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prefill='lazy' is invalid: allowed are sparse, dense"):
        with alisa.apply(model, "dense", prefill="lazy"):
            pass
    with alisa.apply(model, "dense"):
        with pytest.raises(RuntimeError, match="already active"):
            with alisa.apply(model, "swa", sparsity=0.5):
                pass
