"""Typed configuration of ``python -m alisa.eval`` (Hydra structured configs).

A mistyped key or a value of the wrong type fails when Hydra composes the config;
:func:`validate` then checks values (policy names, sparsity range, tasks, data folder,
device) before any model is loaded. Every error is one line naming the bad value and
what is allowed.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from .results import REPO


class ConfigError(ValueError):
    """Bad user input in the run configuration."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: ``error: <what>`` on one line, exit 2 (no usage block)."""

    def error(self, message: str):  # noqa: D102
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")

    def at_least(self, args, **least: int) -> None:
        """Each named integer option of ``args`` (``None``: not given) is at least its bound."""
        for k, low in least.items():
            v = getattr(args, k)
            if v is not None and v < low:
                self.error(f"--{k.replace('_', '-')}={v} is invalid: allowed is an integer >= {low}")

    def check(self, fn):
        """``fn()``, its :class:`ConfigError` told as this parser's one-line error."""
        try:
            return fn()
        except ConfigError as e:
            self.error(str(e))

    def device(self, name: str) -> None:
        self.check(lambda: check_device(name, "--device"))

    def fits(self, model: str, prompt: int, new: int) -> None:
        """``--prompt`` + ``--new`` tokens fit ``model``'s context."""
        context = model_context(ModelConf(name=model))
        if context is not None and prompt + new > context:
            self.error(f"--prompt + --new={prompt} + {new} is invalid: allowed is at most {context} tokens, the context of {model}")

    def file_tag(self, tag: str | None) -> None:
        """``--tag`` names a JSON file under results/: a plain name."""
        if tag is not None and not re.fullmatch(r"[A-Za-z0-9._-]+", tag):
            self.error(f"--tag={tag!r} is invalid: allowed are letters, digits, '.', '_' and '-' (it names the JSON file)")


COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")  # the last two: dynamo's graph without code generation (fast; tests)


def check_device(name: str, option: str, machine: bool = True) -> None:
    """``name`` is a device alisa runs on (and, with ``machine``, one this machine has)."""
    if name not in DEVICES:
        raise ConfigError(f"{option}={name!r} is invalid: allowed are {', '.join(DEVICES)}")
    if name == "cuda" and machine:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{option}='cuda' asked for, but no CUDA GPU is available here: use {option}=cpu")


def compile_backend() -> str:
    """The ``torch.compile`` backend of the compiled decode step (``ALISA_COMPILE_BACKEND``, default
    inductor), checked before anything runs."""
    name = os.environ.get("ALISA_COMPILE_BACKEND", "inductor")
    if name not in COMPILE_BACKENDS:
        raise ConfigError(f"ALISA_COMPILE_BACKEND={name!r} is invalid: allowed are {', '.join(COMPILE_BACKENDS)}")
    return name


@dataclass
class ModelConf:
    name: str = "smollm2-135m"  # smollm2-135m | random:<shape> | local folder | hub id
    dtype: Optional[str] = None  # float32 | float16 | bfloat16; None: the model's own
    device: str = "cpu"  # cpu | cuda
    hf_config: Optional[dict[str, Any]] = None  # shape of a random: model (conf/model/*.yaml)


@dataclass
class GridConf:
    """The (policy, sparsity or budget) points. dense runs once, at sparsity 0.

    The three lists also take a single value (``grid.policies=swa``), so that a Hydra
    multirun ``grid.policies=dense,swa`` gives one job per value; :func:`validate`
    checks the types and makes them lists.
    """

    policies: Any = field(default_factory=lambda: ["dense"])  # list[str] or one name
    sparsities: Any = field(default_factory=lambda: [0.8])  # list[float] or one number
    budgets: Any = field(default_factory=list)  # list[int] or one integer: fixed token budgets, besides sparsities
    prefill: str = "sparse"


@dataclass
class LoggerConf:
    wandb: str = "offline"  # offline | online | disabled
    project: str = "alisa"
    entity: Optional[str] = None


