"""Summaries and plots, drawn from the JSON records alone.

    python -m alisa.report results/<experiment>/<run id>

rewrites ``summary.csv`` and ``plots/*.png`` and prints the table.
"""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path

from .results import read_json, write_atomic


def _all_records(run_dir: Path) -> list[dict]:
    return [read_json(f) for f in sorted((Path(run_dir) / "points").glob("*.json"))]


def load_records(run_dir: Path) -> list[dict]:
    """The successful (point, task) records of a run (records without a status predate failure records)."""
    return [r for r in _all_records(run_dir) if r.get("status", "ok") == "ok"]


def load_failures(run_dir: Path) -> list[dict]:
    """The failure records (status failed: error, traceback) of a run; a rerun retries them."""
    return [r for r in _all_records(run_dir) if r.get("status", "ok") != "ok"]


def failure_lines(failures: list[dict]) -> list[str]:
    return [f"FAILED {r['point_id']} {r['task']}: {r.get('error')}" for r in failures]


def _setting(r: dict) -> str:
    if r["policy"] == "dense":
        return "dense"
    return f"{r['policy']}@{r['sparsity']:g}" if r.get("budget") is None else f"{r['policy']}@B{r['budget']}"


def summary_rows(records: list[dict]) -> list[dict]:
    rows = []
    for r in records:
        for name, m in sorted(r["metrics"].items()):
            rows.append({"point_id": r["point_id"], "policy": r["policy"], "sparsity": r.get("sparsity"),
                         "budget": r.get("budget"), "task": r["task"], "metric": name, "value": m["value"],
                         "stderr": m["stderr"], "primary": name == r["primary_metric"], "n_docs": r.get("n_docs"),
                         "num_fewshot": r.get("num_fewshot"), "kept_fraction": r["kept_fraction"]["overall"],
                         "wall_time_s": r.get("wall_time_s")})
    return rows


def table(records: list[dict]) -> str:
    """Primary metric ± stderr per (setting, task), with the measured kept fraction."""
    tasks = sorted({r["task"] for r in records})
    settings = sorted({_setting(r) for r in records}, key=lambda s: (s != "dense", s))
    cell = {(_setting(r), r["task"]): r for r in records}
    head = ["setting", *[f"{t} ({next(r['primary_metric'] for r in records if r['task'] == t)})" for t in tasks], "kept", "wall s"]
    lines = [head]
    for s in settings:
        row, kept, wall = [s], [], 0.0
        for t in tasks:
            r = cell.get((s, t))
            if r is None:
                row.append("-")
                continue
            m = r["metrics"][r["primary_metric"]]
            row.append(f"{m['value']:.4f}" + (f" ± {m['stderr']:.4f}" if m["stderr"] is not None else ""))
            if r["kept_fraction"]["overall"] is not None:
                kept.append(r["kept_fraction"]["overall"])
            wall += r.get("wall_time_s") or 0.0
        row += [f"{sum(kept) / len(kept):.3f}" if kept else "-", f"{wall:.0f}"]
        lines.append(row)
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(head))]
    fmt = lambda l: "  ".join(str(c).ljust(w) for c, w in zip(l, widths))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def plot_accuracy(records: list[dict], path: Path) -> Path | None:
    """Primary metric vs KV sparsity: one panel per task, one line per policy (dense at 0, error bars = stderr)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in records})
    if not tasks:
        return None
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    dense = {r["task"]: r for r in records if r["policy"] == "dense"}
    policies = sorted({r["policy"] for r in records if r["policy"] != "dense" and r.get("budget") is None})
    for ax, task in zip(axes[0], tasks):
        metric = next(r["primary_metric"] for r in records if r["task"] == task)
        for i, pol in enumerate(policies):
            pts = sorted((r["sparsity"], r["metrics"][metric]) for r in records
                         if r["task"] == task and r["policy"] == pol and r.get("budget") is None)
            if not pts:
                continue
            dx = 0.006 * (i - (len(policies) - 1) / 2)  # side by side, so error bars do not hide each other
            line = ax.errorbar([s + dx for s, _ in pts], [m["value"] for _, m in pts],
                               yerr=[m["stderr"] or 0.0 for _, m in pts], marker="o", capsize=3, label=pol)
            if task in dense and pts[0][0] > 0:  # sparsity 0 is exactly dense for every policy
                ax.plot([0.0, pts[0][0] + dx], [dense[task]["metrics"][metric]["value"], pts[0][1]["value"]],
                        color=line[0].get_color(), linewidth=1, alpha=0.6)
        if task in dense:
            m = dense[task]["metrics"][metric]
            ax.axhline(m["value"], color="black", linestyle="--", linewidth=1)
            ax.errorbar([0.0], [m["value"]], yerr=[m["stderr"] or 0.0], color="black", marker="s", capsize=3, label="dense")
        n_docs = next((r.get("n_docs") for r in records if r["task"] == task), None)
        ax.set_title(f"{task} (n={n_docs}, {next(r.get('num_fewshot') for r in records if r['task'] == task)}-shot)")
        ax.set_xlabel("KV sparsity")
        ax.set_ylabel(metric)
        if metric.endswith("perplexity"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    model = records[0]["model"]["name"]
    fig.suptitle(f"{records[0]['experiment']}: {model}, measured on {records[0]['hardware']['device']}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def rebuild(run_dir: Path, echo: bool = False) -> dict:
    """Rewrite summary.csv and the plots of ``run_dir`` from its JSON records."""
    run_dir = Path(run_dir)
    everything = _all_records(run_dir)
    records = [r for r in everything if r.get("status", "ok") == "ok"]
    failed = [r for r in everything if r.get("status", "ok") != "ok"]
    if not records:
        raise ValueError(f"{str(run_dir)!r} holds no results (no successful points/*.json"
                         + (f"; {len(failed)} failed)" if failed else ")"))
    rows = summary_rows(records)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomic(run_dir / "summary.csv", buf.getvalue())
    text = "\n".join([table(records), *failure_lines(failed)])
    write_atomic(run_dir / "summary.txt", text + "\n")
    plot = plot_accuracy(records, run_dir / "plots" / "accuracy_vs_sparsity.png")
    if echo:
        print(text)
        print(f"results: {run_dir}")
    return {"records": records, "failures": failed, "rows": rows, "table": text, "plots": [p for p in [plot] if p]}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m alisa.report RESULTS_DIR", file=sys.stderr)
        return 2
    try:
        rebuild(Path(argv[0]), echo=True)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
