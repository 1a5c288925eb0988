"""Typed configuration of ``python -m alisa.eval`` (Hydra structured configs).

A mistyped key or a value of the wrong type fails when Hydra composes the config;
:func:`validate` then checks values (policy names, sparsity range, tasks, data folder,
device) before any model is loaded. Every error is one line naming the bad value and
what is allowed.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from .results import REPO


class ConfigError(ValueError):
    """Bad user input in the run configuration."""


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
    systems: Any = field(default_factory=lambda: ["engine"])  # engine | stock | flexgen | hf_offloaded
    prefill: Optional[str] = None  # the engine's prompt mode; None: grid.prefill
    int8: bool = False
    plan: str = "none"  # none: all KV on the device | auto: cost-model search under the budgets (needs a profile)
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
    logger: LoggerConf = field(default_factory=LoggerConf)
    throughput: ThroughputConf = field(default_factory=ThroughputConf)


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="eval_schema", node=EvalConf)
    cs.store(group="model", name="model_schema", node=ModelConf)


WANDB_MODES = ("offline", "online", "disabled")
DEVICES = ("cpu", "cuda")


def grid_points(grid: GridConf) -> list[dict]:
    """Expand the grid: [{'policy', 'sparsity', 'budget'}], dense once."""
    points: list[dict] = []
    for name in grid.policies:
        if name == "dense":
            points.append({"policy": "dense", "sparsity": 0.0, "budget": None})
            continue
        points += [{"policy": name, "sparsity": float(s), "budget": None} for s in grid.sparsities]
        points += [{"policy": name, "sparsity": None, "budget": int(b)} for b in grid.budgets]
    return points


def policy_kwargs(p: dict) -> dict:
    """make_policy keyword arguments of a grid point."""
    if p["budget"] is not None:
        return {"budget": p["budget"]}
    return {} if p["policy"] == "dense" else {"sparsity": p["sparsity"]}


def point_id(p: dict) -> str:
    return f"{p['policy']}-b{p['budget']}" if p["budget"] is not None else f"{p['policy']}-s{p['sparsity']:g}"


NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


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


def validate(cfg, machine: bool = True) -> list[dict]:
    """Check values before anything heavy runs; returns the grid points.

    List-valued keys given as a single value are made lists in ``cfg`` (in place).
    ``machine=False`` leaves out what depends on the machine that runs the job (GPU, data
    folder): a multirun's launcher checks every job's values before it submits them.
    """
    from .integration import PREFILL_MODES
    from .policies import REGISTRY, make_policy

    for key in ("grid.policies", "grid.sparsities", "grid.budgets", "tasks"):
        _listify(cfg, key)
    g = cfg.grid
    if not g.policies:
        raise ConfigError("grid.policies is empty: allowed are " + ", ".join(sorted(REGISTRY)))
    for name in g.policies:
        if not isinstance(name, str) or name not in REGISTRY:
            raise ConfigError(f"unknown policy {name!r}: allowed are {', '.join(sorted(REGISTRY))}")
    for s in g.sparsities:
        if not (isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and 0 <= s < 1):
            raise ConfigError(f"sparsity={s!r} is invalid: allowed is a number in [0, 1)")
    for b in g.budgets:
        if not (isinstance(b, int) and not isinstance(b, bool) and b >= 1):
            raise ConfigError(f"budget={b!r} is invalid: allowed is an integer >= 1 (tokens)")
    if g.prefill not in PREFILL_MODES:
        raise ConfigError(f"grid.prefill={g.prefill!r} is invalid: allowed are {', '.join(PREFILL_MODES)}")
    points = grid_points(g)
    if not points:
        raise ConfigError("the grid is empty: give grid.sparsities or grid.budgets for the non-dense policies")
    for p in points:
        try:
            make_policy(p["policy"], **policy_kwargs(p))
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.limit is not None and not cfg.limit > 0:
        raise ConfigError(f"limit={cfg.limit!r} is invalid: allowed is a positive count, a fraction in (0, 1), or null")
    for t, lim in cfg.task_limits.items():  # names are checked with the task list (a job may run a subset)
        if not lim > 0:
            raise ConfigError(f"task_limits.{t}={lim!r} is invalid: allowed is a positive count or fraction")
    if cfg.max_length is not None and cfg.max_length < 16:
        raise ConfigError(f"max_length={cfg.max_length!r} is invalid: allowed is an integer >= 16 or null")
    if cfg.num_fewshot is not None and cfg.num_fewshot < 0:
        raise ConfigError(f"num_fewshot={cfg.num_fewshot!r} is invalid: allowed is an integer >= 0 or null")
    if cfg.model.device not in DEVICES:
        raise ConfigError(f"model.device={cfg.model.device!r} is invalid: allowed are {', '.join(DEVICES)}")
    if cfg.model.device == "cuda" and machine:
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("model.device='cuda' asked for, but no CUDA GPU is available here: use model.device=cpu")
    if cfg.logger.wandb not in WANDB_MODES:
        raise ConfigError(f"logger.wandb={cfg.logger.wandb!r} is invalid: allowed are {', '.join(WANDB_MODES)}")
    if not cfg.tasks:
        raise ConfigError("tasks is empty: name at least one task (e.g. tasks=[piqa_local])")
    for t in cfg.tasks:
        if not isinstance(t, str) or not t:
            raise ConfigError(f"task {t!r} is invalid: allowed is a task name (e.g. tasks=[piqa_local])")
    for key in ("experiment_name", "run_id"):
        value = cfg[key]
        if not isinstance(value, str) or not NAME_RE.match(value) or value in (".", ".."):
            raise ConfigError(f"{key}={value!r} is invalid: allowed are letters, digits, '.', '-' and '_' "
                              "(it names a folder)")
    tasks_dir = Path(cfg.tasks_dir)
    if not tasks_dir.is_dir():
        raise ConfigError(f"tasks_dir={str(tasks_dir)!r} does not exist")
    if machine and any(t.endswith("_local") for t in cfg.tasks):
        from .data import data_dir

        data = data_dir(cfg.data_dir)
        if not data.is_dir():
            raise ConfigError(f"data folder {str(data)!r} does not exist: run `python -m alisa.data prepare` "
                              "(or set data_dir= / $ALISA_DATA_DIR)")
    return points
