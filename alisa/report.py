"""Summaries and plots, drawn from the JSON records alone.

    python -m alisa.report results/<experiment>/<run id>

rewrites ``summary.csv`` and ``plots/*.png`` and prints the table. Where the run has accuracy and
throughput records, also the Pareto fronts and the ranked leaderboard (``leaderboard.csv``,
``leaderboard.json``: accuracy per task, mean, the engine's decode tokens/s and peak KV); where
records carry per-document needle results (the passkey tasks), one depth x length heat map of
retrieval accuracy per policy (``plots/needle_heatmap_<policy>.png``, one panel per sparsity,
data in ``needle_heatmap.json``).

Every record is checked before use: one that is not valid JSON or lacks what the report
reads is skipped and listed (one line naming the file, on stderr and in ``summary.txt``),
never a crash. Records of the same run made with different workload settings (another
``limit``, ``prompt``, ``new_tokens``...) are marked in the table, the CSV and the plot
titles, with one warning line.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path

from .results import UnreadableFile, read_json_file, write_atomic

USAGE = "python -m alisa.report RESULTS_DIR"


class NoResults(ValueError):
    """The folder holds no successful record. ``exit_code``: 1 if its points all failed, else 2."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def _num(v, none: bool = True) -> bool:
    """A real number (not a bool), or None where ``none``."""
    return (v is None and none) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _check_record(r) -> None:
    """ValueError naming the first field the report needs and ``r`` lacks (or has the wrong type)."""
    _check(isinstance(r, dict), f"a JSON {type(r).__name__}, not a record object")
    status = r.get("status", "ok")
    _check(isinstance(status, str), f"status {status!r} is not a string")
    for key in ("point_id", "task"):
        _check(isinstance(r.get(key), str), f"{key} {r.get(key)!r} is not a string")
    if status != "ok":
        return
    _check(isinstance(r.get("policy"), str), f"policy {r.get('policy')!r} is not a string")
    _check(_num(r.get("budget")), f"budget {r.get('budget')!r} is not a number")
    _check(_num(r.get("sparsity"), none=r["policy"] == "dense" or r.get("budget") is not None),
           f"sparsity {r.get('sparsity')!r} is not a number")
    _check(_num(r.get("wall_time_s")), f"wall_time_s {r.get('wall_time_s')!r} is not a number")
    _check(isinstance(r.get("model"), dict) and isinstance(r["model"].get("name"), str), "model.name is missing")
    _check(isinstance(r.get("hardware"), dict) and isinstance(r["hardware"].get("device"), str),
           "hardware.device is missing")
    if is_throughput(r):
        t, w = r.get("throughput"), r.get("workload")
        _check(isinstance(t, dict), "throughput is missing")
        _check(isinstance(t.get("system"), str), f"throughput.system {t.get('system')!r} is not a string")
        _check(isinstance(t.get("status", "?"), str), "throughput.status is not a string")
        for k in (*THROUGHPUT_FIELDS, "decode_s", "seconds_transfer", "seconds_recompute", "predicted_vs_measured_decode",
                  "kept_fraction"):
            _check(_num(t.get(k)), f"throughput.{k} {t.get(k)!r} is not a number")
        _check(t.get("tokens_recomputed") is None or isinstance(t["tokens_recomputed"], int),
               "throughput.tokens_recomputed is not an integer")
        kv = t.get("kv_bytes_peak")
        _check(kv is None or (isinstance(kv, dict) and _num(kv.get("device")) and _num(kv.get("host"))),
               "throughput.kv_bytes_peak is not {device, host} numbers")
        _check(isinstance(w, dict) and all(isinstance(w.get(k), int) and not isinstance(w.get(k), bool)
                                           for k in ("batch", "prompt", "new_tokens")),
               "workload {batch, prompt, new_tokens} is missing")
        return
    m = r.get("metrics")
    _check(isinstance(m, dict) and m, "metrics is missing or empty")
    for name, v in m.items():
        _check(isinstance(v, dict) and _num(v.get("value"), none=False) and _num(v.get("stderr")),
               f"metric {name!r} is not {{value, stderr}} numbers")
    _check(r.get("primary_metric") in m, f"primary_metric {r.get('primary_metric')!r} is not among the metrics")
    k = r.get("kept_fraction")
    _check(isinstance(k, dict) and _num(k.get("overall")), "kept_fraction.overall is missing")
    for key in ("n_docs", "num_fewshot"):
        _check(r.get(key) is None or (isinstance(r[key], int) and not isinstance(r[key], bool)),
               f"{key} {r.get(key)!r} is not an integer")
    needles = r.get("needle_docs")
    if needles is not None:
        metric = r["primary_metric"]
        _check(isinstance(needles, list) and all(
            isinstance(d, dict) and isinstance(d.get("doc_id"), int) and isinstance(d.get("task", ""), str)
            and all(_num(d.get(k), none=False) for k in ("depth", "length", metric)) for d in needles),
            f"needle_docs is not a list of {{task, doc_id, depth, length, {metric}}}")


