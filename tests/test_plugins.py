"""Policy plug-ins (issue 12): a policy from another package, registered through the entry point group
``alisa.policies``, works everywhere a built-in does; a broken plug-in is one line and breaks nothing else;
``python -m alisa.check_policy`` passes the built-ins and names the first step where a broken policy fails."""

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import alisa
from alisa import policies as P
from alisa.check_policy import main as check_main
from alisa.testing import decode
from conftest import padded_batch, tiny_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "alisa-policy-example"

# Deliberately broken policies, and broken entry points, in a second "installed" package.
BROKEN = '''
import torch
from alisa.policies import Local, Sinks, causal


class Peeks(Local):
    """Also attends the next token: not causal."""
    name = "peeks"

    def select(self, pos, t, state):
        return super().select(pos, t, state) | (pos == t + 1)


class ForgetsSinks(Sinks):
    """retain() lets the cache drop the sink tokens that select() keeps picking."""
    name = "forgets_sinks"

    def retain(self, pos, t_next, state):
        t = t_next[:, None]
        return (pos >= 0) & (pos > t - self._recent(t))


class SizeDependent(Local):
    """A window of a quarter of the slots it is shown: the simulation shows all, the decode cache only those held."""
    name = "size_dependent"

    def select(self, pos, t, state):
        return causal(pos, t) & (pos > t - max(1, pos.shape[-1] // 4))

    def retain(self, pos, t_next, state):
        return pos >= 0


class NotAPolicy:
    name = "not_a_policy"
'''
BROKEN_ENTRY_POINTS = {
    "peeks": "alisa_broken_plugins:Peeks",
    "forgets_sinks": "alisa_broken_plugins:ForgetsSinks",
    "size_dependent": "alisa_broken_plugins:SizeDependent",
    "not_a_policy": "alisa_broken_plugins:NotAPolicy",
    "missing_module": "alisa_no_such_module:Policy",
    "misnamed": "alisa_broken_plugins:Peeks",
}


