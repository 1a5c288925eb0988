"""Runtime parts: INT8 KV quantization and K, V recomputation from attention inputs."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoConfig, DynamicCache

from alisa.runtime import quant as Q
from alisa.runtime import recompute as R
from conftest import padded_batch, tiny_model

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"


# --- quantization ---------------------------------------------------------------------
def _bound_ok(x: torch.Tensor, qt: Q.QTensor):
    """|x̂ − x| ≤ λ/2 + 1e-6·max(|x| over the group) + 1e-30, element-wise (float32 math)."""
    xf = x.to(qt.scale.dtype)
    err = (qt.dequantize(qt.scale.dtype) - xf).abs()
    mag = xf.abs().amax(-1, keepdim=True)
    bound = qt.scale / 2 + 1e-6 * mag + 1e-30
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item():.3g}"


@pytest.mark.parametrize("case", ["normal", "offset", "huge", "tiny", "fp16", "bf16", "f64"])
def test_quant_roundtrip_bound(case):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 17, 64, generator=g)
    x = {"normal": x, "offset": x * 1e-2 + 1e4, "huge": x * 1e30, "tiny": x * 1e-30,
         "fp16": (x * 3).half(), "bf16": (x * 3).bfloat16(), "f64": x.double()}[case]
    qt = Q.quantize(x)
    assert qt.q.dtype == torch.uint8 and qt.q.shape == x.shape
    assert qt.scale.shape == qt.zero.shape == (*x.shape[:-1], 1)
    assert qt.scale.dtype == (torch.float64 if case == "f64" else torch.float32)
    assert qt.dtype == x.dtype and qt.dequantize().dtype == x.dtype
    _bound_ok(x, qt)
    # the extremes hit the ends of the code range
    assert int(qt.q.amin(-1).max()) == 0 and int(qt.q.amax(-1).min()) == 255
    # de-quantizing into a half dtype adds only that cast's rounding
    if x.dtype in (torch.float16, torch.bfloat16):
        ref = Q.dequantize(qt.q, qt.scale, qt.zero, torch.float32).to(x.dtype)
        assert torch.equal(qt.dequantize(), ref)


def test_quant_constant_groups_exact():
    x = torch.randn(2, 2, 5, 8)
    x[0, 1, 2] = 3.25
    x[1, 0] = -7.0  # five constant groups
    x[1, 1, 4] = 0.0
    qt = Q.quantize(x)
    assert float(qt.scale[0, 1, 2]) == 0 and bool((qt.q[0, 1, 2] == 0).all())
    y = qt.dequantize()
    assert torch.equal(y[0, 1, 2], x[0, 1, 2]) and torch.equal(y[1, 0], x[1, 0]) and torch.equal(y[1, 1, 4], x[1, 1, 4])
    assert torch.isfinite(y).all()
    _bound_ok(x, qt)
    big = torch.full((1, 1, 3, 4), -1e20)
    assert torch.equal(Q.quantize(big).dequantize(), big)


def test_quant_nbytes_and_gather():
    x = torch.randn(2, 3, 10, 16, dtype=torch.float16)
    qt = Q.quantize(x)
    assert qt.nbytes == sum(t.element_size() * t.numel() for t in (qt.q, qt.scale, qt.zero))
    assert qt.nbytes == 2 * 3 * 10 * (16 + 8) == 2 * 3 * 10 * Q.bytes_per_group(16, torch.float16)
    idx = torch.tensor([7, 0, 3])
    part = qt.index_select(2, idx)
    assert torch.equal(part.dequantize(), qt.dequantize()[:, :, idx])
    assert torch.equal(Q.dequantize(qt.q[:, :, idx], qt.scale[:, :, idx], qt.zero[:, :, idx], torch.float16), part.dequantize())
    # a token quantized alone gives the same codes as inside a larger tensor (token granularity)
    assert torch.equal(Q.quantize(x[:, :, 4:5]).q, qt.q[:, :, 4:5])
    with pytest.raises(ValueError, match="channel"):
        qt.index_select(-1, idx)
    with pytest.raises(ValueError, match="floating"):
        Q.quantize(torch.ones(2, 3, dtype=torch.long))


# --- recomputation --------------------------------------------------------------------
_MODELS = {}


def _model(name):
    if name not in _MODELS:
        fam, _, variant = name.partition(":")
        extra = {
            "mha": dict(num_key_value_heads=4),
            "rope-linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
            "post-ln": dict(do_layer_norm_before=False),
            "full-rotary": dict(rotary_pct=1.0),
        }.get(variant, {})
        _MODELS[name] = tiny_model(fam, **extra)
    return _MODELS[name]


def _positions(mask):
    return (mask.cumsum(-1) - 1).clamp(min=0)  # as generate: padding gets position 0


def _check_layers(model, rec_inputs, positions, cache, tol=1e-5):
    worst = 0.0
    for l in range(model.config.num_hidden_layers):
        k, v = R.kv_from_inputs(model, l, rec_inputs[l], positions)
        ck, cv = cache.layers[l].keys, cache.layers[l].values
        assert k.shape == ck.shape and v.shape == cv.shape, (k.shape, ck.shape)
        worst = max(worst, (k - ck).abs().max().item(), (v - cv).abs().max().item())
    assert worst <= tol, worst
    return worst


@pytest.mark.parametrize("name", ["llama", "llama:mha", "llama:rope-linear", "mistral", "qwen2",
                                  "opt", "opt:post-ln", "gpt_neox", "gpt_neox:full-rotary"])
def test_recompute_matches_cache(name):
    """Prefill a left-padded batch, then two decode steps: every layer's cache equals the recomputation."""
    model = _model(name)
    ids, mask = padded_batch(20)
    pos = _positions(mask)
    xs, steps = {l: [] for l in range(model.config.num_hidden_layers)}, [(ids, mask, pos)]
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        mask = torch.cat([mask, torch.ones(3, 1, dtype=torch.long)], 1)
        steps.append((torch.randint(2, 101, (3, 1), generator=g), mask, pos[:, -1:] + len(steps)))
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), R.capture_inputs(model) as rec:
        for step_ids, step_mask, step_pos in steps:
            model(input_ids=step_ids, attention_mask=step_mask, position_ids=step_pos, cache=cache, use_cache=True)
            for l in xs:
                xs[l].append(rec[l])
    assert not rec._handles  # hooks removed on exit
    all_pos = torch.cat([s[2] for s in steps], 1)
    _check_layers(model, {l: torch.cat(v, 1) for l, v in xs.items()}, all_pos, cache)


