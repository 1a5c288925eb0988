"""Invalid policy names and values raise one clear ValueError naming the value and what is allowed."""

import math

import pytest

import alisa


@pytest.mark.parametrize("name,kw,match", [
    ("swa2", dict(sparsity=0.5), "unknown policy 'swa2': allowed are dense, h2o, local, quest, sinks, snapkv, strided, swa, tova"),
    ("swa", dict(sparsity=1.0), r"sparsity=1.0 is invalid: allowed is a number in \[0, 1\)"),
    ("swa", dict(sparsity=-0.1), r"sparsity=-0.1 is invalid"),
    ("local", dict(sparsity=math.nan), r"sparsity=nan is invalid"),
    ("h2o", dict(sparsity="0.5"), r"sparsity='0.5' is invalid"),
    ("h2o", dict(sparsity=True), r"sparsity=True is invalid"),
    ("swa", dict(budget=0), r"budget=0 is invalid: allowed is an integer >= 1"),
    ("swa", dict(budget=2.5), r"budget=2.5 is invalid"),
    ("swa", dict(sparsity=0.5, budget=8), "needs exactly one of sparsity= or budget="),
    ("sinks", {}, "needs exactly one of sparsity= or budget="),
    ("dense", dict(sparsity=0.5), "policy 'dense' takes no budget and only sparsity=0"),
])
def test_invalid_policy(name, kw, match):
    with pytest.raises(ValueError, match=match):
        alisa.make_policy(name, **kw)


def test_valid_policies_describe_themselves():
    assert alisa.make_policy("swa", sparsity=0.8).key == {"policy": "swa", "sparsity": 0.8, "budget": None}
    assert repr(alisa.make_policy("h2o", budget=64)) == "H2O(budget=64)"
    assert alisa.make_policy("dense").key["sparsity"] == 0.0