def record_problem(r) -> str | None:
    """Why ``r`` (parsed JSON) is not a record the report can use, or None."""
    try:
        _check_record(r)
    except ValueError as e:
        return str(e)
    return None


def scan_records(run_dir: Path) -> tuple[list[dict], list[str]]:
    """(every readable record of ``run_dir/points``, one line per file skipped: ``skipped <file>: <why>``)."""
    records, skipped = [], []
    for f in sorted((Path(run_dir) / "points").glob("*.json")):
        try:
            r = read_json_file(f, "record")
            _check_record(r)
        except UnreadableFile as e:
            skipped.append(f"skipped {e}")
            continue
        except ValueError as e:
            skipped.append(f"skipped record {f}: {e}")
            continue
        records.append(r)
    return records, skipped


def _all_records(run_dir: Path) -> list[dict]:
    return scan_records(run_dir)[0]


# Identity keys that differ between the records of one run by design (the grid and the task list).
_BY_DESIGN = {"v", "kind", "policy", "sparsity", "budget", "task", "system", "batch"}
_PER_TASK = {"limit"}  # may differ between tasks (task_limits), never within one task


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _show(v) -> str:
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    return json.dumps(v) if isinstance(v, (list, dict, str)) and not isinstance(v, str) else str(v)


def _settings(r: dict) -> dict[str, str]:
    ident = r.get("identity") if isinstance(r.get("identity"), dict) else {}
    out = {k: _show(v) for k, v in _flat(ident).items() if k not in _BY_DESIGN}
    out["experiment"] = _show(r.get("experiment"))
    return out


def mixed_settings(records: list[dict]) -> dict[str, list[str]]:
    """Workload settings whose value differs between records that one table compares:
    {setting: [values]} (per kind of record; ``limit`` within each task only)."""
    seen: dict[tuple, set[str]] = {}
    for r in records:
        for k, v in _settings(r).items():
            seen.setdefault((r.get("kind", "lm_eval"), k, r["task"] if k in _PER_TASK else None), set()).add(v)
    mixed: dict[str, set[str]] = {}
    for (_, k, _), values in seen.items():
        if len(values) > 1:
            mixed.setdefault(k, set()).update(values)
    return {k: sorted(v, key=_value_order) for k, v in sorted(mixed.items())}


def _value_order(v: str):
    try:
        return (0, float(v), v)
    except ValueError:
        return (1, 0.0, v)


def marks(r: dict, mixed: dict | None) -> str:
    """This record's values of the mixed settings, ``limit=3, prompt=128`` ('' when nothing is mixed)."""
    if not mixed:
        return ""
    mine = _settings(r)
    return ", ".join(f"{k}={mine[k]}" for k in mixed if k in mine)


def mixed_line(mixed: dict) -> str:
    return "; ".join(f"{k} ({', '.join(v)})" for k, v in mixed.items())


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


THROUGHPUT_FIELDS = ("throughput_tok_s", "decode_tok_s", "prefill_s", "step_s_mean", "bytes_h2d", "bytes_d2h",
                     "tokens_recomputed")


def is_throughput(r: dict) -> bool:
    return r.get("kind") == "throughput"


