"""The Hydra runner: typed config, results folder, report, W&B offline runs, one-line errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from alisa.config import register_configs
from alisa.eval import CONF_DIR, run_experiment
from alisa.report import main as report_main
from alisa.wandb_log import read_offline_run

REPO = Path(__file__).resolve().parent.parent


def make_task(folder: Path) -> Path:
    """A 6-document multiple-choice task with its data beside it."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [{"q": f"Is {i} an even number?", "a": ["yes", "no"][i % 2]} for i in range(6)]
    (folder / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "tiny.yaml").write_text(f"""task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder / 'd.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{q}}}} Answer:"
doc_to_target: "{{{{a}}}}"
doc_to_choice: ["yes", "no"]
metric_list:
  - metric: acc
""")
    return folder


def compose_cfg(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def test_run_writes_results_report_and_wandb(tmp_path):
    tasks = make_task(tmp_path / "tasks")
    cfg = compose_cfg([f"tasks_dir={tasks}", "tasks=[tiny_mc]", "grid.policies=[dense,swa]", "grid.sparsities=[0.8]",
                       f"results_dir={tmp_path / 'results'}", "run_id=r1", "experiment_name=unit"])
    run = run_experiment(cfg)
    assert run == tmp_path / "results" / "unit" / "r1"
    assert (run / "config.yaml").exists()
    recs = {p.name.rsplit("__", 1)[0]: json.loads(p.read_text()) for p in (run / "points").glob("*.json")}
    assert sorted(recs) == ["dense-s0__tiny_mc", "swa-s0.8__tiny_mc"]
    swa = recs["swa-s0.8__tiny_mc"]
    assert swa["status"] == "ok" and (run / "points" / f"swa-s0.8__tiny_mc__{swa['hash']}.json").exists()
    assert swa["policy"] == "swa" and swa["sparsity"] == 0.8 and swa["task"] == "tiny_mc" and swa["n_docs"] == 6
    assert set(swa["metrics"]["acc"]) == {"value", "stderr"} and swa["primary_metric"] == "acc"
    assert len(swa["kept_fraction"]["per_layer"]) == 30 and 0 < swa["kept_fraction"]["overall"] < 1
    assert recs["dense-s0__tiny_mc"]["kept_fraction"]["overall"] == 1.0
    for key in ("git_commit", "versions", "hardware", "wall_time_s", "seed", "model"):
        assert key in swa
    rows = list(csv.DictReader((run / "summary.csv").open()))
    assert {r["point_id"] for r in rows} == {"dense-s0", "swa-s0.8"}
    assert (run / "plots" / "accuracy_vs_sparsity.png").stat().st_size > 1000
    # the report is rebuilt from the JSON alone
    before = (run / "summary.csv").read_text()
    (run / "summary.csv").unlink()
    (run / "plots" / "accuracy_vs_sparsity.png").unlink()
    assert report_main([str(run)]) == 0
    assert (run / "summary.csv").read_text() == before and (run / "plots" / "accuracy_vs_sparsity.png").exists()
    # W&B offline runs: one per grid point, plus the summary run
    runs = [read_offline_run(f) for f in sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))]
    by_name = {r["name"]: r for r in runs}
    assert set(by_name) == {"dense-s0", "swa-s0.8", "summary"}
    assert by_name["swa-s0.8"]["config"]["policy"] == "swa"
    assert by_name["swa-s0.8"]["summary"]["tiny_mc/acc"] == swa["metrics"]["acc"]["value"]
    assert by_name["swa-s0.8"]["summary"]["tiny_mc/kept_fraction"] == swa["kept_fraction"]["overall"]
    assert any(k.startswith("summary") for k in by_name["summary"]["history_keys"])


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "alisa.eval", *args], capture_output=True, text=True, cwd=cwd,
                          env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})