def test_recompute_subset_of_tokens():
    """Recomputing a gathered subset (the engine's use) gives the cache's rows at those slots."""
    model = _model("llama")
    ids, mask = padded_batch(16)
    pos = _positions(mask)
    with torch.no_grad(), R.capture_inputs(model) as rec:
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
    idx = torch.tensor([15, 2, 9])
    k, v = R.kv_from_inputs(model, 1, rec[1][:, idx], pos[:, idx])
    torch.testing.assert_close(k, out.cache.layers[1].keys[:, :, idx], atol=1e-5, rtol=0)
    torch.testing.assert_close(v, out.cache.layers[1].values[:, :, idx], atol=1e-5, rtol=0)
    assert rec.positions[1] is pos  # llama passes position_ids to its attention


def test_recompute_accounting():
    def cfg(path):
        hf = dict(yaml.safe_load(path.read_text())["hf_config"])
        return AutoConfig.for_model(hf.pop("model_type"), **hf)

    smol, llama7 = cfg(CONF / "smollm2-135m.yaml"), cfg(CONF / "llama-7b.yaml")
    assert R.input_bytes_per_token(smol, torch.float16) == 576 * 2
    assert R.kv_bytes_per_token(smol, torch.float16) == 2 * 3 * 64 * 2
    assert not R.recompute_saves_memory(smol)  # GQA: 576 ≥ 384
    assert R.recompute_saves_memory(llama7)  # MHA: 4096 < 8192
    assert R.input_bytes_per_token(llama7, "float32") == 4096 * 4
    assert R.recompute_flops_per_token(llama7) == 2 * 4096 * 8192
    assert R.recompute_flops_per_token(smol) == 2 * 576 * 384
    neox = _model("gpt_neox").config
    assert R.recompute_flops_per_token(neox) == 2 * 64 * 192 and R.kv_bytes_per_token(neox, torch.float32) == 2 * 64 * 4
    bad = AutoConfig.for_model("gpt2", n_embd=64, n_layer=1, n_head=4)
    with pytest.raises(ValueError, match="does not support model_type='gpt2'"):
        R.kv_bytes_per_token(bad, torch.float16)