def split(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """(accuracy records, throughput records)."""
    return [r for r in records if not is_throughput(r)], [r for r in records if is_throughput(r)]


def kv_device(t: dict) -> float | None:
    kv = t.get("kv_bytes_peak") or {}
    return kv.get("device")


def summary_rows(records: list[dict], mixed: dict | None = None) -> list[dict]:
    """One CSV row per (record, metric); with mixed settings a ``settings`` column holds each record's values."""
    rows = []
    for r in records:
        if is_throughput(r):
            t = r["throughput"]
            values = {k: t.get(k) for k in THROUGHPUT_FIELDS}
            values["kv_device_bytes_peak"] = kv_device(t)
            values["kv_host_bytes_peak"] = (t.get("kv_bytes_peak") or {}).get("host")
            for name, v in values.items():
                rows.append({"point_id": r["point_id"], "policy": r["policy"], "sparsity": r.get("sparsity"),
                             "budget": r.get("budget"), "task": r["task"], "metric": name, "value": v, "stderr": None,
                             "primary": name == "decode_tok_s", "n_docs": None, "num_fewshot": None,
                             "kept_fraction": t.get("kept_fraction"), "wall_time_s": r.get("wall_time_s"),
                             "status": t.get("status")})
            continue
        for name, m in sorted(r["metrics"].items()):
            rows.append({"point_id": r["point_id"], "policy": r["policy"], "sparsity": r.get("sparsity"),
                         "budget": r.get("budget"), "task": r["task"], "metric": name, "value": m["value"],
                         "stderr": m["stderr"], "primary": name == r["primary_metric"], "n_docs": r.get("n_docs"),
                         "num_fewshot": r.get("num_fewshot"), "kept_fraction": r["kept_fraction"]["overall"],
                         "wall_time_s": r.get("wall_time_s"), "status": "ok"})
    if mixed:
        m = {(r["point_id"], r["task"]): marks(r, mixed) for r in records}
        rows = [{**row, "settings": m[(row["point_id"], row["task"])]} for row in rows]
    return rows


def table(records: list[dict], mixed: dict | None = None) -> str:
    """Primary metric ± stderr per (setting, task), with the measured kept fraction; with ``mixed``
    settings each cell ends with its record's values of them, ``[limit=3]``."""
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
            mark = marks(r, mixed)
            row.append(f"{m['value']:.4f}" + (f" ± {m['stderr']:.4f}" if m["stderr"] is not None else "")
                       + (f" [{mark}]" if mark else ""))
            if r["kept_fraction"]["overall"] is not None:
                kept.append(r["kept_fraction"]["overall"])
            wall += r.get("wall_time_s") or 0.0
        row += [f"{sum(kept) / len(kept):.3f}" if kept else "-", f"{wall:.0f}"]
        lines.append(row)
    return _fmt(lines)


def throughput_table(records: list[dict], mixed: dict | None = None) -> str:
    """One line per (system, setting, batch): tokens/s, step time, peak KV, traffic, status (and, with
    ``mixed`` settings, each record's values of them)."""
    head = ["system", "setting", "batch", "tok/s e2e", "decode tok/s", "prefill s", "ms/step", "KV dev MB", "KV host MB",
            "moved MB", "recomp", "pred/meas", "status"] + ["settings"] * bool(mixed)
    lines = [head]
    key = lambda r: (r["throughput"]["system"], _setting(r) != "dense", _setting(r), r["workload"]["batch"])
    for r in sorted(records, key=key):
        t = r["throughput"]
        f = lambda v, fmt: "-" if v is None else format(v, fmt)
        kv = t.get("kv_bytes_peak") or {}
        moved = None if t.get("bytes_h2d") is None else (t["bytes_h2d"] + (t.get("bytes_d2h") or 0)) / 1e6
        pred = t.get("predicted_vs_measured_decode")
        lines.append([t["system"], _setting(r) if t["system"] == "engine" else "dense", str(r["workload"]["batch"]),
                      f(t.get("throughput_tok_s"), ".1f"), f(t.get("decode_tok_s"), ".1f"), f(t.get("prefill_s"), ".2f"),
                      f(None if t.get("step_s_mean") is None else t["step_s_mean"] * 1e3, ".1f"),
                      f(None if kv.get("device") is None else kv["device"] / 1e6, ".1f"),
                      f(None if kv.get("host") is None else kv["host"] / 1e6, ".1f"), f(moved, ".1f"),
                      f(t.get("tokens_recomputed"), "d"), f(pred, ".2f"), t.get("status", "?")]
                     + [marks(r, mixed) or "-"] * bool(mixed))
    return _fmt(lines)


def _fmt(lines: list[list[str]]) -> str:
    widths = [max(len(str(l[i])) for l in lines) for i in range(len(lines[0]))]
    fmt = lambda l: "  ".join(str(c).ljust(w) for c, w in zip(l, widths))
    return "\n".join([fmt(lines[0]), "  ".join("-" * w for w in widths), *map(fmt, lines[1:])])


def _save(fig, path: Path, tight: bool = True) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    if tight:  # (a figure with layout="constrained" lays itself out)
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=120)
    plt.close(fig)
    tmp = path.with_suffix(".png.tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _noted(title: str, note: str) -> str:
    return f"{title}\n{note}" if note else title


def plot_throughput(records: list[dict], path: Path, note: str = "") -> Path | None:
    """Decode tokens/s vs batch: one line per system (the engine: one per setting)."""
    ok = [r for r in records if r["throughput"].get("status") == "ok"]
    if not ok:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, list] = {}
    for r in ok:
        t = r["throughput"]
        name = f"engine {_setting(r)}" if t["system"] == "engine" else t["system"]
        series.setdefault(name, []).append((r["workload"]["batch"], t["decode_tok_s"]))
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([b for b, _ in pts], [v for _, v in pts], marker="o", label=name,
                linestyle="--" if not name.startswith("engine") else "-")
    oom = [r for r in records if r["throughput"].get("status") == "oom"]
    for r in oom:
        ax.axvline(r["workload"]["batch"], color="red", alpha=0.2)
    w = ok[0]["workload"]
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(_noted(f"{ok[0]['model']['name']}: prompt {w['prompt']}, {w['new_tokens']} new tokens "
                        f"({ok[0]['hardware']['device']})" + (" — red: out of memory" if oom else ""), note), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_breakdown(records: list[dict], path: Path, note: str = "") -> Path | None:
    """Decode time split into compute / transfer / recompute, at the largest batch each system ran."""
    ok = [r for r in records if r["throughput"].get("status") == "ok" and r["throughput"].get("decode_s")]
    if not ok:
        return None
    best: dict[str, dict] = {}
    for r in ok:
        t = r["throughput"]
        name = f"engine {_setting(r)}" if t["system"] == "engine" else t["system"]
        if name not in best or r["workload"]["batch"] > best[name]["workload"]["batch"]:
            best[name] = r
    plt = _plt()
    names = sorted(best)
    fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(names)), 4))
    bottoms = [0.0] * len(names)
    for part in ("compute", "transfer", "recompute"):
        vals = []
        for n in names:
            t = best[n]["throughput"]
            tr, rc = t.get("seconds_transfer") or 0.0, t.get("seconds_recompute") or 0.0
            vals.append({"compute": t["decode_s"] - tr - rc, "transfer": tr, "recompute": rc}[part])
        ax.bar(names, vals, bottom=bottoms, label=part)
        bottoms = [b + v for b, v in zip(bottoms, vals)]
    ax.set_ylabel("decode seconds (measured)")
    ax.set_title(_noted("time breakdown at each system's largest batch", note), fontsize=9)
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    ax.legend(fontsize=7)
    return _save(fig, path)