@dataclass
class ThroughputConf:
    """The throughput workload, run for the task named ``throughput`` (alisa.runtime)."""

    batches: Any = field(default_factory=lambda: [4])  # list[int] or one batch size
    prompt: int = 128  # prompt tokens (WikiText-2 windows; random ids for random: models)
    new_tokens: int = 32
    systems: Any = field(default_factory=lambda: ["engine"])  # engine | stock | hf_static | flexgen | hf_offloaded
    prefill: Optional[str] = None  # the engine's prompt mode; None: grid.prefill
    int8: bool = False
    plan: str = "none"  # none: all KV on the device | auto: cost-model search under the budgets (needs a profile)
    static: bool = False  # the engine's fixed-shape decode step (a CUDA graph on a GPU)
    compiled: bool = False  # with static: that step compiled by torch.compile (inductor; a C++ compiler on the CPU)
    device_budget: Optional[int] = None  # bytes of KV the device tier may hold
    host_budget: Optional[int] = None
    flexgen_fraction: float = 0.5  # FlexGen-style baseline: fraction of the dense KV on the host
    profile: Optional[str] = None  # profile JSON for plan=auto (default: results/profiles/<host>-<device>-<model>.json)


@dataclass
class EvalConf:
    experiment_name: str = "adhoc"  # results/<experiment_name>/<run id>/
    model: ModelConf = field(default_factory=ModelConf)
    grid: GridConf = field(default_factory=GridConf)
    tasks: Any = field(default_factory=lambda: ["piqa_local"])  # list[str] or one name
    num_fewshot: Optional[int] = None  # None: each task's own default
    limit: Optional[float] = None  # docs per task (int) or fraction (< 1); None: all
    task_limits: dict[str, float] = field(default_factory=dict)  # per-task override of limit
    max_length: Optional[int] = None  # context of the model in tokens (rolling perplexity windows); None: the model's
    batch_size: int = 1
    seed: int = 1234
    tasks_dir: str = str(REPO / "tasks")
    data_dir: Optional[str] = None  # default: $ALISA_DATA_DIR or ~/.cache/alisa/data
    results_dir: str = "results"
    run_id: str = "main"  # results/<experiment_name>/<run_id>/: an existing folder is resumed
    verbose: bool = False  # third-party log lines and progress bars on the console too (also: -v); always in logs/
    logger: LoggerConf = field(default_factory=LoggerConf)
    throughput: ThroughputConf = field(default_factory=ThroughputConf)
    # Hyperparameters by policy name, e.g. policy_params.sinks.n_sinks=2: the one place they are set. Each is a
    # keyword of the policy's constructor, typed by its annotation (checked before the model loads). Built-ins'
    # defaults come from conf/policy/<name>.yaml; a plug-in's are added with +policy_params.<name>.<key>=<value>
    # (or policy_params: {<name>: {<key>: <value>}} in an experiment file). Non-default values are part of a
    # point's identity and its records (params), W&B config and throughput record (policy key).
    policy_params: dict[str, dict[str, Any]] = field(default_factory=dict)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=EvalConf)
    cs.store(group="model", name="model_schema", node=ModelConf)


WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("cpu", "cuda")


def grid_points(grid: GridConf, policy_params: dict | None = None) -> list[dict]:
    """Expand the grid: [{'policy', 'sparsity', 'budget'}, plus 'params' where a policy's hyperparameters
    differ from its defaults (``policy_params``, checked by :func:`check_policy_params`)], dense once."""
    from .policies import policy_class

    points: list[dict] = []
    for name in grid.policies:
        params = nondefault_params(name, (policy_params or {}).get(name) or {})
        extra = {"params": params} if params else {}
        if not policy_class(name).takes_budget:  # dense: one point
            points.append({"policy": name, "sparsity": 0.0, "budget": None, **extra})
            continue
        points += [{"policy": name, "sparsity": float(s), "budget": None, **extra} for s in grid.sparsities]
        points += [{"policy": name, "sparsity": None, "budget": int(b), **extra} for b in grid.budgets]
    return points


