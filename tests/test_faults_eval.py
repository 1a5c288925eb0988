"""Issue 11: every bad input or fault of the command lines gets one clear line.

Bad input: exit 2, exactly one stderr line ``error: ...`` naming the value and what is allowed,
nothing written. A run that failed: one line, exit 1. Ctrl-C: one line, exit 130. No traceback.
Most cases run the real command in a subprocess; those that stop before the model loads take
about a second (``+key``, groups, malformed overrides) or ten (values checked after composition).
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alisa.eval import FAIL_ENV

REPO = Path(__file__).resolve().parent.parent
# a 2-layer random SmolLM2 shape: loads in a second, runs a throughput point in about one
TINY_TPUT = ["tasks=[throughput]", "throughput.batches=[1]", "throughput.prompt=8", "throughput.new_tokens=2",
             "throughput.systems=[engine]", "logger=none", "grid.policies=[dense]", "model.name=random:smollm2-135m",
             "model.hf_config.num_hidden_layers=2"]
_PROGRESS = re.compile(r"^[\w.-]+:\s+\d+%\|")  # alisa's own progress bar (tqdm), the only other stderr output


def run(*args, cwd, module="alisa.eval", env=None, timeout=300, argv0=None):
    base = {k: v for k, v in os.environ.items() if k != FAIL_ENV}
    env = {**base, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    cmd = [sys.executable, *(argv0 or ["-m", module]), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def stderr_lines(r) -> list[str]:
    return [l for l in r.stderr.replace("\r", "\n").splitlines() if l.strip() and not _PROGRESS.match(l)]


def assert_one_line(r, code: int, *needles: str, results: Path | None = None, start: str = "error:") -> str:
    """Exit ``code``, exactly one stderr line (starting with ``start``) holding every needle, no traceback,
    and nothing under ``results``."""
    lines = stderr_lines(r)
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(start), r.stderr[-3000:]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in r.stderr + r.stdout
    if results is not None:
        assert not results.exists() or not any(results.rglob("*")), sorted(results.rglob("*"))
    return lines[0]


def bad_eval(tmp_path, *args, env=None):
    results = tmp_path / "results"
    return run(*args, f"results_dir={results}", cwd=tmp_path, env=env), results


# --- B1: keys added with + that the schema lacks ---

@pytest.mark.parametrize("args,needles", [
    (["+limt=3"], ["'+limt=3'", "Key 'limt' not in 'EvalConf'", "allowed keys: experiment_name, model, grid"]),
    (["+grid.sparsity=0.5"], ["'+grid.sparsity=0.5'", "Key 'sparsity' not in 'GridConf'",
                              "allowed keys: policies, sparsities, budgets, prefill"]),
    (["+model.dtyp=float16"], ["'+model.dtyp=float16'", "Key 'dtyp' not in 'ModelConf'",
                               "allowed keys: name, dtype, device, hf_config"]),
    (["--config-name", "config", "+limt=3"], ["'+limt=3'", "allowed keys: experiment_name"]),
    (["--config-name", "config", "limt=3"], ["'limt'", "allowed keys: experiment_name"]),
    (["-m", "+limt=3", "grid.policies=dense,swa"], ["'+limt=3'", "allowed keys: experiment_name"]),
    (["--config-name", "nope"], ["'nope'", "allowed are config"]),
], ids=["plus_top_key", "plus_grid_key", "plus_model_key", "config_name_plus", "config_name_plain", "multirun_plus",
        "unknown_config_name"])
def test_added_key_not_in_schema_is_rejected(tmp_path, args, needles):
    r, results = bad_eval(tmp_path, *args)
    assert_one_line(r, 2, *needles, results=results)


def test_plus_keys_below_mappings_are_still_allowed():
    from alisa.eval import precheck

    precheck(["+task_limits.copa_local=5", "+model.hf_config.sliding_window=64", "+experiment=quickstart"])


# --- B2: model.hf_config ---

@pytest.mark.parametrize("args,needles", [
    (["model.hf_config.num_hidden_layers=4"], ["model.hf_config.num_hidden_layers=4", "model.name='smollm2-135m'",
                                              "allowed only with a random-weight shape (random:llama-7b"]),
    (["model.name=random:smollm2-135m", "model.hf_config.num_hidden_layers=-1"],
     ["model.hf_config.num_hidden_layers=-1", "allowed is an integer >= 1"]),
    (["model.name=random:smollm2-135m", "model.hf_config.num_attention_heads=4"],
     ["num_key_value_heads=3", "allowed is a divisor of num_attention_heads=4"]),
    (["model.name=random:llama-7b", "model.hf_config.num_hidden_layers=2"],
     ["model.name='random:llama-7b'", "smollm2-135m shape", "allowed is model=llama-7b"]),
    (["model=opt-6.7b", "model.hf_config.model_type=llama"], ["model_type='llama'", "allowed is 'opt'"]),
], ids=["real_model", "negative_layers", "heads_not_divisible", "other_groups_shape", "other_family"])
def test_bad_hf_config_is_rejected(tmp_path, args, needles):
    r, results = bad_eval(tmp_path, *args, "tasks=[throughput]")
    assert_one_line(r, 2, *needles, results=results)


def test_hf_config_override_is_honoured_and_recorded(tmp_path):
    from test_eval import compose_cfg

    from alisa.config import shape_configs, validate
    from alisa.eval import get_model, point_identity

    cfg = compose_cfg([*TINY_TPUT, f"results_dir={tmp_path}"])
    [point] = validate(cfg)
    model, tok = get_model(cfg.model)
    assert tok is None and model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    ident = point_identity(cfg, point, "tput-engine-b1")
    assert ident["model"]["hf_config"]["num_hidden_layers"] == 2
    # the model group's default shape under another random: name is replaced by the named shape (what runs)
    cfg = compose_cfg(["model.name=random:llama-7b", "tasks=[throughput]"])
    validate(cfg)
    assert dict(cfg.model.hf_config) == shape_configs()["llama-7b"]


# --- B3: batch size and the model's context ---

@pytest.mark.parametrize("args,needles", [
    (["batch_size=0"], ["batch_size=0", "allowed is an integer >= 1"]),
    (["+experiment=throughput_quick", "throughput.prompt=8000", "throughput.new_tokens=500"],
     ["8000 + 500", "allowed are at most 8192 tokens", "'smollm2-135m'"]),
    (["+experiment=throughput_quick", "throughput.new_tokens=1000000000000"],
     ["1000000000000", "allowed are at most 8192 tokens"]),
    (["max_length=100000"], ["max_length=100000", "allowed is at most 8192 tokens"]),
], ids=["batch_size_zero", "prompt_plus_new_beyond_context", "new_tokens_unallocatable", "max_length_beyond_context"])
def test_batch_size_and_context_limits(tmp_path, args, needles):
    r, results = bad_eval(tmp_path, *args, "logger=none")
    assert_one_line(r, 2, *needles, results=results)


# --- B5: tracebacks that reached users ---

@pytest.mark.parametrize("content,needles", [
    ("garbage\n", ["cannot be read (not JSON", "allowed is a JSON file written by `python -m alisa.profile`"]),
    ('{"device": "cpu"}', ["is not a profile (missing step_base_s", "allowed is a JSON file"]),
    ('[1, 2]', ["is not a profile (a JSON list)", "allowed is a JSON file"]),
], ids=["not_json", "fields_missing", "wrong_shape"])
def test_garbage_profile(tmp_path, content, needles):
    prof = tmp_path / "profile.json"
    prof.write_text(content)
    r, results = bad_eval(tmp_path, *TINY_TPUT, f"throughput.profile={prof}")
    assert_one_line(r, 2, f"throughput.profile='{prof}'", *needles, results=results)


@pytest.mark.parametrize("key,length", [("run_id", 300), ("experiment_name", 150)])
def test_long_folder_names(tmp_path, key, length):
    r, results = bad_eval(tmp_path, f"{key}={'a' * length}")
    assert_one_line(r, 2, f"{key}='{'a' * length}'", "allowed are letters, digits", "at most 100 characters",
                    results=results)


@pytest.mark.parametrize("args,needles", [
    (["--max-new-tokens", "-1"], ["--max-new-tokens=-1", "allowed is an integer >= 1"]),
    (["--max-new-tokens", "x"], ["--max-new-tokens: invalid int value: 'x'"]),
    (["--max-new-tokens", "100000"], ["--max-new-tokens=100000", "allowed is less than 8192"]),
    (["--prompt", ""], ["--prompt=''", "allowed is a text with at least one non-space character"]),
    (["--policy", "swa9"], ["'swa9'", "allowed are dense, h2o, local, quest, sinks, snapkv, strided, swa, tova"]),
], ids=["negative_new_tokens", "not_a_number", "beyond_context", "empty_prompt", "unknown_policy"])
def test_quickstart_bad_arguments(tmp_path, args, needles):
    r = run(*args, cwd=tmp_path, module="alisa.quickstart")
    assert_one_line(r, 2, *needles)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args,needles", [
    (["--out", "/proc/alisa-profile.json"], ["--out='/proc/alisa-profile.json' cannot be written",
                                             "allowed is a writable file path"]),
    (["--device", "tpu"], ["--device='tpu' is invalid: allowed are cpu, cuda"]),
    (["--bogus"], ["unrecognized arguments: --bogus"]),
], ids=["unwritable_out", "bad_device", "unknown_flag"])
def test_profile_bad_arguments(tmp_path, args, needles):
    r = run(*args, cwd=tmp_path, module="alisa.profile")
    assert_one_line(r, 2, *needles)
    assert not any(tmp_path.iterdir())


def _run_with_full_disk(tmp_path):
    """The real CLI, with the record write failing as on a full disk (ENOSPC)."""
    driver = ("import errno, sys, alisa.eval as E\n"
              "def full(*a, **k):\n"
              "    raise OSError(errno.ENOSPC, 'No space left on device', str(a[1]))\n"
              "E._write_record = full\n"
              "sys.argv = ['alisa.eval', *sys.argv[1:]]\n"
              "E.main()\n")
    results = tmp_path / "results"
    return run(*TINY_TPUT, f"results_dir={results}", cwd=tmp_path, argv0=["-c", driver]), results


def test_full_disk_is_one_line_and_leaves_no_empty_folder(tmp_path):
    r, results = _run_with_full_disk(tmp_path)
    assert_one_line(r, 1, "No space left on device [ENOSPC]", "points/dense-s0__tput-engine-b1__",
                    "nothing was written", "allowed is a results_dir= with free space")
    assert not results.exists()  # the folders this run created are gone: no record was written


def test_ctrl_c_is_one_line_exit_130(tmp_path):
    results = tmp_path / "results"
    args = [*TINY_TPUT, "throughput.new_tokens=4000", f"results_dir={results}"]  # a point that runs for a while
    env = {**{k: v for k, v in os.environ.items() if k != FAIL_ENV}, "HF_HUB_OFFLINE": "1"}
    # as a terminal's Ctrl-C finds it: a test run started in the background by a non-interactive shell
    # inherits SIGINT ignored, which Python (rightly) keeps ignoring
    proc = subprocess.Popen([sys.executable, "-m", "alisa.eval", *args], cwd=tmp_path, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 240
        while not (results / "adhoc" / "main" / "points").is_dir():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.05)
        time.sleep(1.0)  # inside the point
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    r = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    assert_one_line(r, 130, start="interrupted; rerun the same command to resume")
    assert not results.exists()  # interrupted before its first record: nothing left behind


def test_wandb_online_without_login_fails_before_the_first_point(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": "", "NETRC": str(home / "none"), "WANDB_CONFIG_DIR": str(home / "wb")}
    for args in (["logger=wandb_online"], ["-m", "logger=wandb_online", "grid.policies=dense,swa"]):
        r, results = bad_eval(tmp_path, *args, env=env)
        assert_one_line(r, 2, "logger.wandb='online' needs a W&B login",
                        "allowed here are logger=wandb_offline (sync later) or logger=none", results=results)


def test_wandb_online_failure_mid_sweep_falls_back_to_offline(tmp_path, monkeypatch, caplog):
    import wandb
    from omegaconf import OmegaConf

    from alisa.wandb_log import WandbLogger, read_offline_run

    real_init = wandb.init

    def init(*args, **kwargs):
        if kwargs.get("mode") == "online":
            raise wandb.errors.CommError("network is unreachable")
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", init)
    logger = WandbLogger(OmegaConf.create({"wandb": "online", "project": "alisa", "entity": None}), tmp_path, "unit")
    rec = {"point_id": "dense-s0", "task": "t", "model": {"name": "m"}, "seed": 1, "prefill": "sparse",
           "git_commit": "x", "metrics": {"acc": {"value": 0.5, "stderr": 0.1}}, "kept_fraction": {"overall": 1.0}}
    with caplog.at_level("WARNING", logger="alisa.wandb"):
        logger.log_point({"policy": "dense", "sparsity": 0.0, "budget": None}, [rec])
    assert logger.mode == "offline"
    assert [r.message for r in caplog.records if "W&B online logging failed" in r.message]
    [run_file] = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    assert read_offline_run(run_file)["summary"]["t/acc"] == 0.5
    assert not _children("wandb-core")  # the service is stopped between points (nothing left for a SIGKILL to orphan)


def _children(name: str) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            comm = stat.read_text().split("(", 1)[1].rsplit(")", 1)[0]
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and comm.startswith(name[:15]):
            out.append(int(stat.parent.name))
    return out


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the one-line refusal of model.device=cuda where no GPU exists; a GPU machine runs the job instead")
def test_cuda_job_in_a_multirun_fails_before_any_job(tmp_path):
    r, results = bad_eval(tmp_path, "-m", "model.device=cuda", "grid.policies=dense,local")
    assert_one_line(r, 2, "model.device='cuda'", "no CUDA GPU is available here", "use model.device=cpu",
                    results=results)


def test_failed_points_in_a_multirun_one_line_per_job(tmp_path):
    results = tmp_path / "results"
    r = run("-m", *[a for a in TINY_TPUT if not a.startswith("grid.policies")], "grid.policies=dense,local",
            f"results_dir={results}", cwd=tmp_path, env={FAIL_ENV: "local"})
    line = assert_one_line(r, 1, "multirun job 1:", "1 of 1 (point, task) runs failed: local-s0.8/tput-engine-b1",
                           "rerun the same command to retry them")
    assert "Error executing job" not in r.stderr and line


def test_lm_eval_bad_model_args_is_one_line(tmp_path):
    r = run("--model", "alisa", "--model_args", "pretrained=smollm2-135m,policy=swa9,sparsity=0.8", "--tasks",
            "copa_local", "--include_path", str(REPO / "tasks"), "--limit", "1", "--device", "cpu", cwd=tmp_path,
            module="lm_eval", timeout=600)
    assert r.returncode == 2, r.stderr[-3000:]
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert errors == ["error: --model_args: unknown policy 'swa9': allowed are dense, h2o, local, quest, sinks, snapkv, strided, swa, tova"]
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args,needle", [
    (dict(pretrained="smollm2-135m", policy="swa", sparsty=0.8), "unknown model_args key 'sparsty': allowed are pretrained"),
    (dict(pretrained="smollm2-135m", batch_size=0), "batch_size=0 is invalid: allowed is an integer >= 1 or auto"),
    (dict(pretrained="smollm2-135m", prefill="x"), "prefill='x' is invalid: allowed are sparse, dense"),
    (dict(pretrained="smollm2-135m", device="tpu"), "device='tpu' is invalid: allowed are cpu, cuda, cuda:N"),
])
def test_lm_eval_model_args_checked_before_loading(args, needle):
    from alisa.lm_eval_model import AlisaLM

    with pytest.raises(ValueError, match=re.escape(needle)):
        AlisaLM.create_from_arg_obj(args, {"batch_size": 1, "device": "cpu"})


# --- B8: options listed, values as written ---

@pytest.mark.parametrize("args,needles", [
    (["model=bogus"], ["unknown model 'bogus': allowed are llama-7b, opt-6.7b, smollm2-135m"]),
    (["logger=bogus"], ["unknown logger 'bogus': allowed are none, wandb_offline, wandb_online"]),
    (["hydra/launcher=bogus"], ["unknown hydra/launcher 'bogus': allowed are basic, joblib"]),
    (["experiment_name=café"], ["'experiment_name=café'", "non-ASCII characters need quotes"]),
    (["grid.policies=[swa]", "grid.sparsities=[0.99999999999999999]"],
     ["sparsity=0.99999999999999999 is invalid (1.0 as a float): allowed is a number in [0, 1)"]),
    (["-m", "grid.policies=swa", "grid.sparsities=0.5,0.99999999999999999"], ["sparsity=0.99999999999999999"]),
], ids=["model_group", "logger_group", "launcher_group", "non_ascii", "sparsity_as_written", "sparsity_in_sweep"])
def test_options_listed_and_values_as_written(tmp_path, args, needles):
    r, results = bad_eval(tmp_path, *args)
    line = assert_one_line(r, 2, *needles, results=results)
    assert "write lists" not in line


# --- C: quiet by default, chatter in the run's log file ---

def test_console_is_quiet_and_the_log_file_has_the_chatter(tmp_path):
    from test_eval import make_task

    tasks = make_task(tmp_path / "tasks")
    results = tmp_path / "results"
    args = [f"tasks_dir={tasks}", "tasks=[tiny_mc]", "grid.policies=[dense]", "logger=none", f"results_dir={results}"]
    r = run(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    console = r.stdout + r.stderr
    assert "WARNING" not in console and "`pretrained` model kwarg" not in console, console
    assert "Running loglikelihood requests" not in console and "fatal:" not in console
    assert "dense" in r.stdout and "results:" in r.stdout
    assert stderr_lines(r) == []  # only alisa's progress bar
    [log] = (results / "adhoc" / "main" / "logs").glob("*.log")
    assert "`pretrained` model kwarg is not of type `str`" in log.read_text()
    assert "run dense-s0 tiny_mc" in log.read_text()
    r = run(*args, "run_id=v", "-v", cwd=tmp_path)  # -v: third-party lines on the console too
    assert r.returncode == 0, r.stderr[-3000:]
    assert "`pretrained` model kwarg is not of type `str`" in r.stdout + r.stderr


def test_an_existing_folder_is_never_removed_after_a_failure(tmp_path):
    """Only folders the failed run created itself go: a resumed folder (with records) stays as it was."""
    run_dir = tmp_path / "results" / "adhoc" / "main"
    (run_dir / "points").mkdir(parents=True)
    keep = run_dir / "points" / "other__t__000000000000.json"
    keep.write_text(json.dumps({"status": "ok"}))
    r, _ = _run_with_full_disk(tmp_path)
    assert_one_line(r, 1, "No space left on device [ENOSPC]", f"finished records are kept in '{run_dir}'")
    assert keep.exists() and (run_dir / "config.yaml").exists()
