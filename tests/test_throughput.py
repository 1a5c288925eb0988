"""Throughput sweeps through the Hydra runner: records, baselines, OOM, plans, the tradeoff report."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from alisa.eval import run_experiment
from alisa.report import front, rebuild
from test_eval import compose_cfg, make_task

REPO = Path(__file__).resolve().parent.parent
SMALL = ["throughput.prompt=32", "throughput.new_tokens=5", "logger=none"]


def records(run: Path) -> dict[str, dict]:
    return {p.name.rsplit("__", 1)[0]: json.loads(p.read_text()) for p in (run / "points").glob("*.json")}


def test_throughput_sweep_records_every_figure_and_baselines_once(tmp_path):
    cfg = compose_cfg(["+experiment=throughput_quick", "grid.policies=[dense,swa]", "throughput.batches=[1,2]",
                       f"results_dir={tmp_path}", *SMALL])
    run = run_experiment(cfg)
    recs = records(run)
    # baselines do not depend on the policy: they run at the dense point only
    assert sorted(recs) == sorted(f"{p}__tput-{s}-b{b}" for b in (1, 2) for p, s in
                                  [("dense-s0", "stock"), ("dense-s0", "flexgen"), ("dense-s0", "engine"), ("swa-s0.8", "engine")])
    for name, r in recs.items():
        t = r["throughput"]
        assert t["status"] == "ok" and r["kind"] == "throughput", name
        for key in ("throughput_tok_s", "decode_tok_s", "prefill_s", "step_s_mean", "kv_bytes_peak", "case"):
            assert t[key] is not None, (name, key)
        assert r["workload"] == {"batch": int(name[-1]), "prompt": 32, "new_tokens": 5}
        assert r["hardware"]["device"] == "cpu" and "both tiers in RAM" in t["case"]
    flex = recs["dense-s0__tput-flexgen-b2"]["throughput"]
    assert flex["bytes_h2d"] > 0 and flex["kv_bytes_peak"]["host"] > 0  # static offload: moved every step
    swa = recs["swa-s0.8__tput-engine-b2"]["throughput"]
    dense = recs["dense-s0__tput-engine-b2"]["throughput"]
    assert swa["kv_bytes_peak"]["device"] < dense["kv_bytes_peak"]["device"]
    assert recs["dense-s0__tput-engine-b2"]["throughput"]["prefill_shared"] is True  # stateless dense shares the stock prefill
    assert swa["prefill_shared"] is False
    for plot in ("throughput_vs_batch.png", "time_breakdown.png"):
        assert (run / "plots" / plot).stat().st_size > 0
    assert "decode tok/s" in (run / "summary.txt").read_text()
    # the report rebuilds from the JSON alone
    (run / "summary.txt").unlink()
    rebuild(run)
    assert "engine" in (run / "summary.txt").read_text()


def test_static_engine_point_says_how_it_ran(tmp_path, monkeypatch):
    from alisa.runtime.engine import Compiled

    monkeypatch.setattr(Compiled, "BACKEND", "eager")  # dynamo's graph, no code generation: fast
    cfg = compose_cfg(["+experiment=throughput_quick", "grid.policies=[swa]", "throughput.batches=[2]", "throughput.systems=[engine]",
                       "throughput.static=true", "throughput.compiled=true", "model.name=random:smollm2-135m",
                       "model.hf_config.num_hidden_layers=2", f"results_dir={tmp_path}", *SMALL])
    (rec,) = records(run_experiment(cfg)).values()
    t = rec["throughput"]
    assert t["status"] == "ok" and t["graph"] == "eager (no CUDA graphs on the CPU); compiled (eager, 1 graph)"
    assert t["compile_s"] > 0 and t["step_s_median"] < t["step_s"][0]  # the first step traced the graph
    assert rec["identity"]["static"] is True and rec["identity"]["compiled"] is True


def test_out_of_memory_point_is_recorded_and_the_sweep_goes_on(tmp_path):
    # SmolLM2, batch 1: Phase I holds 36 tokens x 46,080 B (1.66 MB) at the end; the local window
    # every plan keeps on the device is 19 tokens (0.88 MB). 1.2 MB: a plan could fit, Phase I does not.
    cfg = compose_cfg(["+experiment=throughput_quick", "grid.policies=[dense]", "throughput.batches=[1]",
                       "throughput.systems=[stock,engine]", "throughput.device_budget=1200000", f"results_dir={tmp_path}", *SMALL])
    recs = records(run_experiment(cfg))
    assert recs["dense-s0__tput-engine-b1"]["throughput"]["status"] == "oom"
    assert "device budget" in recs["dense-s0__tput-engine-b1"]["throughput"]["error"]
    assert recs["dense-s0__tput-stock-b1"]["throughput"]["status"] == "ok"


def test_a_budget_below_the_local_window_is_bad_input(tmp_path):
    from alisa.config import ConfigError

    cfg = compose_cfg(["+experiment=throughput_quick", "grid.policies=[dense,swa]", "throughput.batches=[1]",
                       "throughput.systems=[stock,engine]", "throughput.device_budget=1000", f"results_dir={tmp_path}", *SMALL])
    with pytest.raises(ConfigError, match=r"^throughput.device_budget=1000 is below what one decode step needs "
                                          r"\(engine, Dense\(sparsity=0.0\), batch 1\): allowed is >= 875520 bytes$"):
        run_experiment(cfg)
    assert not any(tmp_path.iterdir())  # nothing written
    # the command line: one line, exit 2
    r = subprocess.run([sys.executable, "-m", "alisa.eval", "+experiment=throughput_quick", "grid.policies=[swa]",
                        "throughput.batches=[2]", "throughput.device_budget=1000", f"results_dir={tmp_path}", *SMALL],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "throughput.device_budget=1000 is below" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not any(tmp_path.iterdir())


def test_auto_plan_is_searched_run_and_compared_with_the_prediction(tmp_path):
    prof = tmp_path / "profile.json"
    assert subprocess.run([sys.executable, "-m", "alisa.profile", "--out", str(prof)], cwd=REPO, capture_output=True).returncode == 0
    p = json.loads(prof.read_text())
    assert p["copy_bw"] > 0 and p["attn_read_bw"] > 0 and p["recompute_flops"] > 0 and p["step_base_s"] > 0
    # SmolLM2: 30 layers x 1536 B per token per sequence; 36 tokens x 2 sequences hold ~3.3 MB. Budget: 2 MB.
    cfg = compose_cfg(["+experiment=throughput_quick", "grid.policies=[dense]", "throughput.batches=[2]",
                       "throughput.systems=[engine]", "throughput.plan=auto", f"throughput.profile={prof}",
                       "throughput.device_budget=2000000", f"results_dir={tmp_path}", *SMALL])
    t = records(run_experiment(cfg))["dense-s0__tput-engine-b2"]["throughput"]
    assert t["status"] == "ok"
    plan = t["predicted"]["plan"]
    assert plan["alpha"] > 0 and plan["p1"] is not None and plan["beta"] == 0  # GQA: recomputation not chosen
    assert "not smaller than its KV" in t["predicted"]["note"]
    assert t["plan"] == plan and t["phase_switch_steps"]["phase2"] == plan["p1"]
    assert t["kv_bytes_peak"]["device"] <= 2_000_000 and t["bytes_h2d"] > 0
    assert t["predicted_vs_measured_decode"] > 0


def test_tradeoff_draws_both_pareto_fronts(tmp_path):
    tasks = make_task(tmp_path / "tasks")
    cfg = compose_cfg(["+experiment=tradeoff", f"tasks_dir={tasks}", "tasks=[tiny_mc,throughput]", "grid.policies=[dense,local,swa]",
                       "grid.sparsities=[0.5,0.8]", "throughput.batches=[1]", "throughput.systems=[engine]",
                       f"results_dir={tmp_path / 'r'}", *SMALL])
    run = run_experiment(cfg)
    pareto = json.loads((run / "pareto.json").read_text())
    assert sorted(p["setting"] for p in pareto) == ["dense", "local@0.5", "local@0.8", "swa@0.5", "swa@0.8"]
    for p in pareto:
        assert 0 <= p["accuracy"] <= 1 and p["decode_tok_s"] > 0 and p["kv_bytes"] > 0
    for plot in ("pareto_accuracy_vs_throughput.png", "pareto_accuracy_vs_kv.png", "accuracy_vs_sparsity.png"):
        assert (run / "plots" / plot).stat().st_size > 0
    assert "Pareto" in (run / "summary.txt").read_text()


def test_pareto_front_keeps_only_non_dominated_points():
    pts = [{"accuracy": 0.7, "x": 10}, {"accuracy": 0.6, "x": 30}, {"accuracy": 0.5, "x": 20}, {"accuracy": 0.7, "x": 5}]
    assert front(pts, "x", better_x_high=True) == [pts[0], pts[1]]
    assert front(pts, "x", better_x_high=False) == [pts[3]]


@pytest.mark.parametrize("override,needle", [
    ("throughput.systems=[warp]", "unknown throughput system 'warp': allowed are stock, hf_static, hf_offloaded, flexgen, engine"),
    ("throughput.plan=auto throughput.profile=/nonexistent.json", "throughput.profile='/nonexistent.json' does not exist"),
    ("throughput.batches=[0]", "throughput.batches entry 0 is invalid: allowed is an integer >= 1"),
    ("throughput.compiled=true", "throughput.compiled=true needs throughput.static=true"),
    ("ALISA_COMPILE_BACKEND=tvm throughput.static=true throughput.compiled=true",
     "ALISA_COMPILE_BACKEND='tvm' is invalid: allowed are inductor, aot_eager, eager"),
])
def test_bad_throughput_input_is_one_line(tmp_path, override, needle):
    env = {**os.environ, **dict(w.split("=", 1) for w in override.split() if w.startswith("ALISA_"))}
    args = [w for w in override.split() if not w.startswith("ALISA_")]
    out = subprocess.run([sys.executable, "-m", "alisa.eval", "+experiment=throughput_quick", *args,
                          f"results_dir={tmp_path}", "logger=none"], cwd=REPO, capture_output=True, text=True, env=env)
    assert out.returncode == 2
    lines = [l for l in out.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and needle in lines[0], out.stderr[-2000:]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_hf_static_generates_what_stock_generates(family):
    import torch

    from alisa.runtime.engine import dense_prefill
    from alisa.runtime.throughput import run_point, static_generate, stock_generate
    from alisa.testing import tiny_model

    model = tiny_model(family, seed=3)
    ids = torch.randint(2, 101, (3, 12), generator=torch.Generator().manual_seed(0))
    stock = stock_generate(model, ids, 12)["tokens"]
    assert len(set(stock.flatten().tolist())) > 3  # the comparison has teeth: the greedy tokens vary
    pf = dense_prefill(model, ids)
    own = static_generate(model, ids, 12)  # its own prompt pass into the StaticCache
    shared = static_generate(model, ids, 12, pf)  # the shared prefill's K, V written into it
    warm = static_generate(model, ids, 12, pf, warmup=3)  # untimed steps, then the cache set back to the prompt
    for out in (own, shared, warm):
        assert torch.equal(out["tokens"], stock)
        assert len(out["step_s"]) == 11 and out["compiled"] is False and "not compiled" in out["compile_reason"]
    assert warm["warmup_steps"] == 3 and warm["warmup_s"] > 0 and own["warmup_steps"] == 0
    rec = run_point(model, "hf_static", ids, 12, prefilled=pf)
    assert rec["status"] == "ok" and rec["prefill_shared"] is True and rec["prefill_s"] == pf.seconds
    assert rec["kv_bytes_peak"]["device"] > 0 and "cpu:" in rec["compile_reason"]
    with pytest.raises(ValueError, match=r"^compiled=True is invalid on cpu: allowed is a CUDA device"):
        static_generate(model, ids, 4, compiled=True)


def test_the_sweep_runs_hf_static_as_a_baseline(tmp_path):
    cfg = compose_cfg(["+experiment=throughput_quick", "grid.policies=[dense,swa]", "throughput.batches=[1]",
                       "throughput.systems=[stock,hf_static]", "throughput.prompt=8", "throughput.new_tokens=3",
                       "logger=none", f"results_dir={tmp_path}"])
    recs = records(run_experiment(cfg))
    assert sorted(recs) == ["dense-s0__tput-hf_static-b1", "dense-s0__tput-stock-b1"]  # a baseline: once, at dense
    t = recs["dense-s0__tput-hf_static-b1"]["throughput"]
    assert t["status"] == "ok" and t["compiled"] is False and t["prefill_shared"] is True and t["decode_tok_s"] > 0


@pytest.mark.slow
@pytest.mark.skipif(__import__("shutil").which("cc") is None, reason="torch.compile's CPU backend (inductor) builds C++: install a C compiler (cc) to run this test")
def test_hf_static_compiled_route_traces_once_and_matches_stock(monkeypatch):
    """The route CUDA takes (torch.compile of the forward, warm-up, cache set back), forced on the CPU
    (inductor; no CUDA graphs there): one graph for every decode step, no recompile, stock's tokens."""
    import torch
    from torch._dynamo.utils import counters

    import alisa.runtime.throughput as tp
    from alisa.runtime.engine import dense_prefill
    from alisa.testing import tiny_model

    model = tiny_model("opt", seed=3)
    ids = torch.randint(2, 101, (3, 12), generator=torch.Generator().manual_seed(0))
    stock = tp.stock_generate(model, ids, 12)["tokens"]
    monkeypatch.setattr(tp, "static_compile_reason", lambda dev: None)  # compile as on CUDA
    torch._dynamo.reset()
    counters.clear()
    out = tp.static_generate(model, ids, 12, dense_prefill(model, ids))
    assert out["compiled"] is True and out["warmup_steps"] == tp.STATIC_WARMUP_STEPS and out["warmup_s"] > 0
    assert torch.equal(out["tokens"], stock)
    assert counters["stats"]["unique_graphs"] == 1  # the padded mask and contiguous positions: same guards every step
    torch._dynamo.reset()