def nondefault_params(name: str, params: dict) -> dict:
    """The hyperparameters in ``params`` whose value is not the constructor's default (what identifies a point)."""
    from .policies import check_params, hyperparameters

    hp = hyperparameters(name)
    return {k: v for k, v in check_params(name, params).items() if hp[k].default != v}


def policy_kwargs(p: dict) -> dict:
    """make_policy keyword arguments of a grid point (its budget or sparsity, and its hyperparameters)."""
    params = dict(p.get("params") or {})
    if p["budget"] is not None:
        return {"budget": p["budget"], **params}
    from .policies import policy_class

    return {"sparsity": p["sparsity"], **params} if policy_class(p["policy"]).takes_budget else params


def check_policy_params(cfg) -> dict[str, dict]:
    """``cfg.policy_params`` as plain dicts, every name a policy and every value typed; ConfigError naming
    ``policy_params.<policy>.<key>``, the value and what is allowed."""
    from omegaconf import OmegaConf

    from .policies import HyperparameterError, check_params, make_policy, policy_class

    raw = OmegaConf.select(cfg, "policy_params", default=None)
    given = _plain(raw) if raw is not None else {}
    out = {}
    for name, params in given.items():
        try:
            policy_class(name)
        except ValueError as e:
            raise ConfigError(f"policy_params.{name}: {e}") from None
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"policy_params.{name}={params!r} is invalid: allowed is a mapping of hyperparameters "
                              f"(policy_params.{name}.<key>=<value>)")
        try:
            out[name] = check_params(name, params)
        except HyperparameterError as e:
            if e.unknown:
                raise ConfigError(f"policy_params.{name}.{e.key} is not a hyperparameter of policy {name!r}: "
                                  f"allowed are {e.allowed}") from None
            raise ConfigError(f"policy_params.{name}.{e.key}={e.value!r} is invalid: allowed is {e.allowed}") from None
        try:  # the constructor's own range checks, also for a policy the grid does not name
            make_policy(name, **({"sparsity": 0.5} if policy_class(name).takes_budget else {}), **out[name])
        except ValueError as e:
            raise ConfigError(f"policy_params.{name}: {e}") from None
    return out


def point_id(p: dict) -> str:
    return f"{p['policy']}-b{p['budget']}" if p["budget"] is not None else f"{p['policy']}-s{p['sparsity']:g}"


NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
NAME_MAX = 100  # characters of experiment_name and run_id (each names a folder)
PATH_ROOM = 240  # characters a record path adds below the run folder (points/<point>__<task>__<hash>.json)
DTYPES = ("float32", "float16", "bfloat16")
_MISSING = object()
# hf_config keys that must be positive integers wherever they appear
_POSITIVE_INT_KEYS = {"vocab_size", "hidden_size", "intermediate_size", "ffn_dim", "word_embed_proj_dim",
                      "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                      "max_position_embeddings", "sliding_window"}


def shape_configs() -> dict[str, dict]:
    """The ``hf_config`` of every ``conf/model/*.yaml`` that has one, by shape name (``random:<shape>``)."""
    import yaml

    out = {}
    for f in sorted((REPO / "conf" / "model").glob("*.yaml")):
        spec = yaml.safe_load(f.read_text()) or {}
        if isinstance(spec.get("hf_config"), dict):
            out[f.stem] = spec["hf_config"]
    return out


def _plain(value):
    from omegaconf import OmegaConf

    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def _diff(a: dict, b: dict) -> list[str]:
    return sorted(k for k in set(a) | set(b) if a.get(k, _MISSING) != b.get(k, _MISSING))


def check_hf_config(cfg) -> None:
    """``model.hf_config``: the shape a ``random:<shape>`` model is built from (overrides honoured, validated).

    A config equal to some shape's own (the model group's default) is replaced in ``cfg`` by the
    named shape's, so that the record says what runs; a changed one is validated (positive integers
    where the config needs them, a family that matches the shape) and built as given. For a real
    model (its config comes with its weights) a changed ``hf_config`` is an error, never ignored.
    """
    from omegaconf import OmegaConf

    shapes = shape_configs()
    name = cfg.model.name
    given = _plain(cfg.model.hf_config)
    if given is not None and not isinstance(given, dict):
        raise ConfigError(f"model.hf_config={given!r} is invalid: allowed is a mapping of config keys (or null)")
    pristine = given is None or any(given == v for v in shapes.values())
    nearest = min(shapes, key=lambda s: (len(_diff(given, shapes[s])), s)) if given else None
    allowed_names = ", ".join(f"random:{s}" for s in shapes)
    if not name.startswith("random:"):
        if not pristine:
            key = _diff(given, shapes[nearest])[0]
            raise ConfigError(f"model.hf_config.{key}={given.get(key)!r} is set for model.name={name!r}, which brings its "
                              f"own config: allowed only with a random-weight shape ({allowed_names})")
        return
    shape = name.split(":", 1)[1]
    if shape not in shapes:
        raise ConfigError(f"model.name={name!r} is invalid: allowed random shapes are {allowed_names}")
    base = shapes[shape]
    if pristine:
        if given != base:  # the model group's default shape, not the named one: the name decides
            OmegaConf.update(cfg, "model.hf_config", base, merge=False)
        return
    if nearest != shape and len(_diff(given, shapes[nearest])) < len(_diff(given, base)):
        keys = ", ".join(_diff(given, shapes[nearest]))
        raise ConfigError(f"model.hf_config changes ({keys}) apply to the {nearest} shape, but model.name={name!r}: "
                          f"allowed is model={shape} model.hf_config.KEY=VALUE (the named shape's own config)")
    for key in _diff(given, base):
        value, ref = given.get(key, _MISSING), base.get(key)
        what = f"model.hf_config.{key}={value!r} is invalid"
        if value is _MISSING:
            raise ConfigError(f"model.hf_config.{key} was removed: the {shape} shape needs it (allowed: change its value)")
        if key == "model_type":
            raise ConfigError(f"{what} for model.name={name!r}: allowed is {ref!r} (another family: model=<shape>, "
                              f"one of {', '.join(shapes)})")
        if isinstance(ref, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{what}: allowed is true or false")
        elif key in _POSITIVE_INT_KEYS or (isinstance(ref, int) and not isinstance(ref, bool)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{what}: allowed is an integer >= 1")
        elif isinstance(ref, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ConfigError(f"{what}: allowed is a number > 0")
    heads, kv, hidden = given.get("num_attention_heads"), given.get("num_key_value_heads"), given.get("hidden_size")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ConfigError(f"model.hf_config.num_key_value_heads={kv!r} is invalid: allowed is a divisor of "
                          f"num_attention_heads={heads}")
    if isinstance(heads, int) and isinstance(hidden, int) and "head_dim" not in given and hidden % heads:
        raise ConfigError(f"model.hf_config.hidden_size={hidden!r} is invalid: allowed is a multiple of "
                          f"num_attention_heads={heads} (or set head_dim)")
    try:
        from transformers import AutoConfig

        rest = dict(given)
        AutoConfig.for_model(rest.pop("model_type"), **rest)
    except (ValueError, TypeError, KeyError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"model.hf_config is invalid for a {given.get('model_type')!r} model: {first}") from None


def _hf_dict(model_conf) -> dict:
    """The model's transformers config as a dict, read without loading it; {} if unknown here."""
    name = model_conf.name
    if name.startswith("random:"):
        return _plain(model_conf.hf_config) or shape_configs().get(name.split(":", 1)[1]) or {}
    if name == "smollm2-135m":
        return shape_configs().get("smollm2-135m", {})
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name).to_dict()
    except Exception:  # noqa: BLE001 - not loadable here: loading the model says why
        return {}


def model_config(model_conf):
    """The model's transformers config object, built without loading weights; None if unknown here."""
    hf = dict(_hf_dict(model_conf))
    if "model_type" not in hf:
        return None
    from transformers import AutoConfig

    try:
        return AutoConfig.for_model(hf.pop("model_type"), **hf)
    except (ValueError, TypeError, KeyError):  # check_hf_config reports a bad one
        return None


def model_context(model_conf) -> int | None:
    """The model's context in tokens (``max_position_embeddings``), read without loading it; None if unknown."""
    hf = _hf_dict(model_conf)
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        v = hf.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def wandb_login_found() -> bool:
    """Whether W&B has credentials here (env, netrc or its settings file) -- checked without any network."""
    import configparser
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname
    for path in filter(None, [os.environ.get("NETRC"), os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]):
        try:
            if netrc.netrc(path).authenticators(host):
                return True
        except (OSError, netrc.NetrcParseError):
            pass
    settings = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb") / "settings"
    parser = configparser.ConfigParser()
    try:
        parser.read(settings)
        return bool(parser.get("default", "api_key", fallback=""))
    except configparser.Error:
        return False


def _listify(cfg, key: str) -> list:
    """A list-valued key given as one value (a multirun job's ``grid.policies=swa``) becomes a list."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(cfg, key)
    if value is None:
        items: list = []
    elif OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        items = list(OmegaConf.to_container(value) if OmegaConf.is_list(value) else value)
    elif OmegaConf.is_dict(value) or isinstance(value, dict):
        raise ConfigError(f"{key}={OmegaConf.to_container(value) if OmegaConf.is_dict(value) else value!r} is invalid: "
                          "allowed is a list (key=[a,b]) or one value")
    else:
        items = [value]
    OmegaConf.update(cfg, key, items, merge=False)
    return items


def _path_max(path: Path) -> int:
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        return 4096


def validate(cfg, machine: bool = True) -> list[dict]:
    """Check values before anything heavy runs; returns the grid points.

    List-valued keys given as a single value are made lists in ``cfg`` (in place).
    ``machine=False`` leaves out what depends on the machine that runs the job (GPU, data
    folder, W&B login): a multirun for a remote launcher checks every job's values before it
    submits them (a local launcher checks the machine too).
    """
    from .policies import PREFILL_MODES, available, make_policy, policy_class

    for key in ("grid.policies", "grid.sparsities", "grid.budgets", "tasks"):
        _listify(cfg, key)
    g = cfg.grid
    if not g.policies:
        raise ConfigError("grid.policies is empty: allowed are " + ", ".join(available()))
    for name in g.policies:
        try:
            policy_class(name)  # an unknown name lists the allowed ones; a broken plug-in says why
        except ValueError as e:
            raise ConfigError(str(e)) from None
    policy_params = check_policy_params(cfg)
    for s in g.sparsities:
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 <= s < 1):
            raise ConfigError(f"sparsity={s!r} is invalid: allowed is a number in [0, 1)")
    for b in g.budgets:
        if not (isinstance(b, int) and not isinstance(b, bool) and b >= 1):
            raise ConfigError(f"budget={b!r} is invalid: allowed is an integer >= 1 (tokens)")
    if g.prefill not in PREFILL_MODES:
        raise ConfigError(f"grid.prefill={g.prefill!r} is invalid: allowed are {', '.join(PREFILL_MODES)}")
    points = grid_points(g, policy_params)
    if not points:
        raise ConfigError("the grid is empty: give grid.sparsities or grid.budgets for the non-dense policies")
    for p in points:
        try:
            make_policy(p["policy"], **policy_kwargs(p))
        except ValueError as e:
            where = f"policy_params.{p['policy']}: " if p.get("params") else ""  # the constructor's own range checks
            raise ConfigError(f"{where}{e}") from None
    if cfg.limit is not None and not cfg.limit > 0:
        raise ConfigError(f"limit={cfg.limit!r} is invalid: allowed is a positive count, a fraction in (0, 1), or null")
    for t, lim in cfg.task_limits.items():  # names are checked with the task list (a job may run a subset)
        if not lim > 0:
            raise ConfigError(f"task_limits.{t}={lim!r} is invalid: allowed is a positive count or fraction")
    if cfg.max_length is not None and cfg.max_length < 16:
        raise ConfigError(f"max_length={cfg.max_length!r} is invalid: allowed is an integer >= 16 or null")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise ConfigError(f"num_fewshot={cfg.num_fewshot!r} is invalid: allowed is an integer >= 0 or null")
    if cfg.batch_size < 1:
        raise ConfigError(f"batch_size={cfg.batch_size!r} is invalid: allowed is an integer >= 1")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed!r} is invalid: allowed is an integer in [0, 2**32)")
    if cfg.model.dtype is not None and cfg.model.dtype not in DTYPES:
        raise ConfigError(f"model.dtype={cfg.model.dtype!r} is invalid: allowed are {', '.join(DTYPES)} or null (the model's own)")
    check_hf_config(cfg)
    context = model_context(cfg.model)
    if cfg.max_length is not None and context is not None and cfg.max_length > context:
        raise ConfigError(f"max_length={cfg.max_length!r} is invalid: allowed is at most {context} tokens, the context "
                          f"of model {cfg.model.name!r} (or null)")
    check_device(cfg.model.device, "model.device", machine)
    if cfg.logger.wandb == "online" and machine and not wandb_login_found():
        raise ConfigError("logger.wandb='online' needs a W&B login, and none was found here (`wandb login` or "
                          "WANDB_API_KEY): allowed here are logger=wandb_offline (sync later) or logger=none")
    if cfg.logger.wandb not in WANDB_MODES:
        raise ConfigError(f"logger.wandb={cfg.logger.wandb!r} is invalid: allowed are {', '.join(WANDB_MODES)}")
    if not cfg.tasks:
        raise ConfigError("tasks is empty: name at least one task (e.g. tasks=[piqa_local])")
    for t in cfg.tasks:
        if not isinstance(t, str) or not t:
            raise ConfigError(f"task {t!r} is invalid: allowed is a task name (e.g. tasks=[piqa_local])")
    for key in ("experiment_name", "run_id"):
        value = cfg[key]
        if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", "..") or len(value) > NAME_MAX:
            raise ConfigError(f"{key}={value!r} is invalid: allowed are letters, digits, '.', '-' and '_', "
                              f"at most {NAME_MAX} characters (it names a folder)")
    run_dir = Path(os.path.abspath(Path(cfg.results_dir) / cfg.experiment_name / cfg.run_id))
    limit = _path_max(run_dir)
    if len(str(run_dir)) + PATH_ROOM > limit:
        raise ConfigError(f"results_dir={str(cfg.results_dir)!r} is invalid: the run folder {str(run_dir)!r} has "
                          f"{len(str(run_dir))} characters; allowed are at most {limit - PATH_ROOM}")
    for part in run_dir.parts:
        if len(os.fsencode(part)) > 255:
            raise ConfigError(f"results_dir={str(cfg.results_dir)!r} is invalid: the folder name {part[:40]!r}... is "
                              "longer than 255 bytes: allowed are shorter names")
    tasks_dir = Path(cfg.tasks_dir)
    if not tasks_dir.is_dir():
        raise ConfigError(f"tasks_dir={str(tasks_dir)!r} does not exist")
    if machine and any(t.endswith("_local") for t in cfg.tasks):
        from .data import data_dir

        data = data_dir(cfg.data_dir)
        if not data.is_dir():
            raise ConfigError(f"data folder {str(data)!r} does not exist: run `python -m alisa.data prepare` "
                              "(or set data_dir= / $ALISA_DATA_DIR)")
        from .data import DataError, verify

        try:
            verify(data)  # an empty, half-prepared or corrupt folder is named before the model loads
        except DataError as e:
            raise ConfigError(str(e)) from None
    return points