def pareto_points(records: list[dict]) -> list[dict]:
    """One point per (policy, sparsity): mean primary accuracy over the accuracy tasks, the engine's
    decode tokens/s and peak device KV bytes at its largest batch."""
    acc, tput = split(records)
    out = []
    for pid in sorted({r["point_id"] for r in acc}):
        a = [r for r in acc if r["point_id"] == pid and not r["primary_metric"].endswith("perplexity")]
        t = [r for r in tput if r["point_id"] == pid and r["throughput"]["system"] == "engine"
             and r["throughput"].get("status") == "ok"]
        if not a or not t:
            continue
        t = max(t, key=lambda r: r["workload"]["batch"])
        out.append({"point_id": pid, "setting": _setting(a[0]), "policy": a[0]["policy"], "sparsity": a[0].get("sparsity"),
                    "accuracy": sum(r["metrics"][r["primary_metric"]]["value"] for r in a) / len(a),
                    "accuracy_stderr": (sum((r["metrics"][r["primary_metric"]]["stderr"] or 0.0) ** 2 for r in a) ** 0.5) / len(a),
                    "tasks": sorted(r["task"] for r in a), "decode_tok_s": t["throughput"]["decode_tok_s"],
                    "throughput_tok_s": t["throughput"]["throughput_tok_s"], "kv_bytes": kv_device(t["throughput"]),
                    "batch": t["workload"]["batch"]})
    return out


