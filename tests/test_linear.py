"""The decode step's GEMM form (alisa.runtime.linear): the ``mm`` route computes what ``plain`` does."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from alisa.runtime import linear
from alisa.runtime.engine import Engine
from conftest import padded_batch, tiny_model


@pytest.mark.parametrize("family", ["llama", "opt", "gpt_neox"])  # opt and gpt_neox: linear layers with biases
def test_mm_route_equals_plain(family):
    model = tiny_model(family)
    ids, mask = padded_batch(24)
    ref = Engine(model, "swa", prefill="sparse", sparsity=0.5, linear="plain").generate(ids, mask, 8, keep_logits=True)
    got = Engine(model, "swa", prefill="sparse", sparsity=0.5, linear="mm").generate(ids, mask, 8, keep_logits=True)
    assert got.extra["linear"] == {"route": "mm"} and ref.extra["linear"] == {"route": "plain"}
    assert torch.equal(got.tokens, ref.tokens)
    torch.testing.assert_close(got.extra["logits"], ref.extra["logits"], atol=1e-5, rtol=1e-5)
    assert not any("forward" in m.__dict__ for m in model.modules())  # the modules are restored


def test_mm_linear_is_linear_and_only_for_few_rows():
    torch.manual_seed(0)
    m = nn.Linear(24, 40)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(linear.mm_linear(m, x), F.linear(x, m.weight, m.bias), atol=1e-6, rtol=1e-6)
    model = nn.Sequential(m)
    with linear.decode_linear(model, "mm", rows=4) as info:
        assert info == {"route": "mm"} and "forward" in m.__dict__
        calls = []
        real = linear.mm_linear
        linear.mm_linear = lambda mod, x: calls.append(x.shape) or real(mod, x)
        try:
            model(torch.randn(4, 1, 24)), model(torch.randn(2, 3, 24))  # 4 rows: mm; 6 rows (a prompt): F.linear
        finally:
            linear.mm_linear = real
        assert calls == [torch.Size([4, 1, 24])]
    assert "forward" not in m.__dict__


def test_choose_measures_on_a_large_enough_cpu_model():
    assert linear.choose(tiny_model("llama"), 4)["route"] == "plain"  # tiny: not worth measuring
    assert "not measured" in linear.choose(tiny_model("llama"), 4)["why"]
    torch.manual_seed(0)
    big = nn.Sequential(*[nn.Linear(1024, 1024, bias=False) for _ in range(9)])  # 36 MiB of weights
    got = linear.choose(big, 4, reps=1)
    assert got["route"] in ("mm", "plain") and got["plain_s"] > 0 and got["mm_s"] > 0
    assert got["route"] == ("mm" if got["mm_s"] < got["plain_s"] else "plain")
    assert linear.choose(big, 4) == got  # once per process and shape


@pytest.mark.parametrize("bad", ["fast", None, 1])
def test_bad_route_is_one_line(bad):
    with pytest.raises(ValueError, match=r"^linear=.* is invalid: allowed are auto, plain, mm$"):
        Engine(tiny_model("llama"), "dense", linear=bad)