def fake_install(site: Path, name: str, version: str, modules: dict[str, str], entry_points: dict[str, str]) -> None:
    """What pip leaves in site-packages: the modules and a ``dist-info`` with METADATA and entry_points.txt."""
    dist = site / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text("[alisa.policies]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for module, text in modules.items():
        (site / f"{module}.py").write_text(text)


def forget_plugins(site: Path) -> None:
    while str(site) in sys.path:
        sys.path.remove(str(site))
    for m in ("alisa_policy_example", "alisa_broken_plugins"):
        sys.modules.pop(m, None)
    P.refresh_plugins()


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The example package (entry points read from its pyproject.toml) and the broken one, on sys.path."""
    site = tmp_path_factory.mktemp("site-packages")
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    fake_install(site, project["name"], project["version"],
                 {"alisa_policy_example": (EXAMPLE / "alisa_policy_example.py").read_text()},
                 project["entry-points"]["alisa.policies"])
    fake_install(site, "alisa-broken-plugins", "0.0.1", {"alisa_broken_plugins": BROKEN}, BROKEN_ENTRY_POINTS)
    sys.path.insert(0, str(site))
    P.refresh_plugins()
    yield site
    forget_plugins(site)


def test_plugin_found_lazily_and_built_like_a_builtin(site):
    assert "alisa_policy_example" not in sys.modules
    assert {"h2o_decay", "peeks", "not_a_policy", *alisa.POLICIES} <= set(P.available())
    assert "alisa_policy_example" not in sys.modules  # listing names imports nothing
    p = alisa.make_policy("h2o_decay", sparsity=0.8, decay=0.5)
    assert type(p).__module__ == "alisa_policy_example" and p.stateful
    assert p.key == {"policy": "h2o_decay", "sparsity": 0.8, "budget": None, "decay": 0.5}
    assert alisa.make_policy("h2o_decay", budget=8).key == {"policy": "h2o_decay", "sparsity": None, "budget": 8}
    with pytest.raises(ValueError, match=r"^policy 'h2o_decay': decay='x' is invalid: allowed is a number \(default 0.9\)$"):
        alisa.make_policy("h2o_decay", sparsity=0.8, decay="x")
    with pytest.raises(ValueError, match=r"^policy 'h2o_decay' has no hyperparameter 'decya': allowed are decay$"):
        alisa.make_policy("h2o_decay", sparsity=0.8, decya=0.5)
    with pytest.raises(ValueError, match=r"^decay=1.5 is invalid: allowed is a number in \(0, 1\]$"):
        alisa.make_policy("h2o_decay", sparsity=0.8, decay=1.5)


@torch.no_grad()
def test_plugin_accuracy_path_equals_decode_path_with_real_eviction(site):
    model = tiny_model("llama")
    ids, mask = padded_batch(40)
    real = mask.bool()
    with alisa.apply(model, "h2o_decay", sparsity=0.8, decay=0.7) as run:
        sim = model(ids, attention_mask=mask, use_cache=False).logits
        for split in (1, 13):
            dec, cache = decode(model, ids, mask, split)
            assert (sim - dec)[real].abs().max().item() < 1e-4
    assert run.kept_fraction()["overall"] < 0.4
    assert max(cache.tokens_held()) < 10  # really evicted: 40 tokens seen


@torch.no_grad()
def test_plugin_in_the_runtime_and_its_plan_search(site):
    from alisa.runtime.costmodel import Profile, Workload, predict, search
    from alisa.runtime.engine import Engine
    from alisa.runtime.tiered import Plan

    model = tiny_model("opt")
    ids, mask = padded_batch(24)
    policy = alisa.make_policy("h2o_decay", sparsity=0.5, decay=0.8)
    with alisa.apply(model, policy):
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0,
                             eos_token_id=None)[:, 24:]
    for plan in (Plan(), Plan(alpha=0.7, beta=0.5, p1=1, p2=3)):
        g = Engine(model, "h2o_decay", prefill="sparse", plan=plan, sparsity=0.5, decay=0.8).generate(ids, mask, 6)
        assert torch.equal(g.tokens, ref), plan
    assert g.traffic.tokens_offloaded > 0 and g.traffic.tokens_recomputed > 0
    prof = Profile(device="cpu", hardware={}, model="x", dtype="float32", step_base_s=0.02, step_per_seq_s=0.001,
                   attn_read_bw=20e9, copy_bw=10e9, recompute_flops=50e12, device_capacity=16 << 30, host_capacity=128 << 30)
    wl = Workload(batch=32, prompt=128, new_tokens=512)
    need = predict(prof, model.config, "float32", policy, wl, Plan()).peak_device_bytes
    tight = search(prof, model.config, "float32", policy, wl, device_budget=0.5 * need, host_budget=1e12)
    assert tight.feasible and tight.plan.alpha > 0 and tight.peak_device_bytes <= 0.5 * need


def test_plugin_one_point_hydra_run(site, tmp_path):
    from test_eval import compose_cfg, make_task

    from alisa.eval import run_experiment
    from alisa.wandb_log import read_offline_run

    tasks = make_task(tmp_path / "tasks")
    cfg = compose_cfg([f"tasks_dir={tasks}", "tasks=[tiny_mc]", "grid.policies=[h2o_decay]", "grid.sparsities=[0.5]",
                       "+policy_params.h2o_decay.decay=0.5", "limit=3", f"results_dir={tmp_path / 'results'}",
                       "experiment_name=plug", "run_id=r"])
    run = run_experiment(cfg)
    [path] = (run / "points").glob("h2o_decay-s0.5__tiny_mc__*.json")
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok" and rec["policy"] == "h2o_decay" and rec["params"] == {"decay": 0.5}
    assert rec["identity"]["policy_params"] == {"h2o_decay": {"decay": 0.5}} and rec["n_docs"] == 3
    assert 0 < rec["kept_fraction"]["overall"] < 1
    assert "h2o_decay@0.5" in (run / "summary.txt").read_text()
    [wb] = [r for f in (run / "wandb").glob("offline-run-*/run-*.wandb") if (r := read_offline_run(f))["name"] != "summary"]
    assert wb["config"]["policy"] == "h2o_decay" and wb["config"]["params"] == {"decay": 0.5}
    # A default value is no parameter: the built-ins' records and hashes are what they were.
    from alisa.config import grid_points, validate

    assert grid_points(cfg.grid, {"h2o_decay": {"decay": 0.9}}) == [{"policy": "h2o_decay", "sparsity": 0.5, "budget": None}]
    ok = compose_cfg(["grid.policies=[sinks]", "policy_params.sinks.n_sinks=2", f"tasks_dir={tasks}", "tasks=[tiny_mc]"])
    assert validate(ok, machine=False)[0]["params"] == {"n_sinks": 2}


@pytest.mark.parametrize("override,message", [
    ("+policy_params.h2o_decay.decay=abc", "policy_params.h2o_decay.decay='abc' is invalid: allowed is a number (default 0.9)"),
    ("+policy_params.h2o_decay.decay=2", "policy_params.h2o_decay: decay=2.0 is invalid: allowed is a number in (0, 1]"),
    ("+policy_params.h2o_decay.window=2", "policy_params.h2o_decay.window is not a hyperparameter of policy 'h2o_decay': "
     "allowed are decay"),
    ("policy_params.sinks.n_sinks=1.5", "policy_params.sinks.n_sinks=1.5 is invalid: allowed is an integer (default 4)"),
    ("+policy_params.nope.x=1", "policy_params.nope: unknown policy 'nope': allowed are "),
])
def test_bad_policy_params_are_one_line_config_errors(site, override, message):
    from test_eval import compose_cfg

    from alisa.config import ConfigError, validate

    cfg = compose_cfg(["grid.policies=[h2o_decay]", override, "tasks=[x]"])
    with pytest.raises(ConfigError) as e:
        validate(cfg, machine=False)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_plugin_through_lm_eval_model_alisa(site, tmp_path):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from test_eval import make_task

    from alisa.lm_eval_model import AlisaLM

    tasks = make_task(tmp_path / "tasks")
    lm = AlisaLM.create_from_arg_string("pretrained=smollm2-135m,policy=h2o_decay,sparsity=0.5,decay=0.5",
                                        {"batch_size": 1, "device": "cpu"})  # what `lm_eval --model alisa` calls
    try:
        assert lm.kv_policy.key == {"policy": "h2o_decay", "sparsity": 0.5, "budget": None, "decay": 0.5}
        out = simple_evaluate(model=lm, tasks=["tiny_mc"], limit=3, task_manager=TaskManager(include_path=str(tasks)),
                              bootstrap_iters=0)
    finally:
        lm.close()
    assert out["results"]["tiny_mc"]["acc,none"] in (0, 1 / 3, 2 / 3, 1)
    assert 0 < lm.kept_fraction()["overall"] < 1
    with pytest.raises(ValueError, match=r"^policy 'h2o_decay': decay='x' is invalid"):
        AlisaLM.create_from_arg_obj({"policy": "h2o_decay", "sparsity": 0.5, "decay": "x"}, {"device": "cpu"})
    with pytest.raises(ValueError, match=r"^unknown model_args key 'decya': allowed are pretrained, .*, decay, backend"):
        AlisaLM.create_from_arg_obj({"policy": "h2o_decay", "sparsity": 0.5, "decya": 0.5}, {"device": "cpu"})


@pytest.mark.parametrize("name,message", [
    ("missing_module", "policy plug-in 'missing_module' (entry point alisa.policies: missing_module = "
     "alisa_no_such_module:Policy from alisa-broken-plugins 0.0.1) cannot be imported: ModuleNotFoundError: "
     "No module named 'alisa_no_such_module'"),
    ("not_a_policy", "policy plug-in 'not_a_policy' (entry point alisa.policies: not_a_policy = "
     "alisa_broken_plugins:NotAPolicy from alisa-broken-plugins 0.0.1) is broken: it is the class "
     "alisa_broken_plugins:NotAPolicy, not a subclass of alisa.policies.Policy"),
    ("misnamed", "is broken: its class attribute name is 'peeks', but the entry point is named 'misnamed': "
     "allowed is the same name"),
])
def test_broken_plugin_is_one_line_and_breaks_nothing_else(site, name, message):
    from test_eval import compose_cfg

    from alisa.config import ConfigError, validate
    from alisa.lm_eval_model import AlisaLM

    with pytest.raises(ValueError) as e:
        alisa.make_policy(name, sparsity=0.5)
    assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="^" + name.join(["policy plug-in '", "'"])):
        validate(compose_cfg([f"grid.policies=[dense,{name}]", "tasks=[x]"]), machine=False)
    with pytest.raises(ValueError, match=re.escape(message.split(":")[0])):
        AlisaLM.create_from_arg_obj({"policy": name, "sparsity": 0.5}, {"device": "cpu"})
    # the others, built-in or plug-in, are unaffected
    assert alisa.make_policy("h2o_decay", sparsity=0.5).name == "h2o_decay"
    assert alisa.make_policy("swa", sparsity=0.5).name == "swa"
    assert name in P.available()


def test_register_decorator_checks_the_contract():
    class NoState(P.Policy):
        name, stateful = "no_state", True

        def select(self, pos, t, state):
            return P.causal(pos, t)

    class NoSelect(P.Policy):
        name = "no_select"

    class NeedsValue(P.Local):
        name = "needs_value"

        def __init__(self, sparsity=None, budget=None, width=None, *, depth):
            super().__init__(sparsity=sparsity, budget=budget)

    class Reserved(P.Local):
        name = "reserved"

        def __init__(self, sparsity=None, budget=None, device="cpu"):
            super().__init__(sparsity=sparsity, budget=budget)

    class BadName(P.Local):
        name = "bad name"

    class Taken(P.Local):
        name = "swa"

    for cls, why in [(NoState, "it is stateful but does not implement new_state()"),
                     (NoSelect, "it does not implement select"),
                     (NeedsValue, "its hyperparameter 'depth' has no default"),
                     (Reserved, "its hyperparameter 'device' has a reserved name"),
                     (BadName, "its name 'bad name' is invalid"),
                     (Taken, "the name is taken by alisa.policies:SWA")]:
        with pytest.raises(ValueError, match=why):
            P.register(cls)
        assert P.REGISTRY.get(cls.name) is not cls


def test_check_policy_passes_builtins(capsys):
    assert check_main(["sinks", "--sparsity", "0.7", "--param", "n_sinks=2", "--families", "llama"]) == 0
    assert check_main(["h2o", "--budget", "9", "--families", "opt"]) == 0
    out = capsys.readouterr().out
    assert "sinks (alisa.policies:Sinks), sparsity=0.7, n_sinks=2" in out and out.count("all checks pass") == 2


# snapkv's default prompt is "the first chunk a cache sees", which a simulation (one chunk) and a decode run
# (a prompt, then tokens) see differently; with a prompt length in tokens it is exact on every path.
SETTINGS = {"snapkv": ["--param", "prompt=13"]}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(alisa.POLICIES))
def test_check_policy_passes_every_builtin_on_every_family(name, capsys):
    assert check_main([name, *SETTINGS.get(name, [])]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("name,line", [
    ("peeks", "FAIL peeks: gpt_neox, accuracy path, layer 0, sequence 0, position 0: select picked slots at positions "
     "[1] for the query at position 0: allowed are keys at positions 0..0 (causal; -1 is padding)"),
    # n = 2 at t_next = 1: K = max(round(0.3 * 2), 5) = 5, one recent key (position 1), so retain drops the sink at 0
    ("forgets_sinks", "FAIL forgets_sinks: gpt_neox, decode path (prompt of 1 columns), layer 0, sequence 0, position 1 "
     "(decode step 0): the accuracy path selects key 0, which retain(pos, t_next=1) let the decode path drop: retain "
     "must keep every key a query at t_next or later may select"),
    ("size_dependent", "FAIL size_dependent: gpt_neox, decode path (prompt of 1 columns), layer 0, sequence 0, position 1 "
     "(decode step 0): the decode path attends keys [1], the accuracy path [0, 1] (only in the accuracy path: [0]; "
     "only in the decode path: [])"),
    ("h2o_decay", None),
])
def test_check_policy_names_the_first_failing_step(site, capsys, name, line):
    code = check_main([name, "--sparsity", "0.7", "--families", "gpt_neox"])
    err = capsys.readouterr().err.strip()
    if line is None:  # the example plug-in keeps the contract
        assert code == 0 and not err
    else:
        assert code == 1 and err == line


@pytest.mark.parametrize("args,code,line", [
    (["swa9"], 2, "error: unknown policy 'swa9': allowed are dense, "),
    (["sinks", "--param", "n_sinks=x"], 2, "error: policy 'sinks': n_sinks='x' is invalid: allowed is an integer (default 4)"),
    (["sinks", "--param", "n_sinks"], 2, "error: --param 'n_sinks' is invalid: allowed is KEY=VALUE"),
    (["swa", "--sparsity", "1.5"], 2, "error: sparsity=1.5 is invalid: allowed is a number in [0, 1)"),
    (["swa", "--families", "llama,t5"], 2, "error: --families entry 't5' is invalid: allowed are gpt_neox, llama, "),
    (["missing_module"], 1, "FAIL missing_module: policy plug-in 'missing_module' (entry point"),
])
def test_check_policy_bad_input_is_one_line(site, capsys, args, code, line):
    assert check_main(args) == code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith(line), err


@pytest.mark.slow
def test_pip_installed_example_in_every_entry_point(tmp_path):
    """The example really installed (pip, into a folder on PYTHONPATH): the lm_eval and alisa.eval commands and
    the checker find it in fresh processes."""
    from test_eval import make_task

    src = shutil.copytree(EXAMPLE, tmp_path / "src")  # pip writes build files beside the sources
    target = tmp_path / "site"
    pip = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                          "--target", str(target), str(src)], capture_output=True, text=True)
    assert pip.returncode == 0, pip.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    tasks = make_task(tmp_path / "tasks")
    r = subprocess.run(["lm_eval", "--model", "alisa", "--model_args",
                        "pretrained=smollm2-135m,policy=h2o_decay,sparsity=0.5,decay=0.5", "--tasks", "tiny_mc",
                        "--include_path", str(tasks), "--limit", "3", "--device", "cpu"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "'policy': 'h2o_decay'" in r.stdout and "tiny_mc" in r.stdout
    r = subprocess.run([sys.executable, "-m", "alisa.eval", f"tasks_dir={tasks}", "tasks=[tiny_mc]", "limit=3",
                        "grid.policies=[h2o_decay]", "+policy_params.h2o_decay.decay=0.5", "logger=none",
                        f"results_dir={tmp_path / 'results'}"], capture_output=True, text=True, cwd=tmp_path, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list((tmp_path / "results" / "adhoc" / "main" / "points").glob("h2o_decay-s0.8__tiny_mc__*.json"))
    r = subprocess.run([sys.executable, "-m", "alisa.check_policy", "h2o_decay", "--families", "llama"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert r.returncode == 0 and "all checks pass" in r.stdout, r.stderr
