"""Accuracy harness: ``python -m alisa.eval +experiment=NAME [overrides]``.

Runs the experiment's grid of (policy, sparsity or budget) × tasks with lm-eval, the
model loaded once per process, and writes ``results/<experiment>/<run id>/`` (run id
``main`` unless given): the resolved config, one JSON per (grid point, task) in
``points/``, ``summary.csv``, plots, and W&B runs (offline by default).
``python -m alisa.report DIR`` redraws the summary and plots from the JSON.

Sweeps are resumable and fault tolerant:

- every (point, task) has an identity, the settings that determine its result
  (:func:`point_identity`), and a short hash of it; its record is
  ``points/<point id>__<task>__<hash>.json``, written atomically;
- an existing run folder is resumed: a (point, task) whose record exists with the same
  hash and ``status: ok`` is skipped; a failed one is retried;
- a (point, task) that raises is recorded as ``status: failed`` (error, traceback, hash)
  and the sweep goes on; at the end the run raises :class:`PointsFailed` (the CLI exits 1
  with one line naming them);
- Hydra multirun jobs (joblib, submitit/SLURM) write into the same folder; a lock per
  (point, task) keeps two jobs from computing the same one at the same time.

The command line (issue 11): bad input is one line ``error: <what> <value>: allowed <...>`` on
stderr and exit 2, before the model loads and before anything is written (also keys added with
``+`` that the schema lacks, unknown group options, and every job of a multirun); a run that
failed is one line and exit 1 (a multirun: one per failed job); Ctrl-C is one line and exit 130.
A run that stops before its first record removes the folders it created. The console shows
alisa's progress, log lines and results; third-party log lines and progress bars go only to
``<run folder>/logs/<time>-<host>-<pid>.log`` unless ``-v`` (``verbose=true``).

Testing hook: ``ALISA_FAIL_POINTS=<substring>[,<substring>...]`` makes every
(point, task) whose ``<point id>__<task>`` contains one of them raise instead of running.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import re
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from .config import (REPO, ConfigError, _listify, compile_backend, model_context, point_id, policy_kwargs, register_configs,
                     shape_configs, validate)
from .results import _umask_mode, git_commit, hardware, read_json, versions, write_atomic

log = logging.getLogger("alisa.eval")
CONF_DIR = REPO / "conf"
PRIMARY = ("acc", "exact_match", "word_perplexity")
HASH_VERSION = 1  # bump when the meaning of an identity changes: every point is then recomputed
FAIL_ENV = "ALISA_FAIL_POINTS"
_HASH_RE = re.compile(r"[0-9a-f]{12}")


class PointsFailed(RuntimeError):
    """Some (point, task) runs of a sweep failed; their records are in ``run_dir/points``."""

    def __init__(self, message: str, run_dir: Path | None = None, failures: list[dict] | None = None):
        super().__init__(message)
        self.run_dir, self.failures = run_dir, list(failures or [])


def _metrics(task_result: dict) -> dict[str, dict]:
    """lm-eval's {'acc,none': v, 'acc_stderr,none': s} -> {'acc': {'value', 'stderr'}}."""
    out = {}
    for key, value in task_result.items():
        if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
            continue
        name, flt = key.split(",", 1)
        se = task_result.get(f"{name}_stderr,{flt}")
        out[name if flt == "none" else f"{name},{flt}"] = {
            "value": float(value), "stderr": float(se) if isinstance(se, (int, float)) else None}
    return out


def primary_metric(metrics: dict) -> str:
    return next((m for m in PRIMARY if m in metrics), sorted(metrics)[0])


# --- per-process caches: the model is loaded once per process (a joblib worker keeps it across jobs) ---

_MODELS: dict = {}


