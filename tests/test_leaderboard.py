"""`+experiment=leaderboard`: every registered policy from the registry at run time, the ranked table and the
Pareto plots, and the needle heat maps -- all drawn by `python -m alisa.report` from the JSON alone.

The report side uses handmade records (no model); the per-document needle results are checked on real
lm-eval samples of the passkey task (a tiny random LLaMA reading SmolLM2's tokenizer: the plumbing, fast).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from alisa import policies as P
from alisa import report as R
from alisa.config import ConfigError, register_configs, validate
from alisa.eval import CONF_DIR, expand_policies, needle_docs, precheck

TASKS_DIR = Path(__file__).resolve().parent.parent / "tasks"


def compose_cfg(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


# --------------------------------------------------------------------------- the experiment's config


def test_config_runs_every_registered_policy(monkeypatch):
    class LbPlugin(P.REGISTRY["local"]):  # a policy registered in this process, as a plug-in would be
        name = "lbplugin"

    monkeypatch.setitem(P.REGISTRY, "lbplugin", LbPlugin)
    cfg = compose_cfg(["+experiment=leaderboard"])
    assert list(cfg.grid.policies) == ["all"]  # the file names no policy: the registry does, when the run starts
    names = expand_policies(cfg)
    assert names == P.available() and "lbplugin" in names and {"dense", "swa", "h2o"} <= set(names)
    points = validate(cfg, machine=False)
    by_policy = {}
    for p in points:
        by_policy.setdefault(p["policy"], []).append(p["sparsity"])
    assert set(by_policy) == set(names)
    for name, sparsities in by_policy.items():  # dense (no budget) once; the others at every sparsity
        assert sparsities == ([0.0] if not P.policy_class(name).takes_budget else list(cfg.grid.sparsities))
    assert "throughput" in cfg.tasks and {"piqa_local", "copa_local", "openbookqa_local", "winogrande_local"} <= set(cfg.tasks)
    assert any(t.startswith("ruler_") for t in cfg.tasks) and any(t.startswith("passkey_") for t in cfg.tasks)


def test_full_grid_and_cpu_subset_name_real_tasks():
    from alisa.eval import RUNNERS, expand_tasks

    full = compose_cfg(["+experiment=leaderboard"])
    assert list(full.grid.sparsities) == [0.5, 0.8, 0.9]
    assert {f"ruler_{k}_{n}_local" for k in ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt",
                                           "cwe", "fwe") for n in ("1k", "2k", "4k")} <= set(full.tasks)
    cpu = compose_cfg(["+experiment=leaderboard_cpu"])
    assert list(cpu.grid.policies) == ["all"]  # every registered policy: each has a compiled or one-pass CPU route
    assert expand_policies(cpu) == P.available()  # as the run expands it, before validating
    points = validate(cpu, machine=False)
    assert [p["policy"] for p in points] == P.available()
    assert {p["sparsity"] for p in points if p["policy"] != "dense"} == {0.8}
    for cfg in (full, cpu):  # every task and task limit names a task lm-eval finds in tasks/
        tasks = [t for t in expand_tasks(cfg) if not t.startswith("tput-")]
        RUNNERS["lm_eval"].check(cfg, tasks)
        RUNNERS["throughput"].check(cfg, [t for t in expand_tasks(cfg) if t.startswith("tput-")])


def test_all_keeps_explicit_names_first_and_unknown_names_fail(data_root):
    cfg = compose_cfg(["+experiment=leaderboard_cpu", "grid.policies=[swa,all]"])
    names = expand_policies(cfg)
    assert names[0] == "swa" and names.count("swa") == 1 and sorted(names) == P.available()
    cfg = compose_cfg(["+experiment=leaderboard_cpu", "grid.policies=[all,nope]"])
    expand_policies(cfg)
    with pytest.raises(ConfigError, match="unknown policy 'nope'"):
        validate(cfg, machine=False)
    # a multirun over sparsities is checked job by job before any starts, `all` expanded in each
    precheck(["-m", "+experiment=leaderboard_cpu", "grid.sparsities=0.5,0.9", f"data_dir={data_root}"])


# --------------------------------------------------------------------------- per-document needle results


def test_needle_docs_from_lm_eval_samples(data_root):
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from transformers import AutoConfig, AutoModelForCausalLM

    from alisa.lm_eval_model import AlisaLM
    from alisa.ruler import tokenizer

    tok = tokenizer()
    torch.manual_seed(0)
    hf = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    lm = AlisaLM(pretrained=AutoModelForCausalLM.from_config(hf).eval(), tokenizer=tok, policy="h2o", sparsity=0.8)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=False, metadata={"alisa_data_dir": str(data_root)})
    out = simple_evaluate(model=lm, tasks=["passkey_1k_local"], limit=5, task_manager=tm, log_samples=True,
                          bootstrap_iters=0)
    docs = needle_docs(out["samples"], "acc")
    assert [(d["task"], d["doc_id"], d["depth"], d["length"]) for d in docs] == [
        ("passkey_1k_local", i, depth, 1024) for i, depth in enumerate((0, 25, 50, 75, 100))]
    assert all(d["acc"] in (0, 1) for d in docs)
    assert sum(d["acc"] for d in docs) / 5 == out["results"]["passkey_1k_local"]["acc,none"]
    # documents without a depth (RULER, multiple choice) give no per-document record
    assert needle_docs({"copa_local": [{"doc_id": 0, "doc": {"premise": "x"}, "acc": 1.0}]}, "acc") == []


# --------------------------------------------------------------------------- the report, from JSON alone


DEPTHS, LENGTHS = (0, 50, 100), (1024, 2048)


def _record(point: str, task: str, value: float, needles=None) -> dict:
    policy, _, rest = point.partition("-")
    sparsity = float(rest[1:])
    r = {"experiment": "leaderboard", "point_id": point, "policy": policy, "sparsity": sparsity, "budget": None,
         "task": task, "kind": "lm_eval", "status": "ok", "hash": "0" * 12,
         "identity": {"v": 1, "kind": "lm_eval", "policy": policy, "sparsity": sparsity, "budget": None, "task": task,
                      "limit": 6, "num_fewshot": 0},
         "metrics": {"acc": {"value": value, "stderr": 0.1}}, "primary_metric": "acc", "n_docs": 6, "num_fewshot": 0,
         "kept_fraction": {"overall": 1.0 - sparsity, "per_layer": []}, "wall_time_s": 1.0,
         "model": {"name": "smollm2-135m"}, "hardware": {"device": "cpu"}}
    if needles is not None:
        r["needle_docs"] = needles
    return r


def _tput(point: str, tok_s: float, kv: float) -> dict:
    r = _record(point, "tput-engine-b4", 0.0)
    del r["metrics"], r["primary_metric"]
    r["identity"].update(kind="throughput", system="engine", batch=4, prompt=256, new_tokens=8)
    del r["identity"]["limit"], r["identity"]["num_fewshot"]
    r.update(kind="throughput", workload={"batch": 4, "prompt": 256, "new_tokens": 8},
             throughput={"system": "engine", "status": "ok", "decode_tok_s": tok_s, "throughput_tok_s": tok_s / 2,
                         "prefill_s": 1.0, "step_s_mean": 4 / tok_s, "decode_s": 8 * 4 / tok_s,
                         "kv_bytes_peak": {"device": kv, "host": 0.0}})
    return r


def _needles(task: str, length: int, hit) -> list[dict]:
    """Two documents per depth; ``hit(depth, length, i)`` says whether document i retrieved its key."""
    docs = [(d, i) for i in range(2) for d in DEPTHS]
    return [{"task": task, "doc_id": j, "depth": d, "length": length, "acc": int(hit(d, length, i))}
            for j, (d, i) in enumerate(docs)]


# Each setting's retrieval: dense finds everything; swa@0.5 misses the middle of 2k; swa@0.8 finds only the
# most recent depth (100%) and, at 1k, one of the two documents at 50%.
HITS = {
    "dense-s0": lambda d, n, i: True,
    "swa-s0.5": lambda d, n, i: not (n == 2048 and d == 50),
    "swa-s0.8": lambda d, n, i: d == 100 or (n == 1024 and d == 50 and i == 0),
}
SCORES = {"dense-s0": (0.7, 0.6, 0.5), "swa-s0.5": (0.65, 0.6, 0.55), "swa-s0.8": (0.4, 0.5, 0.2)}  # copa, ruler, piqa
SPEED = {"dense-s0": (40.0, 8e6), "swa-s0.5": (50.0, 4e6), "swa-s0.8": (60.0, 2e6)}  # decode tok/s, KV bytes


def _run(tmp_path: Path) -> Path:
    run = tmp_path / "leaderboard" / "main"
    (run / "points").mkdir(parents=True)
    recs = []
    for point, hit in HITS.items():
        for n in LENGTHS:
            task = f"passkey_{n // 1024}k_local"
            docs = _needles(task, n, hit)
            recs.append(_record(point, task, sum(d["acc"] for d in docs) / len(docs), docs))
        for task, v in zip(("copa_local", "ruler_niah_single_1k_local", "piqa_local"), SCORES[point]):
            recs.append(_record(point, task, v))
        recs.append(_tput(point, *SPEED[point]))
    for r in recs:
        (run / "points" / f"{r['point_id']}__{r['task']}__{'0' * 12}.json").write_text(json.dumps(r))
    return run


def test_report_draws_heat_maps_leaderboard_and_pareto_from_json(tmp_path, capsys):
    run = _run(tmp_path)
    assert R.main([str(run)]) == 0
    printed = capsys.readouterr().out
    # the needle heat maps: one figure per policy, one panel per sparsity (wider with more panels)
    import matplotlib.image

    dense_png, swa_png = run / "plots" / "needle_heatmap_dense.png", run / "plots" / "needle_heatmap_swa.png"
    assert matplotlib.image.imread(swa_png).shape[1] > 1.3 * matplotlib.image.imread(dense_png).shape[1]
    cells = {e["setting"]: {(c["depth"], c["length"]): (c["value"], c["n"]) for c in e["cells"]}
             for e in json.loads((run / "needle_heatmap.json").read_text())}
    assert set(cells) == {"dense", "swa@0.5", "swa@0.8"}
    for point, hit in HITS.items():
        setting = R._setting(_record(point, "x", 0))
        for d in DEPTHS:
            for n in LENGTHS:
                assert cells[setting][(d, n)] == (sum(hit(d, n, i) for i in range(2)) / 2, 2)
    assert cells["swa@0.8"][(50, 1024)] == (0.5, 2) and cells["swa@0.5"][(50, 2048)] == (0.0, 2)
    # the ranked table: accuracy per task, mean, decode tok/s, peak KV
    board = json.loads((run / "leaderboard.json").read_text())
    means = {p: (2 * sum(hit(d, n, i) for d in DEPTHS for n in LENGTHS for i in range(2)) / 12 + sum(SCORES[p])) / 5
             for p, hit in HITS.items()}
    assert [r["point_id"] for r in board] == sorted(means, key=means.get, reverse=True)
    assert [r["rank"] for r in board] == [1, 2, 3]
    for r in board:
        assert r["mean"] == pytest.approx(means[r["point_id"]]) and r["n_tasks"] == 5
        assert (r["decode_tok_s"], r["kv_bytes"]) == SPEED[r["point_id"]]
        assert r["accuracy"]["copa_local"] == SCORES[r["point_id"]][0]
    rows = list(csv.DictReader((run / "leaderboard.csv").open()))
    assert [row["setting"] for row in rows] == [r["setting"] for r in board] and "ruler_niah_single_1k_local" in rows[0]
    summary = (run / "summary.txt").read_text()
    assert "Leaderboard (ranked by mean accuracy over 5 tasks" in summary and "Leaderboard" in printed
    top = next(ln for ln in summary.split("Leaderboard", 1)[1].splitlines() if ln.startswith("1 "))
    assert board[0]["setting"] in top and f"{board[0]['decode_tok_s']:.1f}" in top
    # and the Pareto plots of the same grid
    assert (run / "plots" / "pareto_accuracy_vs_throughput.png").exists() and (run / "plots" / "pareto_accuracy_vs_kv.png").exists()


def test_report_skips_a_record_with_malformed_needle_docs(tmp_path, capsys):
    run = _run(tmp_path)
    bad = next((run / "points").glob("swa-s0.8__passkey_2k_local__*.json"))
    r = json.loads(bad.read_text())
    r["needle_docs"][0]["depth"] = "middle"
    bad.write_text(json.dumps(r))
    out = R.rebuild(run)
    assert out["skipped"] == [f"skipped record {bad}: needle_docs is not a list of {{task, doc_id, depth, length, acc}}"]
    assert {(c["depth"], c["length"]) for c in next(e for e in out["needle"] if e["setting"] == "swa@0.8")["cells"]} == {
        (d, 1024) for d in DEPTHS}  # the rest of the setting is still drawn
    assert "warning: skipped record" in capsys.readouterr().err