def front(points: list[dict], x: str, better_x_high: bool) -> list[dict]:
    """Non-dominated points (accuracy high; x high or low)."""
    sgn = 1 if better_x_high else -1
    keep = [p for p in points if not any(
        q["accuracy"] >= p["accuracy"] and sgn * q[x] >= sgn * p[x] and (q["accuracy"] > p["accuracy"] or sgn * q[x] > sgn * p[x])
        for q in points)]
    return sorted(keep, key=lambda p: p[x])


def pareto_table(points: list[dict]) -> str:
    lines = [["setting", "accuracy (mean)", "decode tok/s", "tok/s e2e", "KV MB", "batch"]]
    for p in sorted(points, key=lambda p: (p["setting"] != "dense", p["setting"])):
        lines.append([p["setting"], f"{p['accuracy']:.4f}", f"{p['decode_tok_s']:.1f}", f"{p['throughput_tok_s']:.1f}",
                      f"{(p['kv_bytes'] or 0) / 1e6:.1f}", str(p["batch"])])
    return _fmt(lines)


def plot_pareto(points: list[dict], x: str, path: Path, xlabel: str, better_x_high: bool, title: str,
                scale: float = 1.0) -> Path | None:
    """Accuracy (error bars: stderr of the task mean) vs ``x`` (divided by ``scale``), the front in grey."""
    if not points:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for pol in sorted({p["policy"] for p in points}):
        pts = sorted((p for p in points if p["policy"] == pol), key=lambda p: p[x])
        xs, ys, es = [p[x] / scale for p in pts], [p["accuracy"] for p in pts], [p["accuracy_stderr"] for p in pts]
        if pol == "dense":
            ax.errorbar(xs, ys, yerr=es, marker="*", markersize=14, color="black", zorder=5, label="dense", capsize=3)
            continue
        ax.errorbar(xs, ys, yerr=es, marker="o", linestyle=":", label=pol, capsize=3, alpha=0.85)
        for p, xv in zip(pts, xs):
            ax.annotate(f"{p['sparsity']:g}", (xv, p["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    f = front(points, x, better_x_high)
    ax.plot([p[x] / scale for p in f], [p["accuracy"] for p in f], color="gray", linewidth=2, alpha=0.5, label="Pareto front")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"mean accuracy ({', '.join(points[0]['tasks'])})")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy(records: list[dict], path: Path, note: str = "") -> Path | None:
    """Primary metric vs KV sparsity: one panel per task, one line per policy (dense at 0, error bars = stderr)."""
    plt = _plt()
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
    fig.suptitle(_noted(f"{records[0].get('experiment')}: {model}, measured on {records[0]['hardware']['device']}", note),
                 fontsize=10)
    return _save(fig, path)


# --- the needle figure: retrieval accuracy by needle depth x context length, per policy and sparsity

def needle_cells(records: list[dict]) -> list[dict]:
    """Per setting, the mean of the primary metric in each (depth, length) cell of its records' ``needle_docs``
    (a document scored by two records of the setting, a group and its task, counts once):
    ``[{setting, policy, sparsity, budget, metric, tasks, cells: [{depth, length, value, n}]}]``."""
    by: dict[str, dict] = {}
    for r in records:
        if not r.get("needle_docs"):
            continue
        e = by.setdefault(_setting(r), {"setting": _setting(r), "policy": r["policy"], "sparsity": r.get("sparsity"),
                                        "budget": r.get("budget"), "metric": r["primary_metric"], "docs": {}})
        for d in r["needle_docs"]:
            e["docs"][(d.get("task") or r["task"], d["doc_id"])] = (d["depth"], d["length"], d[r["primary_metric"]])
    out = []
    for e in by.values():
        cells: dict[tuple, list] = {}
        for depth, length, v in e["docs"].values():
            cells.setdefault((depth, length), []).append(v)
        out.append({**{k: v for k, v in e.items() if k != "docs"}, "tasks": sorted({t for t, _ in e["docs"]}),
                    "cells": [{"depth": d, "length": n, "value": sum(v) / len(v), "n": len(v)}
                              for (d, n), v in sorted(cells.items())]})
    return sorted(out, key=lambda e: (e["policy"], e["budget"] is not None, e["sparsity"] or 0.0, e["budget"] or 0))


def _tokens(n) -> str:
    return f"{n / 1024:g}k" if n % 1024 == 0 else f"{n:g}"


def plot_needle_heatmaps(entries: list[dict], plots_dir: Path, where: str, note: str = "") -> list[Path]:
    """``needle_heatmap_<policy>.png`` per policy: needle depth (rows, 0% = start of the haystack) x context length
    (columns), colour and number = mean retrieval accuracy of the cell's documents; one panel per sparsity (budget)."""
    import numpy as np

    plt = _plt()
    paths = []
    for policy in sorted({e["policy"] for e in entries}):
        mine = [e for e in entries if e["policy"] == policy]
        depths = sorted({c["depth"] for e in mine for c in e["cells"]})
        lengths = sorted({c["length"] for e in mine for c in e["cells"]})
        width = max(4.8, 1.4 + (0.8 * len(lengths) + 1.0) * len(mine))
        fig, axes = plt.subplots(1, len(mine), figsize=(width, 2.2 + 0.42 * len(depths)), squeeze=False,
                                 layout="constrained")
        for ax, e in zip(axes[0], mine):
            grid = np.full((len(depths), len(lengths)), np.nan)
            for c in e["cells"]:
                grid[depths.index(c["depth"]), lengths.index(c["length"])] = c["value"]
            im = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
            for c in e["cells"]:
                i, j = depths.index(c["depth"]), lengths.index(c["length"])
                ax.text(j, i, f"{c['value']:.2f}", ha="center", va="center", fontsize=7)
            ax.set_xticks(range(len(lengths)), [_tokens(n) for n in lengths])
            ax.set_yticks(range(len(depths)), [f"{d:g}%" for d in depths])
            ax.set_xlabel("context length (tokens)")
            n = sum(c["n"] for c in e["cells"])
            mean = sum(c["value"] * c["n"] for c in e["cells"]) / n
            label = ("dense" if e["setting"] == "dense" else f"budget {e['budget']}" if e["budget"] is not None
                     else f"sparsity {e['sparsity']:g}")
            ax.set_title(f"{label}: {mean:.2f} ({n} docs)", fontsize=9)
        axes[0][0].set_ylabel("needle depth")
        fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=mine[0]["metric"])
        tasks = sorted({t for e in mine for t in e["tasks"]})
        fig.suptitle(_noted(f"needle retrieval: {policy}\n{', '.join(tasks)}; {where}", note), fontsize=8)
        paths.append(_save(fig, plots_dir / f"needle_heatmap_{_safe_name(policy)}.png", tight=False))
    return paths


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.\-]", "_", name)


