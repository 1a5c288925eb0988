"""Accuracy harness: ``python -m alisa.eval +experiment=NAME [overrides]``.

Runs the experiment's grid of (policy, sparsity or budget) × tasks with lm-eval, the
model loaded once, and writes ``results/<experiment>/<run id>/``: the resolved config,
one JSON per (grid point, task), ``summary.csv``, plots, and W&B runs (offline by
default). ``python -m alisa.report DIR`` redraws the summary and plots from the JSON.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
from pathlib import Path

from omegaconf import OmegaConf

from .config import REPO, ConfigError, point_id, policy_kwargs, register_configs, validate
from .results import git_commit, hardware, versions, write_atomic, write_json

log = logging.getLogger("alisa.eval")
CONF_DIR = REPO / "conf"
PRIMARY = ("acc", "exact_match", "word_perplexity")


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


def run_experiment(cfg) -> Path:
    """Run the grid; returns the results folder. Raises ConfigError on bad input, before any output."""
    points = validate(cfg)
    if cfg.data_dir:
        os.environ["ALISA_DATA_DIR"] = str(cfg.data_dir)
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=cfg.tasks_dir)
    local = sorted(t for t in tm.all_tasks if t.endswith("_local"))
    for t in cfg.tasks:
        if t not in tm.all_tasks:
            raise ConfigError(f"unknown task {t!r}: local tasks are {', '.join(local)} (or any stock lm-eval task name)")
    run_id = cfg.run_id or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(cfg.results_dir) / cfg.experiment_name / run_id
    if run_dir.exists():
        raise ConfigError(f"results folder {str(run_dir)!r} already exists: choose another run_id")
    _check_writable(Path(cfg.results_dir))

    from .lm_eval_model import AlisaLM
    from .models import load_model
    from .report import rebuild
    from .wandb_log import WandbLogger

    try:
        model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if tok is None:
        raise ConfigError(f"model.name={cfg.model.name!r} has no tokenizer (random weights): accuracy needs a real model")
    run_dir.mkdir(parents=True)
    write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    common = {
        "experiment": cfg.experiment_name, "run_id": run_id,
        "model": {"name": cfg.model.name, "dtype": str(model.dtype).removeprefix("torch."), "device": cfg.model.device,
                  "random_weights": cfg.model.name.startswith("random:")},
        "seed": cfg.seed, "prefill": cfg.grid.prefill, "max_length": cfg.max_length,
        "git_commit": git_commit(), "versions": versions(), "hardware": hardware(cfg.model.device),
    }
    logger = WandbLogger(cfg.logger, run_dir, cfg.experiment_name)
    from lm_eval import simple_evaluate
    from tqdm import tqdm

    try:
        bar = tqdm(total=len(points) * len(cfg.tasks), desc=cfg.experiment_name, unit="eval", file=sys.stderr)
        for p in points:
            records = []
            for task in cfg.tasks:
                bar.set_postfix_str(f"{point_id(p)} {task}")
                lm = AlisaLM(pretrained=model, tokenizer=tok, policy=p["policy"], prefill=cfg.grid.prefill,
                             batch_size=cfg.batch_size, max_length=cfg.max_length, **policy_kwargs(p))
                limit = cfg.task_limits.get(task, cfg.limit)
                t0 = time.perf_counter()
                try:
                    out = simple_evaluate(model=lm, tasks=[task], num_fewshot=cfg.num_fewshot, limit=limit,
                                          task_manager=tm, random_seed=cfg.seed, numpy_random_seed=cfg.seed,
                                          torch_random_seed=cfg.seed, fewshot_random_seed=cfg.seed,
                                          bootstrap_iters=1000, log_samples=False, verbosity="WARNING")
                finally:
                    lm.close()
                wall = time.perf_counter() - t0
                metrics = _metrics(out["results"][task])
                kept = lm.kept_fraction()
                rec = {**common, **p, "point_id": point_id(p), "task": task, "metrics": metrics, "limit": limit,
                       "primary_metric": primary_metric(metrics),
                       "num_fewshot": out.get("n-shot", {}).get(task, cfg.num_fewshot),
                       "n_docs": out.get("n-samples", {}).get(task, {}).get("effective"),
                       "n_docs_total": out.get("n-samples", {}).get(task, {}).get("original"),
                       "kept_fraction": {"overall": kept["overall"],
                                         "per_layer": [kept["per_layer"][k] for k in sorted(kept["per_layer"])]},
                       "wall_time_s": wall,
                       "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()}
                write_json(run_dir / "points" / f"{point_id(p)}__{task}.json", rec)
                records.append(rec)
                bar.update()
            logger.log_point(p, records)
        bar.close()
        summary = rebuild(run_dir, echo=True)
        logger.log_summary(summary)
    finally:
        logger.finish()
    return run_dir


def _check_writable(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f".write-probe-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"results_dir={str(root)!r} cannot be written ({e.strerror})") from None


def _experiment_names() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def precheck(argv: list[str]) -> None:
    """One-line errors for what Hydra would report in many lines: unknown experiment, bad keys or types."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    for a in argv:
        if a.lstrip("+").startswith("experiment="):
            name = a.split("=", 1)[1]
            if name not in _experiment_names():
                raise ConfigError(f"unknown experiment {name!r}: allowed are {', '.join(_experiment_names())}")
    if any(a in ("-m", "--multirun") or a.startswith("hydra") or a.startswith("-") for a in argv):
        return  # sweeps and Hydra flags: Hydra checks them itself
    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="config", overrides=argv)
    except OverrideParseException as e:
        raise ConfigError(f"malformed override {e.override!r}: {_one_line(e)} (write lists as key=[a,b])") from None
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(_one_line(e)) from None


def _one_line(e: BaseException) -> str:
    """Hydra's error, its cause, and the keys allowed where a key was unknown, on one line."""
    import dataclasses

    lines = [l.strip() for l in str(e).strip().splitlines() if l.strip()]
    msg = lines[0].rstrip(".") + (f" {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else "")
    cause = e.__cause__
    if cause is not None and str(cause).strip():
        msg += ": " + str(cause).strip().splitlines()[0]
        typ = getattr(cause, "object_type", None)
        if "not in" in str(cause) and dataclasses.is_dataclass(typ):
            msg += f" (allowed keys: {', '.join(f.name for f in dataclasses.fields(typ))})"
    return msg


def main() -> None:
    import hydra

    register_configs()

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
    def _main(cfg) -> None:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hc = HydraConfig.get()
        if hc.mode == RunMode.MULTIRUN and cfg.run_id is None:  # jobs of one sweep start in the same second
            cfg.run_id = f"{dt.datetime.now():%Y%m%d-%H%M%S}-job{hc.job.num}"
        try:
            run_experiment(cfg)
        except ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)

    try:
        precheck(sys.argv[1:])
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    _main()


if __name__ == "__main__":
    main()