# One case per kind of bad input: one line naming the bad value and what is allowed, exit 2, nothing written.
# (A corrupt golden file: tests/test_regression.py::test_corrupt_golden_is_one_clear_error; an unwritable
# results folder: test_unwritable_results_dir below; a bad value in one job of a multirun:
# tests/test_sweeps.py::test_multirun_bad_job_fails_before_any_job_starts.)
@pytest.mark.parametrize("args,message", [
    pytest.param(["+experiment=nope"], "error: unknown experiment 'nope': allowed are ci_regression, leaderboard, leaderboard_cpu, long_context, paper_accuracy, paper_throughput, paper_throughput_cpu, quickstart, throughput_quick, tradeoff",
                 id="unknown_experiment"),
    pytest.param(["grid.policies=[dense,swa9]"], "error: unknown policy 'swa9': allowed are dense, h2o, local, quest, sinks, snapkv, strided, swa, tova",
                 id="unknown_policy"),
    pytest.param(["grid.sparsities=[1.5]", "grid.policies=[swa]"], "error: sparsity=1.5 is invalid: allowed is a number in [0, 1)",
                 id="sparsity_out_of_range"),
    pytest.param(["tasks=[piqa_local]", "data_dir=/nonexistent/alisa-data"],
                 "error: data folder '/nonexistent/alisa-data' does not exist: run `python -m alisa.data prepare`",
                 id="missing_data_folder"),
    pytest.param(["tasks=[no_such_task]"], "error: unknown task 'no_such_task': local tasks are", id="unknown_task"),
    pytest.param(["grid.bogus=1"], "error: Could not override 'grid.bogus': Key 'bogus' not in 'GridConf' "
                 "(allowed keys: policies, sparsities, budgets, prefill)", id="unknown_key"),
    pytest.param(["limit=abc"], "error: Error merging override limit=abc: Value 'abc' of type 'str' could not be "
                 "converted to Float", id="wrong_type"),
    pytest.param(["grid.policies=[swa]", "grid.budgets=[0]"], "error: budget=0 is invalid: allowed is an integer >= 1 (tokens)",
                 id="budget_not_positive"),
    pytest.param(["grid.policies=[dense"], "error: malformed override 'grid.policies=[dense': no viable alternative at "
                 "input '[dense'", id="malformed_override"),
    pytest.param(["model.name=no-org/no-model"], "error: model 'no-org/no-model' is not a local folder and the hub is offline",
                 id="unknown_model"),
    pytest.param(["model.device=cuda"], "error: model.device='cuda' asked for, but no CUDA GPU is available here",
                 id="gpu_without_gpu"),
    pytest.param(["run_id=a/b"], "error: run_id='a/b' is invalid: allowed are letters, digits, '.', '-' and '_'",
                 id="bad_run_id"),
])
def test_bad_input_one_line_error_and_no_results(tmp_path, args, message):
    import torch

    if "model.device=cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the no-GPU error cannot happen")
    r = run_cli(*args, f"results_dir={tmp_path / 'results'}", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    check_one_line(r, message, tmp_path)


def check_one_line(r, message, tmp_path):
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), r.stderr
    assert not (tmp_path / "results").exists() or not any((tmp_path / "results").iterdir())


@pytest.mark.slow
def test_quickstart_experiment(tmp_path, data_root):
    """The README's accuracy quickstart, offline (about two minutes on 2 cores)."""
    r = run_cli("+experiment=quickstart", f"results_dir={tmp_path}", "run_id=q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "swa@0.8" in r.stdout and "copa_local (acc)" in r.stdout
    run = tmp_path / "quickstart" / "q"
    assert len(list((run / "points").glob("*.json"))) == 8 and not list((run / "points").glob("*.tmp"))
    assert (run / "plots" / "accuracy_vs_sparsity.png").exists() and list((run / "wandb").glob("offline-run-*"))


def test_same_config_and_seed_give_identical_metrics(tmp_path):
    tasks = make_task(tmp_path / "tasks")
    metrics = []
    for run_id in ("a", "b"):
        cfg = compose_cfg([f"tasks_dir={tasks}", "tasks=[tiny_mc]", "grid.policies=[h2o]", "grid.sparsities=[0.5]",
                           f"results_dir={tmp_path / 'results'}", f"run_id={run_id}", "logger=none", "num_fewshot=2"])
        run = run_experiment(cfg)
        [record] = (run / "points").glob("h2o-s0.5__tiny_mc__*.json")
        metrics.append(json.loads(record.read_text())["metrics"])
    assert metrics[0] == metrics[1]


def test_unwritable_results_dir(tmp_path):
    r = run_cli("results_dir=/proc/alisa-results", cwd=tmp_path)
    assert r.returncode == 2
    check_one_line(r, "error: results_dir='/proc/alisa-results' cannot be written", tmp_path)
    assert "allowed is a writable folder" in r.stderr