# --- the leaderboard: every setting ranked by mean accuracy, with its throughput and KV


def leaderboard_rows(records: list[dict]) -> list[dict]:
    """One row per setting, ranked: the primary metric of each accuracy task (perplexities left out), their mean,
    and the engine's decode tokens/s and peak device KV bytes at its largest batch. Settings with every task come
    first, by mean accuracy, then decode tokens/s; ``n_tasks`` says how many tasks a row has."""
    acc, tput = split(records)
    acc = [r for r in acc if not r["primary_metric"].endswith("perplexity")]
    tasks = sorted({r["task"] for r in acc})
    engine = [r for r in tput if r["throughput"]["system"] == "engine" and r["throughput"].get("status") == "ok"]
    rows = []
    for pid in sorted({r["point_id"] for r in acc + engine}):
        mine = {r["task"]: r for r in acc if r["point_id"] == pid}
        values = {t: mine[t]["metrics"][mine[t]["primary_metric"]]["value"] for t in tasks if t in mine}
        runs = [r for r in engine if r["point_id"] == pid]
        best = max(runs, key=lambda r: r["workload"]["batch"]) if runs else None
        first = next(iter(mine.values()), best)
        rows.append({"setting": _setting(first), "point_id": pid, "policy": first["policy"],
                     "sparsity": first.get("sparsity"), "budget": first.get("budget"), "accuracy": values,
                     "mean": sum(values.values()) / len(values) if values else None, "n_tasks": len(values),
                     "decode_tok_s": best["throughput"]["decode_tok_s"] if best else None,
                     "kv_bytes": kv_device(best["throughput"]) if best else None,
                     "batch": best["workload"]["batch"] if best else None})
    rows.sort(key=lambda r: (r["n_tasks"] < len(tasks), -(r["mean"] if r["mean"] is not None else -1.0),
                             -(r["decode_tok_s"] or 0.0), r["setting"]))
    return [{"rank": i + 1, **r} for i, r in enumerate(rows)]


