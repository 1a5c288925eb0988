"""CI accuracy guard: compare a run of ``ci_regression`` with the golden file.

    python -m alisa.regression check RESULTS_DIR [--golden FILE]   # exit 1 and list what moved
    python -m alisa.regression update [RESULTS_DIR] [--golden FILE] # rewrite the golden file on purpose

Tolerances are stated in the golden file: dense must reproduce exactly on the same
machine (up to float summation noise); sparse policies may differ by one document in
accuracy (a near-tie flipping) and slightly in perplexity.

Exit codes: 0 the run matches, 1 a metric moved (or the CI run failed), 2 bad input: a bad
argument, a golden file that is unreadable or malformed, or a run that is not comparable
with the golden file (another experiment or model, other document counts, no common
metric). Errors are one line on stderr: ``error: <what> <value>: allowed <...>``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .report import scan_records
from .results import REPO, UnreadableFile, read_json_file, write_json

GOLDEN = REPO / "results" / "golden" / "ci_regression.json"
TOLERANCE = {
    # dense: accuracy identical; perplexity up to float summation noise (another CPU's BLAS: the
    # first WikiText article's word perplexity is 52.4808 on one CI machine, 52.4814 on another, 1.1e-5).
    "dense": {"docs": 0, "rel": 1e-4},
    # sparse: one document may flip where a top-k choice is a near-tie; perplexity relative.
    "sparse": {"docs": 1, "rel": 1e-3},
}
USAGE = "check RESULTS_DIR [--golden FILE], update [RESULTS_DIR] [--golden FILE]"
RESTORE = "restore it from git or rewrite it with `python -m alisa.regression update`"


class GoldenError(ValueError):
    """Bad input (exit 2): a golden file or results folder that cannot be used; one line."""


class NotComparable(GoldenError):
    """The run and the golden file measure different things."""


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _records(run_dir: Path) -> tuple[list[dict], list[str], list[dict]]:
    """(successful records, skipped-file lines, failure records) of a results folder."""
    run_dir = Path(run_dir)
    if not (run_dir / "points").is_dir():
        what = "does not exist" if not run_dir.exists() else "has no points/ folder"
        raise GoldenError(f"results folder {str(run_dir)!r} {what}: allowed a run folder of ci_regression "
                          "(results/ci_regression/<run id>)")
    records, skipped = scan_records(run_dir)
    ok = [r for r in records if r.get("status", "ok") == "ok" and r.get("kind", "lm_eval") != "throughput"]
    return ok, skipped, [r for r in records if r.get("status", "ok") != "ok"]


def snapshot(run_dir: Path, records: list[dict] | None = None) -> dict:
    if records is None:
        records = _records(run_dir)[0]
    if not records:
        raise GoldenError(f"results folder {str(run_dir)!r} holds no results (no readable points/*.json): "
                          "allowed a run folder of ci_regression")
    values = {}
    for r in records:
        for name, m in r["metrics"].items():
            values[f"{r['point_id']}/{r['task']}/{name}"] = {"value": m["value"], "n_docs": r["n_docs"]}
    first = records[0]
    experiments = sorted({str(r.get("experiment")) for r in records})
    models = sorted({r["model"]["name"] for r in records})
    return {"experiment": experiments[0] if len(experiments) == 1 else experiments,
            "model": models[0] if len(models) == 1 else models, "git_commit": first.get("git_commit"),
            "versions": first.get("versions"), "hardware": first["hardware"], "tolerance": TOLERANCE, "values": values}


def _golden_problem(golden) -> str | None:
    """What is wrong with a parsed golden file, as '<field> <value>: allowed <...>', or None."""
    if not isinstance(golden, dict):
        return f"is a JSON {type(golden).__name__}: allowed an object with 'tolerance' and 'values'"
    tol = golden.get("tolerance")
    if not isinstance(tol, dict):
        return f"has tolerance {tol!r}: allowed {{'dense': {{'docs': N, 'rel': X}}, 'sparse': {{...}}}}"
    for kind in ("dense", "sparse"):
        t = tol.get(kind)
        if not isinstance(t, dict):
            return f"has tolerance.{kind} {t!r}: allowed {{'docs': an integer >= 0, 'rel': a number >= 0}}"
        docs, rel = t.get("docs"), t.get("rel")
        if not (isinstance(docs, int) and not isinstance(docs, bool) and docs >= 0):
            return f"has tolerance.{kind}.docs {docs!r}: allowed an integer >= 0"
        if not (_is_num(rel) and rel >= 0):
            return f"has tolerance.{kind}.rel {rel!r}: allowed a number >= 0"
    values = golden.get("values")
    if not isinstance(values, dict) or not values:
        return f"has values {values!r}: allowed a non-empty object of '<point>/<task>/<metric>': {{value, n_docs}}"
    for key, v in values.items():
        if key.count("/") < 2:
            return f"has values key {key!r}: allowed '<point>/<task>/<metric>'"
        if not isinstance(v, dict) or not _is_num(v.get("value")):
            return f"has values[{key!r}] {v!r}: allowed {{'value': a number, 'n_docs': an integer or null}}"
        n = v.get("n_docs")
        if n is not None and not (isinstance(n, int) and not isinstance(n, bool) and n >= 0):
            return f"has values[{key!r}].n_docs {n!r}: allowed an integer >= 0 or null"
    for key in ("experiment", "model"):
        if key in golden and not isinstance(golden[key], str):
            return f"has {key} {golden[key]!r}: allowed a name"
    return None


def load_golden(path: Path = GOLDEN) -> dict:
    path = Path(path)
    if not path.exists():
        raise GoldenError(f"golden file {str(path)!r} does not exist: create it with `python -m alisa.regression update`")
    try:
        golden = read_json_file(path, "golden file")
    except UnreadableFile as e:
        raise GoldenError(f"{e} — the golden file is corrupt: {RESTORE}") from None
    problem = _golden_problem(golden)
    if problem:
        raise GoldenError(f"golden file {str(path)!r} is corrupt: it {problem}; {RESTORE}")
    return golden


def comparable(now: dict, golden: dict, run_dir: Path, golden_path: Path | str = "the golden file") -> None:
    """NotComparable (one line) when the run cannot be judged against the golden file at all."""
    where = f"run {str(run_dir)!r} and golden file {str(golden_path)!r}"
    for key in ("experiment", "model"):
        want, got = golden.get(key), now.get(key)
        if want is not None and got != want:
            raise NotComparable(f"{where} are not comparable: {key} {got!r}, allowed {want!r} "
                                f"(run `python -m alisa.eval +experiment={golden.get('experiment', 'ci_regression')}`)")
    common = set(now["values"]) & set(golden["values"])
    if not common:
        raise NotComparable(f"{where} are not comparable: no metric in common (the run has "
                            f"{len(now['values'])}, the golden file {len(golden['values'])})")
    docs = sorted(k for k in common if golden["values"][k].get("n_docs") != now["values"][k]["n_docs"])
    if docs:
        k = docs[0]
        raise NotComparable(f"{where} are not comparable: {len(docs)} metric(s) scored on another number of documents, "
                            f"e.g. {k} n_docs {now['values'][k]['n_docs']}, allowed {golden['values'][k]['n_docs']} "
                            "(another limit?)")


def compare(run_dir: Path, golden: dict, golden_path: Path | str = "the golden file") -> list[str]:
    """Every metric that moved beyond tolerance, one line each; empty when the run matches.
    Raises NotComparable when the run is of something else."""
    now = snapshot(run_dir)
    comparable(now, golden, run_dir, golden_path)
    tol = golden["tolerance"]
    problems = []
    now = now["values"]
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


class _Usage(GoldenError):
    pass


def _parse(argv: list[str]) -> tuple[str, Path | None, Path]:
    """(command, results folder or None, golden file); _Usage (one line) on anything else."""
    golden: Path | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a == "--golden" or a.startswith("--golden="):
            value = a.split("=", 1)[1] if "=" in a else (argv[i + 1] if i + 1 < len(argv) else None)
            if not value or value.startswith("-"):
                raise _Usage("--golden needs a file: allowed --golden FILE (default results/golden/ci_regression.json)")
            if golden is not None:
                raise _Usage(f"--golden given twice ({golden}, {value}): allowed one --golden FILE")
            golden = Path(value)
            i += 1 if "=" in a else 2
            continue
        if a.startswith("-"):
            raise _Usage(f"unknown option {a!r}: allowed --golden FILE")
        rest.append(a)
        i += 1
    if not rest:
        raise _Usage(f"no command given: allowed {USAGE}")
    cmd, args = rest[0], rest[1:]
    if cmd not in ("check", "update"):
        raise _Usage(f"unknown command {cmd!r}: allowed {USAGE}")
    if cmd == "check" and len(args) != 1:
        raise _Usage(f"check takes one results folder, got {len(args)}: allowed check RESULTS_DIR [--golden FILE]")
    if cmd == "update" and len(args) > 1:
        raise _Usage(f"update takes at most one results folder, got {len(args)}: allowed update [RESULTS_DIR] [--golden FILE]")
    return cmd, Path(args[0]) if args else None, golden or GOLDEN


def _warn_skipped(skipped: list[str]) -> None:
    for line in skipped:
        print(f"warning: {line}", file=sys.stderr)


def check(run_dir: Path, golden_path: Path = GOLDEN) -> int:
    golden = load_golden(golden_path)
    records, skipped, failed = _records(run_dir)
    _warn_skipped(skipped)
    for r in failed:
        print(f"warning: {r['point_id']}/{r['task']} failed in the run ({r.get('error')})", file=sys.stderr)
    problems = compare(run_dir, golden, golden_path)
    for p in problems:
        print(f"regression: {p}", file=sys.stderr)
    print(f"{'FAILED' if problems else 'ok'}: {len(problems)} metric(s) moved beyond tolerance vs {golden_path}")
    return 1 if problems else 0


def update(run_dir: Path | None, golden_path: Path = GOLDEN) -> int:
    if run_dir is None:
        run_dir = _run_ci_experiment(REPO / "results")
    records, skipped, failed = _records(run_dir)
    if skipped or failed:
        _warn_skipped(skipped)
        raise GoldenError(f"results folder {str(run_dir)!r} has {len(skipped)} unreadable and {len(failed)} failed "
                          "record(s): allowed a complete run of ci_regression (the golden file is unchanged)")
    snap = snapshot(run_dir, records)
    if golden_path.exists():
        try:
            old = load_golden(golden_path)
        except GoldenError:
            old = None  # a corrupt golden file is what `update` repairs
        if old is not None and old.get("experiment") not in (None, snap["experiment"]):
            raise NotComparable(f"results folder {str(run_dir)!r} is experiment {snap['experiment']!r}: allowed "
                                f"{old['experiment']!r}, the experiment of {str(golden_path)!r} (unchanged)")
    write_json(golden_path, snap)
    print(f"wrote {golden_path} from {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv in (["-h"], ["--help"]):
        print("usage:\n" + "\n".join(__doc__.strip().splitlines()[2:4]))
        return 0
    try:
        cmd, run_dir, golden_path = _parse(argv)
        if cmd == "check":
            return check(run_dir, golden_path)
        return update(run_dir, golden_path)
    except GoldenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or 'file'} cannot be written or read ({e.strerror or e}): allowed a writable path",
              file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - never a traceback to users
        from .config import ConfigError

        if isinstance(e, ConfigError):
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"error: {e}" if type(e).__name__ == "PointsFailed" else f"error: {e.__class__.__name__}: {e}",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
