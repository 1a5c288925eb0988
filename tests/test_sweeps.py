"""Sweeps: resumable and fault tolerant runs, Hydra multirun with joblib and submitit, SLURM launcher config.

Each test runs tiny points: SmolLM2-135M (embedded), the first 2 COPA documents, 0-shot, no W&B.
"""

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from alisa.config import register_configs
from alisa.eval import CONF_DIR, FAIL_ENV, point_hash, point_identity, run_experiment
from alisa.report import load_failures, load_records

REPO = Path(__file__).resolve().parent.parent
TINY = ["tasks=[copa_local]", "limit=2", "num_fewshot=0", "logger=none"]


def cli(*args, cwd, env=None):
    """The command line and subprocess keywords of ``python -m alisa.eval ARGS`` (no inherited failure hook)."""
    base = {k: v for k, v in os.environ.items() if k != FAIL_ENV}
    env = {**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    return [sys.executable, "-m", "alisa.eval", *args], dict(cwd=cwd, env=env, text=True)


def run_cli(*args, cwd, env=None, timeout=300):
    cmd, kw = cli(*args, cwd=cwd, env=env)
    return subprocess.run(cmd, capture_output=True, timeout=timeout, **kw)


def compose_cfg(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def snapshot(points: Path) -> dict[str, tuple[int, str]]:
    """name -> (mtime_ns, content) of every file in points/."""
    return {f.name: (f.stat().st_mtime_ns, f.read_text()) for f in sorted(points.iterdir())}


def stems(points: Path) -> list[str]:
    return sorted(f.name.rsplit("__", 1)[0] for f in points.glob("*.json"))


# --- identity and hash ---

def test_point_hash_covers_what_determines_the_result(tmp_path):
    base = ["grid.policies=[swa]", "grid.sparsities=[0.8]", "tasks=[copa_local]", "limit=2"]
    point = {"policy": "swa", "sparsity": 0.8, "budget": None}

    def h(*extra, p=point):
        return point_hash(point_identity(compose_cfg(base + list(extra)), p, "copa_local"))

    ref = h()
    assert len(ref) == 12 and ref == h()
    # where results go and how they are logged do not change the result
    for extra in ("run_id=other", f"results_dir={tmp_path}", "experiment_name=x", "logger=none",
                  "grid.policies=[dense,swa]", "tasks=[copa_local,piqa_local]", f"data_dir={tmp_path}"):
        assert h(extra) == ref, extra
    # everything that does
    for extra in ("seed=1", "limit=3", "num_fewshot=1", "max_length=64", "batch_size=2", "grid.prefill=dense",
                  "model.dtype=bfloat16", "+task_limits.copa_local=5"):
        assert h(extra) != ref, extra
    assert h(p={**point, "sparsity": 0.5}) != ref and h(p={**point, "policy": "h2o"}) != ref
    assert h(p={"policy": "swa", "sparsity": None, "budget": 64}) != ref


# --- resume and failures (in process: the model stays loaded) ---

def test_rerun_skips_finished_points_and_a_changed_setting_supersedes(tmp_path, data_root):
    args = TINY + ["grid.policies=[dense,local]", f"results_dir={tmp_path}", "experiment_name=resume"]
    run = run_experiment(compose_cfg(args))
    assert run == tmp_path / "resume" / "main"
    points = run / "points"
    before = snapshot(points)
    assert stems(points) == ["dense-s0__copa_local", "local-s0.8__copa_local"]
    assert run_experiment(compose_cfg(args)) == run
    assert snapshot(points) == before  # nothing recomputed, nothing rewritten
    # another limit is another result: recomputed, the old record moved aside, still one file per (point, task)
    run_experiment(compose_cfg(args + ["grid.policies=[local]", "limit=3"]))
    assert stems(points) == ["dense-s0__copa_local", "local-s0.8__copa_local"]
    local = [r for r in load_records(run) if r["policy"] == "local"]
    assert [r["limit"] for r in local] == [3] and [r["n_docs"] for r in local] == [3]
    assert [f.name for f in (run / "superseded").iterdir()] == [n for n in before if n.startswith("local")]


def rerun_in_process(args, caplog) -> str:
    """Rerun the sweep here (the model is loaded once per process); returns what it logged."""
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="alisa.eval"):
        run_experiment(compose_cfg(args))
    return caplog.text


def test_a_failing_point_is_recorded_and_a_rerun_retries_only_it(tmp_path, data_root, monkeypatch, caplog):
    monkeypatch.delenv(FAIL_ENV, raising=False)
    args = [*TINY, "grid.policies=[local,dense]", f"results_dir={tmp_path}", "experiment_name=faults"]
    r = run_cli(*args, cwd=tmp_path, env={FAIL_ENV: "local-s0.8"})
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: 1 of 2 (point, task) runs failed: local-s0.8/copa_local (RuntimeError: injected failure"), last
    run = tmp_path / "faults" / "main"
    [failed] = load_failures(run)
    assert failed["status"] == "failed" and failed["point_id"] == "local-s0.8" and failed["task"] == "copa_local"
    assert "Traceback" in failed["traceback"] and "RuntimeError: injected failure" in failed["traceback"]
    assert (run / "points" / f"local-s0.8__copa_local__{failed['hash']}.json").exists()
    assert [r["point_id"] for r in load_records(run)] == ["dense-s0"]  # the sweep went on after the failure
    assert "FAILED local-s0.8 copa_local: RuntimeError" in (run / "summary.txt").read_text()
    before = snapshot(run / "points")

    logged = rerun_in_process(args, caplog)
    assert "run local-s0.8 copa_local" in logged and "run dense-s0" not in logged
    assert "skip dense-s0 copa_local: done" in logged and "1 ran, 1 skipped" in logged
    after = snapshot(run / "points")
    assert sorted(after) == sorted(before)  # the failure record was replaced under the same name
    dense = [n for n in before if n.startswith("dense")]
    assert {n: after[n] for n in dense} == {n: before[n] for n in dense}  # the finished point was not rewritten
    assert load_failures(run) == [] and len(load_records(run)) == 2
    assert "FAILED" not in (run / "summary.txt").read_text()


def test_sigkill_mid_sweep_loses_at_most_the_point_in_flight(tmp_path, data_root, caplog):
    args = [*TINY, "grid.policies=[dense,local,sinks]", f"results_dir={tmp_path}", "experiment_name=kill"]
    points = tmp_path / "kill" / "main" / "points"
    cmd, kw = cli(*args, cwd=tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, **kw)
    try:
        deadline = time.monotonic() + 240
        while not (points.is_dir() and list(points.glob("*.json"))):
            assert proc.poll() is None and time.monotonic() < deadline, "the sweep ended before writing a result"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    first = snapshot(points)
    assert 1 <= len(first) < 3  # killed mid-sweep
    logged = rerun_in_process(args, caplog)
    assert f"{len(first)} skipped" in logged
    assert stems(points) == ["dense-s0__copa_local", "local-s0.8__copa_local", "sinks-s0.8__copa_local"]
    assert sorted(p.name for p in points.iterdir()) == sorted(p.name for p in points.glob("*__????????????.json"))
    assert not list((points.parent / ".tmp").iterdir())
    after = snapshot(points)
    assert {n: after[n] for n in first} == first  # finished before the kill: not recomputed
    assert all(r["status"] == "ok" for r in load_records(points.parent))


# --- scale-out: Hydra multirun ---

def test_joblib_multirun_two_workers_one_folder(tmp_path, data_root):
    """4 jobs on 2 joblib workers; dense appears in two jobs (once per sparsity) and is computed once."""
    cmd, kw = cli("-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "grid.policies=dense,local",
                  "grid.sparsities=0.5,0.8", f"results_dir={tmp_path}", "experiment_name=jl", cwd=tmp_path)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    run = tmp_path / "jl" / "main"
    assert stems(run / "points") == ["dense-s0__copa_local", "local-s0.5__copa_local", "local-s0.8__copa_local"]
    recs = load_records(run)
    # Worker processes, never the launcher. loky may hand every job to the first worker while the
    # second is still starting (CI saw that once), so one or two distinct workers are both right.
    pids = {r["pid"] for r in recs}
    assert proc.pid not in pids and 1 <= len(pids) <= 2, pids
    assert all(r["status"] == "ok" and r["run_id"] == "main" for r in recs)
    rows = (run / "summary.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # the last job's report sees every point
    assert list((run / "multirun").glob("*/multirun.yaml"))
    written = yaml.safe_load((run / "config.yaml").read_text())  # one job's whole config, never a mix
    assert written["run_id"] == "main" and written["grid"]["policies"] in (["dense"], ["local"])


def test_submitit_local_multirun(tmp_path, data_root):
    r = run_cli("-m", "hydra/launcher=submitit_local", *TINY, "grid.policies=local", f"results_dir={tmp_path}",
                "experiment_name=sub", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "sub" / "main"
    [rec] = load_records(run)
    assert rec["point_id"] == "local-s0.8" and rec["n_docs"] == 2 and rec["pid"] != os.getpid()
    [log] = run.glob("multirun/*/.submitit/*/*_log.out")
    assert "run local-s0.8 copa_local" in log.read_text()


def test_slurm_launcher_config_makes_the_sbatch_script(tmp_path, monkeypatch):
    """conf/hydra/launcher/slurm.yaml through the plugin's real SlurmLauncher, up to the sbatch file it would submit."""
    import submitit
    from hydra.utils import instantiate

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.job.name=alisa", f"results_dir={tmp_path}",
            "+experiment=paper_accuracy"])
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    seen = {}

    class Submitted(Exception):
        pass

    def map_array(self, fn, *args):
        seen["executor"] = self
        raise Submitted

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", map_array)
    fake_bin = tmp_path / "bin"  # submitit's SLURM executor wants `srun` on PATH; nothing calls it here
    fake_bin.mkdir()
    (fake_bin / "srun").write_text("#!/bin/sh\nexit 1\n")
    (fake_bin / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(Submitted):
        launcher.launch([["grid.policies=dense"], ["grid.policies=swa"]], initial_job_idx=0)
    script = seen["executor"]._executor._make_submission_file_text("python -m submitit.core._submit X", "0")
    for line in ("#SBATCH --partition=gpu", "#SBATCH --gpus-per-node=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --mem=64GB", "#SBATCH --time=720", "#SBATCH --nodes=1", "#SBATCH --ntasks-per-node=1"):
        assert line in script, (line, script)
    assert str(tmp_path / "paper_accuracy" / "main" / "multirun") in script  # logs beside the results
    assert seen["executor"]._executor.max_num_timeout == 3


# --- bad input in a sweep ---

def test_multirun_bad_job_fails_before_any_job_starts(tmp_path):
    r = run_cli("-m", "hydra/launcher=joblib", *TINY, "grid.policies=dense,swa9", f"results_dir={tmp_path / 'results'}",
                cwd=tmp_path)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert lines == ["error: unknown policy 'swa9': allowed are dense, h2o, local, quest, sinks, snapkv, strided, swa, tova"], r.stderr
    assert not (tmp_path / "results").exists()