def get_model(model_conf):
    """(model, tokenizer) of ``cfg.model``, loaded once per process. ConfigError for an unknown model."""
    from .models import load_model

    hf = OmegaConf.to_container(model_conf.hf_config, resolve=True) if OmegaConf.is_config(model_conf.hf_config) \
        else model_conf.hf_config
    custom = model_conf.name.startswith("random:") and hf is not None and hf != shape_configs().get(model_conf.name[7:])
    key = (model_conf.name, model_conf.dtype, model_conf.device, json.dumps(hf, sort_keys=True) if custom else None)
    if key not in _MODELS:
        try:
            if custom:  # model.hf_config changed (validated by config.check_hf_config): build that shape
                _MODELS[key] = _random_model(model_conf.name, hf, model_conf.dtype, model_conf.device)
            else:
                _MODELS[key] = load_model(model_conf.name, dtype=model_conf.dtype, device=model_conf.device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return _MODELS[key]


def _random_model(name: str, hf_config: dict, dtype, device):
    """A random-weight model of ``hf_config`` (as :func:`alisa.load_model` builds ``random:<shape>``, same seed)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .models import _device, _dtype

    spec = shape_configs()
    hf = dict(hf_config)
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    config.name_or_path = name
    shape = name.split(":", 1)[1]
    default_dtype = "float32"
    if shape in spec:
        import yaml

        default_dtype = (yaml.safe_load((CONF_DIR / "model" / f"{shape}.yaml").read_text()) or {}).get("dtype") or "float32"
    dev = _device(device)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=_dtype(dtype) or _dtype(default_dtype))
    return model.to(dev).eval(), None


@functools.lru_cache(maxsize=4)
def task_manager(tasks_dir: str, stock: bool = False):
    """lm-eval's index of the tasks in ``tasks_dir`` (alisa's local tasks: milliseconds) and, with
    ``stock``, of every stock lm-eval task too (it reads lm-eval's ~26k task files: 10-20 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=tasks_dir, include_defaults=stock)


def task_manager_for(tasks_dir: str, names):
    """The local index if it knows every task in ``names``, else the one with the stock tasks."""
    tm = task_manager(tasks_dir)
    return tm if all(n in tm.all_tasks for n in names) else task_manager(tasks_dir, stock=True)


@functools.lru_cache(maxsize=1)
def _provenance(device: str) -> dict:
    return {"git_commit": git_commit(), "versions": versions(), "hardware": hardware(device),
            "host": socket.gethostname()}


# --- the point runner: (cfg, point, task) -> record; one runner per kind of task ---

def task_limit(cfg, task: str):
    return cfg.task_limits.get(task, cfg.limit)


class LmEvalRunner:
    """An lm-eval task scored under the point's policy (accuracy path / decode path)."""

    kind = "lm_eval"

    def check(self, cfg, tasks: list[str], points: list[dict] | None = None) -> None:
        local = sorted(t for t in task_manager(cfg.tasks_dir).all_tasks if t.endswith("_local"))
        tm = task_manager_for(cfg.tasks_dir, [*tasks, *cfg.task_limits])
        for t in tasks:
            if t not in tm.all_tasks:
                raise ConfigError(f"unknown task {t!r}: local tasks are {', '.join(local)} (or any stock lm-eval task name)")
        for t in cfg.task_limits:
            if t not in tm.all_tasks:
                raise ConfigError(f"task_limits names {t!r}, which is not a task: local tasks are {', '.join(local)}")

    def identity(self, cfg, point: dict, task: str) -> dict:
        return {"num_fewshot": cfg.num_fewshot, "limit": task_limit(cfg, task)}

    def run(self, cfg, point: dict, task: str) -> dict:
        from lm_eval import simple_evaluate

        from .lm_eval_model import AlisaLM

        model, tok = get_model(cfg.model)
        if tok is None:
            raise ConfigError(f"model.name={cfg.model.name!r} has no tokenizer (random weights): accuracy needs a real model")
        lm = AlisaLM(pretrained=model, tokenizer=tok, policy=point["policy"], prefill=cfg.grid.prefill,
                     batch_size=cfg.batch_size, max_length=cfg.max_length, **policy_kwargs(point))
        lm.show_progress = _RUN_LOG is None or bool(OmegaConf.select(cfg, "verbose", default=False))  # CLI: quiet
        limit = task_limit(cfg, task)
        _no_git_describe()
        try:  # no verbosity=: lm-eval's log lines go through the root logger (console filter, run log file)
            out = simple_evaluate(model=lm, tasks=[task], num_fewshot=cfg.num_fewshot, limit=limit,
                                  task_manager=task_manager_for(cfg.tasks_dir, [task]), random_seed=cfg.seed,
                                  numpy_random_seed=cfg.seed, torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
                                  bootstrap_iters=1000, log_samples=True)  # samples: per-document needle results
        finally:
            lm.close()
        metrics = _metrics(out["results"][task])
        kept = lm.kept_fraction()
        needles = needle_docs(out.get("samples"), primary_metric(metrics))
        return {"metrics": metrics, "limit": limit, "primary_metric": primary_metric(metrics),
                **({"needle_docs": needles} if needles else {}),
                "model": {"name": cfg.model.name, "dtype": str(model.dtype).removeprefix("torch."),
                          "device": cfg.model.device, "random_weights": cfg.model.name.startswith("random:")},
                "num_fewshot": out.get("n-shot", {}).get(task, cfg.num_fewshot),
                "n_docs": out.get("n-samples", {}).get(task, {}).get("effective"),
                "n_docs_total": out.get("n-samples", {}).get(task, {}).get("original"),
                "kept_fraction": {"overall": kept["overall"],
                                  "per_layer": [kept["per_layer"][k] for k in sorted(kept["per_layer"])]}}


NEEDLE_FIELDS = ("depth", "length")  # a document with both (passkey: needle depth in %, target tokens) is a needle document


def needle_docs(samples: dict | None, metric: str) -> list[dict]:
    """Per-document results of the needle documents among lm-eval's logged ``samples`` ({task: [sample]}):
    ``[{task, doc_id, depth, length, <metric>}]``, what the depth x length heat map of ``alisa.report`` reads."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    out = []
    for name, rows in sorted((samples or {}).items()):
        for s in rows:
            doc = s.get("doc")
            if isinstance(doc, dict) and all(number(doc.get(k)) for k in NEEDLE_FIELDS) and number(s.get(metric)):
                out.append({"task": name, "doc_id": s["doc_id"], "depth": doc["depth"], "length": doc["length"],
                            metric: s[metric]})
    return out


def _no_git_describe() -> None:
    """lm-eval runs ``git describe`` in the working folder for its own results (printing "fatal: not a git
    repository" outside one); alisa's records carry the commit already, so lm-eval gets alisa's."""
    import lm_eval.evaluator as ev

    if getattr(ev.get_git_commit_hash, "__module__", "") != __name__:
        ev.get_git_commit_hash = _git_commit_for_lm_eval


def _git_commit_for_lm_eval():
    return _provenance("cpu")["git_commit"]


THROUGHPUT = "throughput"
_PREFILLS: dict = {}  # shared dense prefills of this process, by (model, batch, prompt, seed)


class ThroughputRunner:
    """The throughput workload (``cfg.throughput``) for one system at one batch size.

    The task ``throughput`` in ``tasks`` expands to ``tput-<system>-b<batch>``; baselines
    (systems other than ``engine``) do not depend on the point's policy and run at the
    dense point only.
    """

    kind = THROUGHPUT

    @staticmethod
    def parse(task: str) -> tuple[str, int]:
        _, system, b = task.split("-")
        return system, int(b[1:])

    def check(self, cfg, tasks: list[str], points: list[dict] | None = None) -> None:
        from .policies import PREFILL_MODES
        from .runtime import SYSTEMS

        tc = cfg.throughput  # lists already made by tasks()
        for sysname in tc.systems:
            if sysname not in SYSTEMS:
                raise ConfigError(f"unknown throughput system {sysname!r}: allowed are {', '.join(SYSTEMS)}")
        for b in tc.batches:
            if isinstance(b, bool) or not isinstance(b, int) or b < 1:
                raise ConfigError(f"throughput.batches entry {b!r} is invalid: allowed is an integer >= 1")
        for key in ("prompt", "new_tokens"):
            v = tc[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"throughput.{key}={v!r} is invalid: allowed is an integer >= 1")
        for key in ("device_budget", "host_budget"):
            v = tc[key]
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"throughput.{key}={v!r} is invalid: allowed is a number of bytes >= 1 or null")
        if tc.prefill is not None and tc.prefill not in PREFILL_MODES:
            raise ConfigError(f"throughput.prefill={tc.prefill!r} is invalid: allowed are {', '.join(PREFILL_MODES)} or null")
        if tc.plan not in ("none", "auto"):
            raise ConfigError(f"throughput.plan={tc.plan!r} is invalid: allowed are none, auto")
        for key in ("static", "compiled"):
            if not isinstance(tc[key], bool):
                raise ConfigError(f"throughput.{key}={tc[key]!r} is invalid: allowed are true, false")
        if tc.compiled and not tc.static:
            raise ConfigError("throughput.compiled=true needs throughput.static=true: only the fixed-shape decode step is compiled")
        if tc.compiled:
            compile_backend()  # a bad ALISA_COMPILE_BACKEND: one line before any run
        if not 0 <= tc.flexgen_fraction <= 1:
            raise ConfigError(f"throughput.flexgen_fraction={tc.flexgen_fraction!r} is invalid: allowed is a fraction in [0, 1]")
        context = model_context(cfg.model)
        if context is not None and tc.prompt + tc.new_tokens > context:
            raise ConfigError(f"throughput.prompt + throughput.new_tokens={tc.prompt} + {tc.new_tokens} is invalid: allowed "
                              f"are at most {context} tokens in all, the context of model {cfg.model.name!r}")
        self._check_budget(cfg, tasks, points or [])
        prof = self._profile(cfg)  # read (and checked) whenever set: every engine point uses it for a prediction
        if tc.plan == "auto" and prof is None:
            raise ConfigError(f"throughput.plan=auto needs a profile of this machine: run `python -m alisa.profile "
                              f"--model {cfg.model.name} --device {cfg.model.device}` (or set throughput.profile=FILE)")

    def _check_budget(self, cfg, tasks: list[str], points: list[dict]) -> None:
        """A device budget below what every plan needs (the local window stays on the device) is
        bad input, named with its minimum; one that Phase I exceeds is measured (an oom record)."""
        from .config import model_config
        from .policies import make_policy
        from .runtime.costmodel import Workload, device_floor

        tc = cfg.throughput
        mcfg = model_config(cfg.model) if tc.device_budget is not None else None
        if mcfg is None:
            return
        dtype = "int8" if tc.int8 else (cfg.model.dtype or "float32")
        for task in tasks:
            system, batch = self.parse(task)
            if system not in ("engine", "flexgen"):  # the stock systems take no budget
                continue
            for p in points:
                if not self.applies(p, task):
                    continue
                pol = make_policy(p["policy"], **policy_kwargs(p)) if system == "engine" else make_policy("dense")
                floor = device_floor(mcfg, dtype, pol, Workload(batch, tc.prompt, tc.new_tokens), system == "engine")
                if tc.device_budget < floor:
                    raise ConfigError(f"throughput.device_budget={tc.device_budget} is below what one decode step needs "
                                      f"({system}, {pol!r}, batch {batch}): allowed is >= {floor} bytes")

    @staticmethod
    def _profile(cfg):
        from .profile import ProfileError, load_profile, read_profile

        try:
            if cfg.throughput.profile:
                path = Path(cfg.throughput.profile)
                if not path.is_file():
                    raise ConfigError(f"throughput.profile={str(path)!r} does not exist: run `python -m alisa.profile --out FILE`")
                return read_profile(path)
            return load_profile(cfg.model.name, cfg.model.device)
        except ProfileError as e:
            key = "throughput.profile=" if cfg.throughput.profile else "the profile of this machine "
            raise ConfigError(f"{key}{e}") from None

    def tasks(self, cfg) -> list[str]:
        _listify(cfg, "throughput.batches")
        _listify(cfg, "throughput.systems")
        return [f"tput-{s}-b{b}" for s in cfg.throughput.systems for b in cfg.throughput.batches]

    def applies(self, point: dict, task: str) -> bool:
        from .policies import policy_class

        return self.parse(task)[0] == "engine" or not policy_class(point["policy"]).takes_budget  # baselines: once

    def identity(self, cfg, point: dict, task: str) -> dict:
        tc = cfg.throughput
        system, batch = self.parse(task)
        ident = {"system": system, "batch": batch, "prompt": tc.prompt, "new_tokens": tc.new_tokens,
                 "prefill_mode": tc.prefill or cfg.grid.prefill, "int8": tc.int8, "plan": tc.plan,
                 "device_budget": tc.device_budget, "host_budget": tc.host_budget}
        if system == "engine" and tc.static:  # only when set: earlier records keep their identity
            ident["static"] = True
            if tc.compiled:
                ident["compiled"] = True
        if system == "flexgen":
            ident["flexgen_fraction"] = tc.flexgen_fraction
        return ident

    def run(self, cfg, point: dict, task: str) -> dict:
        from .policies import make_policy
        from .runtime.costmodel import Workload, predict, search
        from .runtime.engine import dense_prefill, shares_dense_prefill
        from .runtime.throughput import run_point as measure, workload_prompts
        from .runtime.tiered import Plan

        tc = cfg.throughput
        system, batch = self.parse(task)
        model, tok = get_model(cfg.model)
        hf = cfg.model.get("hf_config")
        hf = json.dumps(OmegaConf.to_container(hf) if OmegaConf.is_config(hf) else hf, sort_keys=True, default=str)
        key = (cfg.model.name, cfg.model.dtype, cfg.model.device, hf, batch, tc.prompt, cfg.seed)
        ids = workload_prompts(tok, batch, tc.prompt, seed=cfg.seed, vocab=model.config.vocab_size)
        prefill = tc.prefill or cfg.grid.prefill
        pol = make_policy(point["policy"], **policy_kwargs(point))
        shareable = system != "engine" or shares_dense_prefill(pol, prefill)
        if shareable and key not in _PREFILLS:
            _PREFILLS[key] = dense_prefill(model, ids)
        plan, pred = None, None
        prof = self._profile(cfg)
        wl = Workload(batch, tc.prompt, tc.new_tokens)
        dtype = str(model.dtype).removeprefix("torch.")
        if system == "engine" and prof is not None:
            if tc.plan == "auto":
                pred = search(prof, model.config, dtype, pol, wl, tc.device_budget, tc.host_budget)
                plan = pred.plan
            else:
                pred = predict(prof, model.config, dtype, pol, wl, Plan(), tc.device_budget, tc.host_budget)
        rec = measure(model, system, ids, tc.new_tokens, policy=pol, prefill=prefill, int8=tc.int8, plan=plan,
                      flexgen_fraction=tc.flexgen_fraction, device_budget=tc.device_budget, host_budget=tc.host_budget,
                      prefilled=_PREFILLS.get(key) if shareable else None, static=system == "engine" and tc.static,
                      compiled=system == "engine" and tc.compiled)
        if pred is not None:
            rec["predicted"] = pred.to_dict()
            if rec.get("decode_s") is not None:
                rec["predicted_vs_measured_decode"] = pred.total_s / rec["decode_s"] if rec["decode_s"] else None
        return {"throughput": rec, "workload": {"batch": batch, "prompt": tc.prompt, "new_tokens": tc.new_tokens},
                "model": {"name": cfg.model.name, "dtype": dtype, "device": cfg.model.device,
                          "random_weights": cfg.model.name.startswith("random:")},
                "kept_fraction": {"overall": rec.get("kept_fraction"), "per_layer": []}}


RUNNERS = {"lm_eval": LmEvalRunner(), THROUGHPUT: ThroughputRunner()}


def task_kind(task: str) -> str:
    """Which runner handles ``task``: ``tput-<system>-b<batch>`` is the throughput workload, all else lm-eval."""
    return THROUGHPUT if task.startswith("tput-") else "lm_eval"


def expand_tasks(cfg) -> list[str]:
    """``tasks`` with ``throughput`` replaced by its (system, batch) workloads."""
    out = []
    for t in cfg.tasks:
        out += RUNNERS[THROUGHPUT].tasks(cfg) if t == THROUGHPUT else [t]
    return out


def applies(point: dict, task: str) -> bool:
    runner = RUNNERS[task_kind(task)]
    return runner.applies(point, task) if hasattr(runner, "applies") else True


def point_identity(cfg, point: dict, task: str) -> dict:
    """What determines the result of (point, task): hashed to skip it on a rerun.

    Not in it: where results go (results_dir, run_id, experiment_name), the logger,
    tasks_dir/data_dir (paths), and the other points and tasks of the grid.
    """
    kind = task_kind(task)
    model = {"name": cfg.model.name, "dtype": cfg.model.dtype, "device": cfg.model.device}
    if cfg.model.name.startswith("random:") and cfg.model.hf_config is not None:
        model["hf_config"] = OmegaConf.to_container(cfg.model.hf_config, resolve=True)
    return {"v": HASH_VERSION, "kind": kind, "model": model, "policy": point["policy"],
            "sparsity": point["sparsity"], "budget": point["budget"], "prefill": cfg.grid.prefill, "task": task,
            "seed": cfg.seed, "batch_size": cfg.batch_size, "max_length": cfg.max_length,
            **({"policy_params": {point["policy"]: point["params"]}} if point.get("params") else {}),  # non-default only
            **RUNNERS[kind].identity(cfg, point, task)}


def point_hash(identity: dict) -> str:
    """sha256 of the canonical JSON of an identity, first 12 hex digits."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _injected_failure(point: dict, task: str) -> None:
    wanted = [s for s in os.environ.get(FAIL_ENV, "").split(",") if s]
    name = f"{point_id(point)}__{task}"
    if any(s in name for s in wanted):
        raise RuntimeError(f"injected failure ({FAIL_ENV}={os.environ[FAIL_ENV]})")


def run_point(cfg, point: dict, task: str) -> dict:
    """Run one (grid point, task) and return its record (status ok). Raises on any failure."""
    identity = point_identity(cfg, point, task)
    _injected_failure(point, task)
    t0 = time.perf_counter()
    result = RUNNERS[identity["kind"]].run(cfg, point, task)
    return {**_provenance(cfg.model.device), "experiment": cfg.experiment_name, "run_id": cfg.run_id,
            "seed": cfg.seed, "prefill": cfg.grid.prefill, "max_length": cfg.max_length, "batch_size": cfg.batch_size,
            **point, "point_id": point_id(point), "task": task, "kind": identity["kind"], **result,
            "status": "ok", "hash": point_hash(identity), "identity": identity, "pid": os.getpid(),
            "wall_time_s": time.perf_counter() - t0, "finished_at": _now()}


def _failure_record(cfg, point: dict, task: str, error: BaseException, wall: float) -> dict:
    identity = point_identity(cfg, point, task)
    return {**_provenance(cfg.model.device), "experiment": cfg.experiment_name, "run_id": cfg.run_id,
            **point, "point_id": point_id(point), "task": task, "kind": identity["kind"],
            "status": "failed", "hash": point_hash(identity), "identity": identity, "pid": os.getpid(),
            "error": _one_line_error(error), "traceback": traceback.format_exc(),
            "wall_time_s": wall, "finished_at": _now()}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


def _one_line_error(e: BaseException, width: int = 160) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    text = f"{type(e).__name__}: {first}" if first else type(e).__name__
    return text if len(text) <= width else text[: width - 1] + "…"


# --- the results folder: atomic records, locks, superseded records ---

def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


def record_stem(point: dict, task: str) -> str:
    return f"{point_id(point)}__{_safe(task)}"


def _write_record(run_dir: Path, target: Path, record: dict) -> None:
    """Atomically: a temp file in ``run_dir/.tmp`` (never in points/), fsynced, renamed over ``target``."""
    tmp_dir = run_dir / ".tmp"
    tmp_dir.mkdir(exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tmp_dir, prefix=f"{os.getpid()}@{socket.gethostname()}__", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _clean_stale_tmp(run_dir: Path) -> None:
    """Temp files of processes on this host that are gone (killed mid-write)."""
    host = socket.gethostname()
    for f in (run_dir / ".tmp").glob("*"):
        owner = f.name.split("__", 1)[0]
        pid, _, on = owner.partition("@")
        if on != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except PermissionError:
            pass


@contextlib.contextmanager
def _lock(path: Path, wait: bool):
    """An flock on ``path`` (yields False if ``wait`` is False and another process holds it)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-job locking
        yield True
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def _read_record(path: Path) -> dict | None:
    try:
        rec = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("unreadable record %s (%s): recomputing it", path, e)
        return None
    if not isinstance(rec, dict):
        log.warning("record %s is not a JSON object: recomputing it", path)
        return None
    return rec


def _supersede(run_dir: Path, stem: str, keep: Path) -> None:
    """Records of the same (point, task) under another hash (a changed setting) move to ``superseded/``."""
    for f in (run_dir / "points").glob(f"{glob_escape(stem)}*.json"):
        rest = f.name[len(stem):-len(".json")]
        if f == keep or not (rest == "" or (rest.startswith("__") and _HASH_RE.fullmatch(rest[2:]))):
            continue
        dest = run_dir / "superseded" / f.name
        dest.parent.mkdir(exist_ok=True)
        os.replace(f, dest)
        log.warning("moved %s (another configuration of the same point and task) to %s", f.name, dest.parent)


def glob_escape(s: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", s)


def _do_point(cfg, run_dir: Path, point: dict, task: str) -> tuple[str, dict | None]:
    """Skip, run or record the failure of one (point, task): ('skipped'|'ran'|'failed'|'busy', record)."""
    pid, stem = point_id(point), record_stem(point, task)
    h = point_hash(point_identity(cfg, point, task))
    target = run_dir / "points" / f"{stem}__{h}.json"
    with _lock(run_dir / ".locks" / f"{stem}.lock", wait=False) as mine:
        if not mine:
            log.info("skip %s %s: another job is running it", pid, task)
            return "busy", None
        old = _read_record(target)
        if old is not None and old.get("status", "ok") == "ok" and old.get("hash") == h:
            now = _provenance(cfg.model.device)["git_commit"]
            note = f" (computed at commit {old.get('git_commit')}, now {now})" if old.get("git_commit") != now else ""
            log.info("skip %s %s: done, %s%s", pid, task, target.name, note)
            return "skipped", old
        if old is not None:
            log.info("retry %s %s: it failed before (%s)", pid, task, old.get("error"))
        log.info("run %s %s", pid, task)
        t0 = time.perf_counter()
        try:
            rec, status = run_point(cfg, point, task), "ran"
        except Exception as e:  # noqa: BLE001 - a failed point is data; KeyboardInterrupt/SystemExit end the sweep
            rec, status = _failure_record(cfg, point, task, e, time.perf_counter() - t0), "failed"
            log.error("failed %s %s: %s", pid, task, rec["error"])
            _free_accelerator_memory()
        _write_record(run_dir, target, rec)
        _supersede(run_dir, stem, keep=target)
        return status, rec


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


ALL_POLICIES = "all"


def expand_policies(cfg) -> list[str]:
    """``grid.policies`` with ``all`` replaced (in place) by every policy registered when the run starts, built-in
    and plug-in (``alisa.policies.available()``, by name), without repeats; ``[dense, all]`` puts dense first.
    Returns the list (``config.yaml`` records it)."""
    names = _listify(cfg, "grid.policies")
    if ALL_POLICIES not in names:
        return names
    from .policies import available

    out: list = []
    for n in names:
        out += [m for m in (available() if n == ALL_POLICIES else [n]) if m not in out]
    OmegaConf.update(cfg, "grid.policies", out, merge=False)
    return out


def run_dir_of(cfg) -> Path:
    return Path(cfg.results_dir) / cfg.experiment_name / cfg.run_id


def run_experiment(cfg) -> Path:
    """Run (or resume) the grid; returns the results folder.

    Raises ConfigError on bad input, before any output; raises PointsFailed at the end
    (after the report) when some (point, task) failed. A run that ends by an exception before
    its first record (disk full, Ctrl-C, ...) removes the folders it created: no empty results.
    """
    expand_policies(cfg)
    points = validate(cfg)
    if cfg.data_dir:
        os.environ["ALISA_DATA_DIR"] = str(cfg.data_dir)
    tasks = expand_tasks(cfg)
    for kind in sorted({task_kind(t) for t in tasks}):
        RUNNERS[kind].check(cfg, [t for t in tasks if task_kind(t) == kind], points)
    run_dir = run_dir_of(cfg)
    _check_writable(run_dir, str(cfg.results_dir))
    _, tok = get_model(cfg.model)
    if tok is None and any(task_kind(t) == "lm_eval" for t in tasks):
        raise ConfigError(f"model.name={cfg.model.name!r} has no tokenizer (random weights): accuracy needs a real model")
    n_pairs = sum(applies(p, t) for p in points for t in tasks)
    created = _missing_dirs(run_dir)
    try:
        return _run_grid(cfg, run_dir, points, tasks, n_pairs)
    except BaseException:
        _remove_if_no_records(run_dir, created)
        raise


def _run_grid(cfg, run_dir: Path, points: list[dict], tasks: list[str], n_pairs: int) -> Path:
    from tqdm import tqdm

    from .report import load_records, rebuild
    from .wandb_log import WandbLogger

    (run_dir / "points").mkdir(parents=True, exist_ok=True)
    _open_run_log(run_dir)
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # the latest invocation's
    _clean_stale_tmp(run_dir)
    logger = WandbLogger(cfg.logger, run_dir, cfg.experiment_name)
    counts = {"ran": 0, "skipped": 0, "failed": 0, "busy": 0}
    failures: list[dict] = []
    try:
        with tqdm(total=n_pairs, desc=cfg.experiment_name, unit="eval", file=sys.stderr, disable=False) as bar:
            for p in points:
                records, fresh = [], False
                for task in tasks:
                    if not applies(p, task):
                        continue
                    bar.set_postfix_str(f"{point_id(p)} {task}")
                    status, rec = _do_point(cfg, run_dir, p, task)
                    counts[status] += 1
                    if status == "failed":
                        failures.append(rec)
                    elif rec is not None:
                        records.append(rec)
                        fresh |= status == "ran"
                    bar.update()
                if fresh:
                    logger.log_point(p, records)
        log.info("%s: %d ran, %d skipped (done before), %d failed, %d left to another job", run_dir,
                 counts["ran"], counts["skipped"], counts["failed"], counts["busy"])
        with _lock(run_dir / ".locks" / "report.lock", wait=True):
            summary = rebuild(run_dir, echo=True) if load_records(run_dir) else None  # not when all failed
        if summary is not None and counts["ran"]:
            logger.log_summary(summary)
    finally:
        logger.finish()
    if failures:
        total = n_pairs
        named = ", ".join(f"{r['point_id']}/{r['task']} ({r['error']})" for r in failures[:5])
        more = f" and {len(failures) - 5} more" if len(failures) > 5 else ""
        raise PointsFailed(f"{len(failures)} of {total} (point, task) runs failed: {named}{more}; failure records with "
                           f"tracebacks in {run_dir / 'points'}; rerun the same command to retry them",
                           run_dir=run_dir, failures=failures)
    return run_dir


def _missing_dirs(run_dir: Path) -> list[Path]:
    """The run folder and its parents that do not exist yet (innermost first): what this run would create."""
    out, d = [], run_dir
    while not d.exists() and d != d.parent:
        out.append(d)
        d = d.parent
    return out


def _remove_if_no_records(run_dir: Path, created: list[Path]) -> None:
    """After a run that failed: remove the folders it created if no record was written (and no other job is in it)."""
    if not created or created[0] != run_dir or not run_dir.is_dir():
        return
    if any((run_dir / "points").glob("*.json")) or any((run_dir / "superseded").glob("*.json")):
        return
    for lock in (run_dir / ".locks").glob("*.lock"):  # a job that started meanwhile holds its lock: leave the folder
        with _lock(lock, wait=False) as free:
            if not free:
                return
    _close_run_log()
    import shutil

    shutil.rmtree(run_dir, ignore_errors=True)
    for d in created[1:]:
        try:
            d.rmdir()  # only if empty
        except OSError:
            break


def _check_writable(run_dir: Path, results_dir: str) -> None:
    """The run folder (or its nearest existing parent) must be writable; creates nothing."""
    probe_dir = run_dir
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    try:
        if not probe_dir.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        fd, probe = tempfile.mkstemp(dir=probe_dir, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
        if run_dir.exists() and (run_dir / "points").exists():
            fd, probe = tempfile.mkstemp(dir=run_dir / "points", prefix=".write-probe-")
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"results_dir={results_dir!r} cannot be written ({e.strerror}: {str(probe_dir)!r}): "
                          "allowed is a writable folder") from None


def _experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


# --- the console and the run's log file (CLI) ---

class _ConsoleFilter(logging.Filter):
    """Quiet console: alisa's own lines and errors; third-party chatter only in the run's log file (or with -v)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.name == "alisa" or record.name.startswith("alisa.") or record.levelno >= logging.ERROR


_RUN_LOG = None  # the CLI's logging.handlers.MemoryHandler: buffers until the run folder exists, then writes logs/


@contextlib.contextmanager
def _cli_logging(verbose: bool):
    """Every log line of this job (alisa's and third-party, INFO and up) goes to ``<run dir>/logs/<time>-<host>-<pid>.log``;
    the console gets alisa's lines and errors, or everything with ``verbose``."""
    import logging.handlers

    global _RUN_LOG
    root = logging.getLogger()
    if not verbose:
        for h in root.handlers:
            if not any(isinstance(f, _ConsoleFilter) for f in h.filters):
                h.addFilter(_ConsoleFilter())
    logging.captureWarnings(True)  # Python warnings (deprecations, ...) become log records: filtered like the rest
    with contextlib.suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_default_handler()  # through the root logger instead of transformers' own stderr handler
        hf_logging.enable_propagation()
    buffer = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1, flushOnClose=False)
    buffer.setLevel(logging.INFO)
    root.addHandler(buffer)
    _RUN_LOG = buffer
    try:
        yield
    finally:
        _close_run_log()
        root.removeHandler(buffer)
        buffer.close()
        _RUN_LOG = None


def _open_run_log(run_dir: Path) -> None:
    """Start writing the buffered log lines into the run folder (CLI only)."""
    buffer = _RUN_LOG
    if buffer is None or buffer.target is not None:
        return
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    (run_dir / "logs").mkdir(exist_ok=True)
    fh = logging.FileHandler(run_dir / "logs" / f"{stamp}-{socket.gethostname()}-{os.getpid()}.log", encoding="utf-8")
    fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    buffer.setTarget(fh)
    buffer.flush()
    buffer.capacity = 1  # from now on every line is written at once


def _close_run_log() -> None:
    buffer = _RUN_LOG
    if buffer is None or buffer.target is None:
        return
    buffer.flush()
    target = buffer.target
    buffer.setTarget(None)
    buffer.buffer.clear()
    buffer.capacity = 1 << 30
    target.close()


# --- the command line: one line per bad input or fault ---

LOCAL_LAUNCHERS = ("basic", "joblib", "submitit_local")  # their jobs run on this machine: it is checked up front
_STDERR_ENV = "ALISA_CLI_STDERR"  # identity of the user's stderr: a job that shares it prints its own error line


def _hydra_args(argv: list[str]):
    """Hydra's own command line (flags and overrides); a bad flag is a ConfigError."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def error(message: str):
        raise ConfigError(f"{message} (see python -m alisa.eval --help)")

    parser.error = error
    return parser.parse_args(argv)


def _parse_hint(text: str) -> str:
    value = text.split("=", 1)[1] if "=" in text else text
    if any(ord(c) > 127 for c in text):
        return "non-ASCII characters need quotes: \"key='value'\""
    if any(c in value for c in "[]{}(),"):
        return "write lists as key=[a,b] and sweeps as key=a,b"
    if "=" not in text:
        return "allowed is key=value"
    return "quote a value with special characters: key='value'"


def _parse_overrides(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        return OverridesParser.create().parse_overrides(overrides=overrides)
    except OverrideParseException as e:
        reason = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"malformed override {e.override!r}: {reason} ({_parse_hint(e.override)})") from None


_NUMBER_RE = re.compile(r"(?<![\w.])[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?(?![\w.])")


def _check_sparsities_as_written(parsed) -> None:
    """A sparsity out of [0, 1) is reported as the user wrote it (0.99999999999999999 is 1.0 as a float)."""
    for o in parsed:
        if o.key_or_group != "grid.sparsities" or o.is_delete() or "=" not in o.input_line:
            continue
        text = o.input_line.split("=", 1)[1]
        if "$" in text or ("(" in text and not text.startswith("choice(")):
            continue  # interpolations, range(...) and the like: checked after composition
        for token in _NUMBER_RE.findall(text):
            value = float(token)
            if not 0 <= value < 1:
                as_float = "" if repr(value) == token else f" ({value!r} as a float)"
                raise ConfigError(f"sparsity={token} is invalid{as_float}: allowed is a number in [0, 1)")


def _schema_error(key: str, override: str) -> str | None:
    """Why ``+key=...`` cannot be added (not a key of the schema), or None (a key below a mapping such as task_limits)."""
    import dataclasses
    import typing

    from .config import EvalConf

    node, path = EvalConf, []
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None  # below a mapping (task_limits, model.hf_config) or a free-form value: any key
        hints = typing.get_type_hints(node)
        names = [f.name for f in dataclasses.fields(node)]
        if part not in names:
            return (f"Could not append {override!r}: Key {part!r} not in {node.__name__!r} (allowed keys: "
                    f"{', '.join(names)}; `+` adds keys only below task_limits or model.hf_config)")
        path.append(part)
        node = hints[part]
        args = [a for a in typing.get_args(node) if a is not type(None)]
        if typing.get_origin(node) is typing.Union and len(args) == 1:
            node = args[0]
    return None


def _is_group(key: str) -> bool:
    return "/" in key or (CONF_DIR / key).is_dir()


def _check_added_keys(parsed) -> None:
    """``+key=value`` with a key the schema does not have would run on the defaults: reject it like a misspelled key."""
    for o in parsed:
        if not (o.is_add() or o.is_force_add()) or o.package or _is_group(o.key_or_group) or o.key_or_group.startswith("hydra"):
            continue
        why = _schema_error(o.key_or_group, o.input_line)
        if why:
            raise ConfigError(why)


def _group_values(o) -> list:
    if o.is_delete():
        return []
    if o.is_sweep_override():
        return list(o.sweep_string_iterator())
    value = o.value()
    return [value] if isinstance(value, str) else []


def _check_groups(parsed) -> str:
    """Unknown config group options (model=, logger=, +experiment=, hydra/launcher=, ...) listed in one line;
    returns the launcher of a multirun."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    launcher = "basic"
    for o in parsed:
        group = o.key_or_group
        if o.package or not _is_group(group) or not loader.repository.group_exists(group):
            continue
        options = [n for n in loader.get_group_options(group) if not n.endswith("_schema")]
        for value in _group_values(o):
            if value not in options:
                raise ConfigError(f"unknown {group} {value!r}: allowed are {', '.join(options)}")
        if group == "hydra/launcher" and _group_values(o):
            launcher = _group_values(o)[-1]
    return launcher


def precheck(argv: list[str]) -> None:
    """One-line errors for what Hydra would report in many lines (or not at all): bad flags, malformed overrides,
    unknown config group options, keys added with ``+`` that the schema lacks, bad keys or types, and (for a
    multirun) every job's values -- before any job starts; jobs of a local launcher are checked against this
    machine too (GPU, data folder, W&B login)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = _hydra_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return  # Hydra's help and info screens
    multirun = bool(args.multirun)
    parsed = _parse_overrides(args.overrides)
    for o in parsed:  # before anything else: the most common mistake, listed from the files alone
        if o.key_or_group == "experiment" and not o.package:
            for name in _group_values(o):
                if name.strip() not in _experiment_names():
                    raise ConfigError(f"unknown experiment {name.strip()!r}: allowed are {', '.join(_experiment_names())}")
    _check_sparsities_as_written(parsed)
    _check_added_keys(parsed)
    if args.config_path or args.config_dir:
        return  # another config folder: Hydra composes it itself
    config_name = args.config_name or "config"
    names = sorted(f.stem for f in CONF_DIR.glob("*.yaml"))
    if config_name.removesuffix(".yaml") not in names:
        raise ConfigError(f"unknown --config-name {config_name!r}: allowed are {', '.join(names)}")
    overrides = [a for a in args.overrides if not a.lstrip("+~").startswith("hydra")]  # Hydra's own keys: Hydra's business
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            launcher = _check_groups(parsed)
            jobs = _sweep_jobs(overrides) if multirun else [overrides]
            for job in jobs:
                cfg = compose(config_name=config_name, overrides=job)
                if multirun:
                    expand_policies(cfg)
                    validate(cfg, machine=launcher in LOCAL_LAUNCHERS)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None


def _sweep_jobs(args: list[str]) -> list[list[str]]:
    """The overrides of every job of a basic-sweeper multirun."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    parsed = _parse_overrides(args)
    return [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]


def _one_line(e: BaseException) -> str:
    """Hydra's error, its cause, and the keys (or options) allowed, on one line."""
    import dataclasses

    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    if not lines:
        return type(e).__name__
    msg = lines[0].rstrip(".") + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")
    options = [l for l in lines[1:] if not l.startswith(("Available options", "Config search path", "provider="))]
    if any(l.startswith("Available options") for l in lines):
        msg += f": allowed are {', '.join(o for o in options if not o.endswith('_schema'))}"
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        msg += ": " + str(cause).strip().splitlines()[0]
        typ = getattr(cause, "object_type", None)
        if "not in" in str(cause) and dataclasses.is_dataclass(typ):
            msg += f" (allowed keys: {', '.join(f.name for f in dataclasses.fields(typ))})"
    return msg


def _os_error_line(e: OSError, run_dir: Path) -> str:
    import errno

    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    what = f"{e.strerror or e}" + (f" [{name}]" if name else "")
    where = f" writing {str(e.filename)!r}" if e.filename else ""
    kept = (f"finished records are kept in {str(run_dir)!r}, nothing half-written" if run_dir.is_dir()
            else "nothing was written")
    return (f"error: the run stopped: {what}{where}; {kept}: allowed is a results_dir= with free space (then rerun "
            "the same command)")


def _error_line(e: BaseException, cfg) -> tuple[str, int]:
    """The one line and exit code of an error that ends a job."""
    if isinstance(e, ConfigError):
        return f"error: {e}", 2
    if isinstance(e, OSError):
        return _os_error_line(e, run_dir_of(cfg)), 1
    return f"error: {e}", 1


def _stderr_id() -> str:
    try:
        st = os.fstat(2)
        return f"{st.st_dev}:{st.st_ino}"
    except OSError:
        return ""


def hydra_task(cfg) -> None:
    """The Hydra task function (module level: a multirun launcher pickles it by reference)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    with _cli_logging(bool(OmegaConf.select(cfg, "verbose", default=False))):
        try:
            run_experiment(cfg)
        except (ConfigError, PointsFailed, OSError) as e:
            line, code = _error_line(e, cfg)
            if not multirun:
                print(line, file=sys.stderr, flush=True)
                sys.exit(code)
            # Hydra marks the job failed, runs the others, and re-raises the first failure in the launcher
            # (main prints it there unless this job already printed it on the same terminal).
            line = f"error: multirun job {HydraConfig.get().job.num}: {line.removeprefix('error: ')}"
            if os.environ.get(_STDERR_ENV) == _stderr_id():
                print(line, file=sys.stderr, flush=True)
                e.alisa_printed = True
            e.alisa_line, e.alisa_code = line, code
            raise


def _verbose_argv(argv: list[str]) -> tuple[list[str], bool]:
    """``-v``/``--verbose`` becomes the override ``verbose=true`` (Hydra has no such flag)."""
    out = ["verbose=true" if a in ("-v", "--verbose") else a for a in argv]
    verbose = any(a.lstrip("+") in ("verbose=true", "verbose=True", "verbose=1") for a in out)
    return out, verbose


def main() -> None:
    try:
        sys.exit(_main())
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        sys.exit(130)


def _main() -> int:
    import hydra

    argv, verbose = _verbose_argv(sys.argv[1:])
    sys.argv = [sys.argv[0], *argv]
    if not verbose:  # third-party progress bars off (read by tqdm when first imported); alisa's own bar stays
        os.environ.setdefault("TQDM_DISABLE", "1")
    register_configs()
    try:
        precheck(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    own_errors = not os.environ.get("HYDRA_FULL_ERROR")
    if own_errors:  # Hydra re-raises instead of printing a trimmed traceback: one line here
        os.environ["HYDRA_FULL_ERROR"] = "1"
    os.environ[_STDERR_ENV] = _stderr_id()
    stderr = sys.stderr
    sys.stderr = _NoHydraJobLines(stderr)  # each failed job has its own line already
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")(hydra_task)()
    except Exception as e:  # noqa: BLE001 - everything that reaches the user is one line
        if not own_errors:
            raise
        from hydra.errors import HydraException
        from omegaconf.errors import OmegaConfBaseException

        line = getattr(e, "alisa_line", None)
        code = getattr(e, "alisa_code", None)
        if line is None:
            bad_input = isinstance(e, (ConfigError, HydraException, OmegaConfBaseException))
            line = f"error: {_one_line(e)}" if bad_input else \
                f"error: {_first_line(e)} (not an input error: HYDRA_FULL_ERROR=1 shows the traceback)"
            code = 2 if bad_input else 1
        if not getattr(e, "alisa_printed", False):
            print(line, file=sys.stderr, flush=True)
        return code
    finally:
        sys.stderr = stderr
    return 0


class _NoHydraJobLines:
    """stderr without Hydra's "Error executing job with overrides: [...]" (a multirun job that failed has printed
    its own one-line error, naming its job number and what failed)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        if text.startswith("Error executing job with overrides:"):
            return len(text)
        return self._stream.write(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def _first_line(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


if __name__ == "__main__":
    from alisa.eval import main as _main_entry  # the importable module, not __main__: launchers pickle its functions

    _main_entry()
