"""scripts/bench_gpu.py: the dry run (the same code paths on the CPU, a tiny OPT-like shape) writes
every system's record and every target; without CUDA and without --dry it is one line, exit 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "bench_gpu.py"
# smaller than --dry's default shape: about 20 s on two cores
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
SMALL = ["--prompt", "16", "--batch", "2", "--big-batch", "3", "--new", "4", "--big-new", "4", "--layers", "1", "--hidden", "64"]


def bench(*args, timeout=240):
    # --compiled: dynamo's graph without inductor's code generation (tests/test_runtime.py checks inductor itself)
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**OFFLINE, "ALISA_COMPILE_BACKEND": "eager"})


def test_dry_run_writes_every_record_and_every_target(tmp_path):
    out = tmp_path / "dry.json"
    r = bench("--dry", *SMALL, "--extra", "--compiled", "--out", str(out))  # --extra: every system at both batches
    assert r.returncode == 0, r.stderr[-3000:]
    assert "dry run: figures are not GPU figures" in r.stdout and "Traceback" not in r.stderr
    assert f"reproduce: python scripts/bench_gpu.py --dry {' '.join(SMALL)} --extra --compiled --out {out}" in r.stdout
    d = json.loads(out.read_text())
    assert d["dry"] is True and d["note"] == "dry run: figures are not GPU figures"
    engine = ["engine dense", "engine h2o@0.8", "engine swa@0.8"]
    expected = ([f"b2 {s}" for s in ["stock", "hf_static", "hf_offloaded", "flexgen", *engine, *(e + " static" for e in engine),
                                     *(e + " compiled" for e in engine)]]
                + [f"b3 {s}" for s in ["stock", "hf_static", *engine]]  # hf_static here and hf_offloaded at b2: --extra
                + [f"b3-budget {s}" for s in ["hf_offloaded", "flexgen", "flexgen static", *engine, "engine swa@0.8 static"]])
    assert sorted(d["records"]) == sorted(expected)
    for key, rec in d["records"].items():
        assert key in r.stdout  # a table row each
        if key.endswith("hf_offloaded"):  # needs a GPU: skipped, saying why
            assert rec["status"] == "skipped" and "no GPU here" in rec["reason"], rec
        else:
            assert rec["status"] == "ok", (key, rec)
            assert rec["step_s_mean"] > 0 and rec["step_s_median"] > 0 and rec["throughput_tok_s"] > 0, key
    for e in engine:  # the fixed-shape step: no CUDA graphs on the CPU, and the record says so
        rec = d["records"][f"b2 {e} static"]
        assert rec["graph"] == "eager (no CUDA graphs on the CPU)"
        assert "0 host read-backs, 0 data-dependent shapes, 0 ops differ between two steps" in rec["audit"], rec["audit"]
        comp = d["records"][f"b2 {e} compiled"]
        assert comp["graph"] == "eager (no CUDA graphs on the CPU); compiled (eager, 1 graph)" and comp["compile_s"] > 0, comp
        assert comp["tokens_fetched"] == rec["tokens_fetched"] and comp["kept_fraction"] == pytest.approx(rec["kept_fraction"])
    static = d["records"]["b2 hf_static"]
    assert static["compiled"] is False and "not compiled" in static["compile_reason"] and static["prefill_shared"] is True
    # under the budget the plan comes from the cost model's search with this run's profile, and dense offloads
    budget = d["workload"]["device_budget"]
    dense_b = d["records"]["b3-budget engine dense"]
    assert dense_b["predicted"]["plan"]["alpha"] > 0 and dense_b["plan"] == dense_b["predicted"]["plan"]
    assert dense_b["bytes_h2d"] > 0 and dense_b["kv_bytes_peak"]["device"] <= budget
    assert d["records"]["b3-budget flexgen"]["kv_bytes_peak"]["device"] <= budget
    for key in ("b3-budget flexgen", "b3-budget engine swa@0.8"):  # the fixed-shape step under the budget: the same run
        eager, static = d["records"][key], d["records"][key + " static"]
        assert static["graph"] == "eager (no CUDA graphs on the CPU)" and static["plan"] == eager["plan"], key
        assert static["tokens_fetched"] == eager["tokens_fetched"] and static["kv_bytes_peak"]["device"] <= budget, key
    assert d["profile"]["hbm_copy_bw"] > 0 and d["profile"]["h2d_pinned_bw"] is None
    assert d["rates"]["hbm_copy_bw"] == d["profile"]["hbm_copy_bw"] and "no CUDA device" in d["rates"]["pinned_what"]
    names = [t["target"] for t in d["targets"]]
    for prefix in ["(a) engine dense step (batch 2) <= 2x", "(a) engine dense step <= 0.5x stock", "(b) swa@0.8", "(b) h2o@0.8",
                   "(c) tier transfer rate", "(d) swa@0.8 under the budget, end-to-end tok/s >= 1.5x flexgen",
                   "(d) swa@0.8 under the budget, end-to-end tok/s >= 1.4x hf_offloaded",
                   "(d) swa@0.8 under the budget, end-to-end tok/s >= 1.0x stock", "(e) swa@0.8 sparse prefill"]:
        assert sum(n.startswith(prefix) for n in names) == 1, (prefix, names)
    for t in d["targets"]:
        assert t["status"] in ("PASS", "MISS", "N/A") and f"{t['status']:<4}  {t['target']}" in r.stdout
        if t["status"] == "N/A":  # not measured: it says why, and no ratio is claimed
            assert t["ratio"] is None and t["why"]
        else:
            assert t["ratio"] > 0 and t["met"] == (t["status"] == "PASS")
    (c,) = [t for t in d["targets"] if t["target"].startswith("(c)")]
    assert c["status"] == "N/A" and "no pinned H2D rate" in c["why"]  # the CPU has no pinned link to compare with


def test_deadline_and_small_only_skip_runs_and_still_write_every_target(tmp_path):
    """--deadline: no run starts after it (each record says so), the targets are N/A with that
    reason, the JSON is written whole; --small-only: no large-batch record, (c) and (d) N/A."""
    out = tmp_path / "late.json"
    r = bench("--dry", *SMALL, "--deadline", "0.001", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert "partial" not in d and d["records"] and len(d["targets"]) == 9
    for rec in d["records"].values():
        assert rec["status"] == "skipped" and rec["reason"].startswith("not run: --deadline 0.001 s passed"), rec
    assert all(t["status"] == "N/A" and t["ratio"] is None for t in d["targets"])
    out = tmp_path / "small.json"
    r = bench("--dry", *SMALL, "--small-only", "--systems", "stock,engine", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["records"] and all(k.startswith("b2 ") and rec["status"] == "ok" for k, rec in d["records"].items())
    for t in d["targets"]:
        assert (t["status"] == "N/A") == t["target"].startswith(("(c)", "(d)")), t
        if t["target"].startswith("(d)"):
            assert "--small-only" in t["why"], t


def test_a_run_killed_midway_keeps_the_runs_it_finished(tmp_path):
    """The JSON is rewritten (atomically) after every run, marked partial until the end: a run
    killed at a time limit keeps what it measured."""
    out = tmp_path / "killed.json"
    p = subprocess.Popen([sys.executable, str(SCRIPT), "--dry", *SMALL, "--out", str(out)], cwd=REPO, env=OFFLINE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        for line in p.stdout:
            if line.startswith("b2 hf_static"):  # the second run's row (a row is printed once its run is saved)
                break
    finally:
        p.kill()
        p.wait()
    d = json.loads(out.read_text())
    assert d["partial"] and "targets" not in d
    assert d["records"]["b2 stock"]["status"] == "ok" and d["records"]["b2 hf_static"]["status"] == "ok"


def test_resume_keeps_the_finished_runs_and_runs_the_others(tmp_path):
    """--resume: the --out JSON's finished runs are kept as they were (marked resumed), the others
    run; a result of another workload, or an unreadable one, is one line, exit 2, left as it is."""
    out = tmp_path / "r.json"
    r = bench("--dry", *SMALL, "--systems", "stock", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    first = json.loads(out.read_text())["records"]
    assert sorted(first) == ["b2 stock", "b3 stock"]
    r = bench("--dry", *SMALL, "--systems", "stock,engine", "--resume", "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "--resume: 2 finished runs kept from" in r.stdout
    d = json.loads(out.read_text())
    for key, rec in first.items():
        assert d["records"][key] == {**rec, "resumed": True}
    assert "b2 engine dense static" in d["records"] and not d["records"]["b2 engine dense"].get("resumed")
    assert d["records"]["b2 engine dense"]["status"] == "ok" and "partial" not in d
    (a,) = [t for t in d["targets"] if t["target"].startswith("(a) engine dense step <= 0.5x stock")]
    assert a["ratio"] > 0  # a resumed record and a new one, compared
    before = out.read_text()
    for args, needle in ((["--new", "5"], "was measured with another workload"), ([], "is not valid JSON")):
        if not args:
            out.write_text("{not json")
            before = out.read_text()
        r = bench("--dry", *SMALL, *args, "--resume", "--out", str(out))
        lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip() and not l.startswith("dry run")]
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --resume") and needle in lines[0], lines
        assert out.read_text() == before


def test_a_failed_shared_prefill_fails_its_runs_and_the_bench_goes_on(tmp_path, monkeypatch, capsys):
    """The shared dense prefill of a stage failing (e.g. out of memory at the large batch): each of
    that stage's runs is recorded as failed, saying why; the other stages run and every target is
    written."""
    import importlib.util

    from alisa.runtime import engine, throughput  # noqa: F401 - imported before the patch: it binds dense_prefill at import

    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    real = engine.dense_prefill

    def prefill(model, ids, *a, **kw):
        if ids.shape[0] == 3:
            raise torch.OutOfMemoryError("out of memory (test)")
        return real(model, ids, *a, **kw)

    monkeypatch.setattr(engine, "dense_prefill", prefill)
    monkeypatch.setenv("ALISA_COMPILE_BACKEND", "eager")
    out = tmp_path / "p.json"
    assert bench_gpu.main(["--dry", *SMALL, "--systems", "stock,engine", "--out", str(out)]) == 0
    d = json.loads(out.read_text())
    assert "partial" not in d and len(d["targets"]) == 9
    for key, rec in d["records"].items():
        if key.startswith("b3"):
            assert rec["status"] == "failed" and rec["error"] == "the shared dense prefill at batch 3: OutOfMemoryError: out of memory (test)", rec
        else:
            assert rec["status"] == "ok", (key, rec)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error; with a CUDA device present bench_gpu runs the real benchmark instead")
def test_without_cuda_and_without_dry_it_is_one_line_and_writes_nothing(tmp_path):
    r = bench("--out", str(tmp_path / "x" / "gpu.json"), timeout=60)
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stdout + r.stderr
    assert lines[0].startswith("error: no CUDA device is present") and "--dry" in lines[0]
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["--budget-gib", "-1"], "--budget-gib=-1.0 is invalid: allowed is a number of GiB > 0"),
    (["--new", "1"], "--new=1 is invalid: allowed is an integer >= 2"),
    (["--systems", "stock,warp"], "--systems entry 'warp' is invalid: allowed are stock, hf_static, hf_offloaded, flexgen, engine"),
    (["--hidden", "65"], "--hidden=65 is invalid: allowed is a multiple of 4"),
    (["--deadline", "0"], "--deadline=0.0 is invalid: allowed is a number of seconds > 0"),
    (["--out", "/proc/alisa-bench.json"], "--out='/proc/alisa-bench.json' cannot be written"),
])
def test_bad_input_is_one_line(tmp_path, args, needle):
    r = bench("--dry", "--out", str(tmp_path / "dry.json"), *args, timeout=60)  # a later --out wins
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stdout + r.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("script,args,msg", [
    ("bench_static", ["--new", "1"], "--new=1 is invalid: allowed is an integer >= 2"),
    ("bench_static", ["--rounds", "0"], "--rounds=0 is invalid: allowed is an integer >= 1"),
    ("bench_static", ["--tag", "../x"], "--tag='../x' is invalid"),
    ("bench_static", ["--prompt", "8190", "--new", "3"], "--prompt + --new=8190 + 3 is invalid: allowed is at most 8192 tokens"),
    ("bench_static", ["--compiled", "ALISA_COMPILE_BACKEND=tvm"], "ALISA_COMPILE_BACKEND='tvm' is invalid"),
    ("bench_runtime", ["--batch", "0"], "--batch=0 is invalid: allowed is an integer >= 1"),
    ("bench_runtime", ["--device", "tpu"], "--device='tpu' is invalid: allowed are cpu, cuda"),
    ("bench_runtime", ["--tag", "a/b"], "--tag='a/b' is invalid"),
    ("bench_runtime", ["--prompt", "9000"], "--prompt + --new=9000 + 32 is invalid"),
    ("bench_runtime", ["--bogus"], "unrecognized arguments: --bogus"),
    ("bench_core", ["--device", "tpu"], "--device='tpu' is invalid: allowed are cpu, cuda"),
    ("bench_gpu", ["--dry", "--compiled", "ALISA_COMPILE_BACKEND=tvm"], "ALISA_COMPILE_BACKEND='tvm' is invalid"),
])
def test_bench_scripts_bad_input_is_one_line(script, args, msg):
    """The bench scripts check their arguments (and the compile backend) before running anything: one line, exit 2."""
    env = {**OFFLINE, **dict(a.split("=", 1) for a in args if a.startswith("ALISA_"))}
    args = [a for a in args if not a.startswith("ALISA_")]
    r = subprocess.run([sys.executable, str(REPO / "scripts" / f"{script}.py"), *args], cwd=REPO, capture_output=True,
                       text=True, timeout=120, env=env)
    lines = [l for l in (r.stdout + r.stderr).splitlines() if l.strip()]
    assert r.returncode == 2 and len(lines) == 1 and msg in lines[0], r.stdout + r.stderr