def leaderboard_table(rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in r["accuracy"]})
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    lines = [["#", "setting", *[t.removesuffix("_local") for t in tasks], "mean", "tasks", "decode tok/s", "peak KV MB"]]
    for r in rows:
        lines.append([str(r["rank"]), r["setting"], *[f(r["accuracy"].get(t), ".3f") for t in tasks], f(r["mean"], ".4f"),
                      f"{r['n_tasks']}/{len(tasks)}", f(r["decode_tok_s"], ".1f"),
                      f(None if r["kv_bytes"] is None else r["kv_bytes"] / 1e6, ".1f")])
    return _fmt(lines)


def leaderboard_csv(rows: list[dict]) -> str:
    tasks = sorted({t for r in rows for t in r["accuracy"]})
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "setting", "policy", "sparsity", "budget", *tasks, "mean", "n_tasks", "decode_tok_s",
                "kv_device_bytes_peak", "batch"])
    for r in rows:
        w.writerow([r["rank"], r["setting"], r["policy"], r["sparsity"], r["budget"], *[r["accuracy"].get(t) for t in tasks],
                    r["mean"], r["n_tasks"], r["decode_tok_s"], r["kv_bytes"], r["batch"]])
    return buf.getvalue()


def rebuild(run_dir: Path, echo: bool = False) -> dict:
    """Rewrite summary.csv and the plots of ``run_dir`` from its JSON records.

    Unreadable records are skipped and listed (stderr, ``summary.txt``, ``skipped`` in the
    result); mixed workload settings are marked and warned about in one line. Raises
    NoResults when no successful record is left.
    """
    run_dir = Path(run_dir)
    everything, skipped = scan_records(run_dir)
    for line in skipped:
        print(f"warning: {line}", file=sys.stderr)
    records = [r for r in everything if r.get("status", "ok") == "ok"]
    failed = [r for r in everything if r.get("status", "ok") != "ok"]
    if not records:
        why = [f"{len(failed)} failed"] * bool(failed) + [f"{len(skipped)} unreadable, skipped"] * bool(skipped)
        raise NoResults(f"results folder {str(run_dir)!r} holds no successful results (no readable points/*.json"
                        + (f"; {', '.join(why)})" if why else ")"), exit_code=1 if failed else 2)
    acc, tput = split(records)
    mixed_acc, mixed_tput = mixed_settings(acc), mixed_settings(tput)
    mixed = mixed_settings(records)  # (compared within each kind: the union of the two)
    note = acc_note = tput_note = ""
    if mixed:
        note = f"mixed settings: {mixed_line(mixed)}"
        acc_note = f"mixed settings: {mixed_line(mixed_acc)}" if mixed_acc else ""
        tput_note = f"mixed settings: {mixed_line(mixed_tput)}" if mixed_tput else ""
        print(f"warning: {run_dir} holds records made with different settings: {mixed_line(mixed)}; "
              "the summary marks each record's values", file=sys.stderr)
    rows = summary_rows(records, mixed)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    write_atomic(run_dir / "summary.csv", buf.getvalue())
    plots_dir = run_dir / "plots"
    parts, plots, pareto, board = [], [], [], []
    if mixed:
        parts.append(f"NOTE: {note} (marked [setting=value] below)")
    if acc:
        parts.append(table(acc, mixed_acc))
        plots.append(plot_accuracy(acc, plots_dir / "accuracy_vs_sparsity.png", acc_note))
    if tput:
        parts.append(throughput_table(tput, mixed_tput))
        plots.append(plot_throughput(tput, plots_dir / "throughput_vs_batch.png", tput_note))
        plots.append(plot_breakdown(tput, plots_dir / "time_breakdown.png", tput_note))
    if acc and tput:
        pareto = pareto_points(records)
        if pareto:
            parts.append("Pareto (accuracy vs the engine at its largest batch):\n" + pareto_table(pareto))
            where = f"{records[0]['model']['name']} on {records[0]['hardware']['device']}"
            w = next(r["workload"] for r in tput)
            where = f"{where}, batch {pareto[0]['batch']}, prompt {w['prompt']}, {w['new_tokens']} new"
            plots.append(plot_pareto(pareto, "decode_tok_s", plots_dir / "pareto_accuracy_vs_throughput.png",
                                     "decode tokens/s (engine, measured)", True,
                                     _noted(f"accuracy vs throughput: {where}", note)))
            plots.append(plot_pareto(pareto, "kv_bytes", plots_dir / "pareto_accuracy_vs_kv.png",
                                     "peak KV held on the device tier (MB)", False,
                                     _noted(f"accuracy vs KV memory: {where}", note), scale=1e6))
            write_atomic(run_dir / "pareto.json", json.dumps(pareto, indent=2) + "\n")
        board = leaderboard_rows(records)
        if board:
            w = next(r["workload"] for r in tput)
            n_tasks = len({t for r in board for t in r["accuracy"]})
            parts.append(f"Leaderboard (ranked by mean accuracy over {n_tasks} tasks; decode tok/s and peak KV on the "
                         f"device tier of the engine at its largest batch, prompt {w['prompt']}, {w['new_tokens']} new):\n"
                         + leaderboard_table(board))
            write_atomic(run_dir / "leaderboard.csv", leaderboard_csv(board))
            write_atomic(run_dir / "leaderboard.json", json.dumps(board, indent=2) + "\n")
    needles = needle_cells(acc)
    if needles:
        where = f"{records[0]['model']['name']} on {records[0]['hardware']['device']}"
        plots += plot_needle_heatmaps(needles, plots_dir, where, acc_note)
        write_atomic(run_dir / "needle_heatmap.json", json.dumps(needles, indent=2) + "\n")
    text = "\n\n".join(parts + ["\n".join(failure_lines(failed))] * bool(failed)
                       + ["\n".join(f"SKIPPED {line.removeprefix('skipped ')}" for line in skipped)] * bool(skipped))
    write_atomic(run_dir / "summary.txt", text + "\n")
    if echo:
        print(text)
        print(f"results: {run_dir}")
    return {"records": records, "failures": failed, "skipped": skipped, "mixed": mixed, "rows": rows, "table": text,
            "pareto": pareto, "leaderboard": board, "needle": needles, "plots": [p for p in plots if p]}


