"""The profile's measured rates: a CPU profile has the RAM copy rate and says why the pinned
link rates are absent; profiles written before these fields existed still read."""

import json

import pytest
import torch

from alisa.profile import PINNED_NOT_CUDA, ProfileError, hbm_copy_bandwidth, measure, pinned_bandwidth, read_profile
from alisa.runtime.costmodel import Profile
from alisa.testing import tiny_model


def test_a_cpu_profile_has_the_copy_rate_and_no_pinned_rates_with_the_reason(tmp_path):
    prof = measure(tiny_model("llama"), "tiny-llama", torch.float32, torch.device("cpu"))
    assert prof.hbm_copy_bw > 0 and prof.copy_bw > 0  # both measured: the plain copy and the runtime's gather + copy
    assert prof.h2d_pinned_bw is None and prof.d2h_pinned_bw is None
    assert prof.extra["pinned_bw"] == PINNED_NOT_CUDA and "no CUDA device" in prof.extra["pinned_bw"]
    assert "RAM copy bandwidth" in prof.case and "RAM to RAM" in prof.extra["hbm_copy_bw"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(prof.to_dict()))
    back = read_profile(path)
    assert back == prof  # null rates survive the round trip


def test_the_rate_functions_on_cpu():
    assert hbm_copy_bandwidth(torch.device("cpu"), nbytes=1 << 20, repeat=2) > 0
    assert pinned_bandwidth(torch.device("cpu")) == (None, None, PINNED_NOT_CUDA)


def test_an_old_profile_without_the_new_rates_still_reads(tmp_path):
    old = {"device": "cpu", "hardware": {"device": "cpu"}, "model": "smollm2-135m", "dtype": "float32",
           "step_base_s": 0.02, "step_per_seq_s": 0.001, "attn_read_bw": 5e9, "copy_bw": 2e9, "recompute_flops": 1e10,
           "device_capacity": 8 << 30, "host_capacity": 8 << 30, "case": "cpu: both tiers in RAM", "extra": {}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    prof = read_profile(path)
    assert isinstance(prof, Profile) and prof.copy_bw == 2e9
    assert prof.hbm_copy_bw is None and prof.h2d_pinned_bw is None and prof.d2h_pinned_bw is None


@pytest.mark.parametrize("value", [-1, "fast", True])
def test_a_bad_new_rate_is_one_line(tmp_path, value):
    d = {"device": "cpu", "hardware": {}, "model": "m", "dtype": "float32", "step_base_s": 0.02, "step_per_seq_s": 0.0,
         "attn_read_bw": 1.0, "copy_bw": 1.0, "recompute_flops": 1.0, "device_capacity": 1, "host_capacity": 1,
         "h2d_pinned_bw": value}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ProfileError, match=r"h2d_pinned_bw=.* is not a number >= 0 or null") as e:
        read_profile(path)
    assert "\n" not in str(e.value)
