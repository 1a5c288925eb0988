"""CI accuracy guard: compare a run of ``ci_regression`` with the golden file.

    python -m alisa.regression check RESULTS_DIR [--golden FILE]   # exit 1 and list what moved
    python -m alisa.regression update [RESULTS_DIR]                # rewrite the golden file on purpose

Tolerances are stated in the golden file: dense must reproduce exactly on the same
machine (up to float summation noise); sparse policies may differ by one document in
accuracy (a near-tie flipping) and slightly in perplexity.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .report import load_records
from .results import REPO, read_json, write_json

GOLDEN = REPO / "results" / "golden" / "ci_regression.json"
TOLERANCE = {
    # dense: accuracy identical; perplexity up to float summation noise (another CPU's BLAS).
    "dense": {"docs": 0, "rel": 1e-5},
    # sparse: one document may flip where a top-k choice is a near-tie; perplexity relative.
    "sparse": {"docs": 1, "rel": 1e-3},
}


class GoldenError(ValueError):
    pass


def snapshot(run_dir: Path) -> dict:
    records = load_records(run_dir)
    if not records:
        raise GoldenError(f"{str(run_dir)!r} holds no results (no points/*.json)")
    values = {}
    for r in records:
        for name, m in r["metrics"].items():
            values[f"{r['point_id']}/{r['task']}/{name}"] = {"value": m["value"], "n_docs": r["n_docs"]}
    first = records[0]
    return {"experiment": first["experiment"], "model": first["model"]["name"], "git_commit": first["git_commit"],
            "versions": first["versions"], "hardware": first["hardware"], "tolerance": TOLERANCE, "values": values}


def load_golden(path: Path = GOLDEN) -> dict:
    try:
        golden = read_json(path)
    except FileNotFoundError:
        raise GoldenError(f"golden file {str(path)!r} does not exist: create it with `python -m alisa.regression update`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GoldenError(f"golden file {str(path)!r} is corrupt ({e.__class__.__name__}): "
                          "restore it from git or rewrite it with `python -m alisa.regression update`") from None
    if not isinstance(golden, dict) or not isinstance(golden.get("values"), dict) or "tolerance" not in golden:
        raise GoldenError(f"golden file {str(path)!r} is corrupt (no 'values'/'tolerance'): restore it from git "
                          "or rewrite it with `python -m alisa.regression update`")
    return golden


def compare(run_dir: Path, golden: dict) -> list[str]:
    """Every metric that moved beyond tolerance, one line each; empty when the run matches."""
    now = snapshot(run_dir)["values"]
    tol = golden["tolerance"]
    problems = []
    for key, want in sorted(golden["values"].items()):
        if key not in now:
            problems.append(f"{key}: missing from the run")
            continue
        got, ref = now[key]["value"], want["value"]
        metric = key.rsplit("/", 1)[1]
        t = tol["dense"] if key.startswith("dense-") else tol["sparse"]
        if metric in ("acc", "acc_norm", "exact_match"):
            ok = abs(got - ref) <= t["docs"] / max(1, want["n_docs"] or 1) + 1e-12
        else:
            ok = abs(got - ref) <= t["rel"] * abs(ref)
        if not ok:
            problems.append(f"{key}: {got:.6g} vs golden {ref:.6g}")
    return problems


def _run_ci_experiment(results_dir: Path) -> Path:
    from hydra import compose, initialize_config_dir

    from .config import register_configs
    from .eval import CONF_DIR, run_experiment

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        # a fresh run id: the golden numbers must come from this code, never from resumed records
        run_id = f"regression-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        cfg = compose(config_name="config", overrides=["+experiment=ci_regression", f"results_dir={results_dir}",
                                                       f"run_id={run_id}"])
    return run_experiment(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    golden_path = GOLDEN
    if "--golden" in argv:
        i = argv.index("--golden")
        golden_path = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
    try:
        if argv[:1] == ["check"] and len(argv) == 2:
            problems = compare(Path(argv[1]), load_golden(golden_path))
            for p in problems:
                print(f"regression: {p}", file=sys.stderr)
            print(f"{'FAILED' if problems else 'ok'}: {len(problems)} metric(s) moved beyond tolerance vs {golden_path}")
            return 1 if problems else 0
        if argv[:1] == ["update"] and len(argv) <= 2:
            run_dir = Path(argv[1]) if len(argv) == 2 else _run_ci_experiment(REPO / "results")
            write_json(golden_path, snapshot(run_dir))
            print(f"wrote {golden_path} from {run_dir}")
            return 0
    except (GoldenError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("usage:\n" + "\n".join(__doc__.strip().splitlines()[2:4]), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