def main(argv: list[str] | None = None) -> int:
    """``python -m alisa.report RESULTS_DIR``: 0 done, 2 bad input, 1 a run whose points all failed."""
    argv = sys.argv[1:] if argv is None else argv
    if argv in (["-h"], ["--help"]):
        print(f"usage: {USAGE}\n\n{__doc__.split(chr(10) + chr(10), 1)[1].strip()}")
        return 0
    if len(argv) != 1 or argv[0].startswith("-"):
        got = "no arguments" if not argv else f"{' '.join(argv)!r}"
        print(f"error: expected one results folder, got {got}: allowed {USAGE}", file=sys.stderr)
        return 2
    run_dir = Path(argv[0])
    if not (run_dir / "points").is_dir():
        what = "does not exist" if not run_dir.exists() else "has no points/ folder"
        print(f"error: results folder {str(run_dir)!r} {what}: allowed a run folder results/<experiment>/<run id> "
              "holding points/*.json", file=sys.stderr)
        return 2
    try:
        rebuild(run_dir, echo=True)
    except NoResults as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        print(f"error: results folder {str(run_dir)!r} cannot be written ({e.strerror or e}: {e.filename}): "
              "allowed a writable folder", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - never a traceback to users; the records were checked already
        print(f"error: the report of {str(run_dir)!r} failed ({e.__class__.__name__}: {e})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
