"""The core paths' speed targets, measured side by side in one run (SmolLM2-135M, fp32).

    python scripts/bench_core.py                     # everything below (about 10 minutes on 2 CPU cores)
    python scripts/bench_core.py --skip-paper --skip-4096   # a quick look

1. Accuracy path (``use_cache=False``, one forward, batch 1): alisa dense vs swa@0.8 and
   h2o@0.8 over 512 and 4,096 tokens (best of 2).
2. The public decode path (``alisa.apply`` + a model forward with its cache, what
   ``generate`` and lm-eval's ``generate_until`` use): batch 8, a 2,048-token prompt,
   dense prefill, 16 steps: stock transformers vs swa@0, swa@0.8 and h2o@0.8.
3. Selections flipped between the compiled and the reference route on real text (SmolLM2,
   512 tokens, accuracy path): near-ties of the head-summed rows, counted.
4. ``paper_accuracy`` per grid point (4-shot COPA, 100 PIQA docs) through ``python -m
   alisa.eval``: wall time of swa@0.8 and h2o@0.8 over dense.

Prints each target with its ratio; writes results/bench_core/<device>.json.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import alisa  # noqa: E402
from alisa import attention  # noqa: E402
from alisa.config import OneLineArgumentParser  # noqa: E402
from alisa.models import quiet_libraries  # noqa: E402
from alisa.results import REPO, hardware, versions, write_json  # noqa: E402
from alisa.runtime.throughput import workload_prompts  # noqa: E402

SPARSE = [("swa", 0.8), ("h2o", 0.8)]


def best_of(fn, repeat=2):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def accuracy_path(model, ids) -> dict:
    with alisa.apply(model, "dense"):
        model(ids[:, :32], use_cache=False)
        out = {"dense": best_of(lambda: model(ids, use_cache=False))}
    for name, s in SPARSE:
        with alisa.apply(model, name, sparsity=s):
            model(ids[:, :32], use_cache=False)  # first call compiles (once per machine)
            out[f"{name}@{s}"] = best_of(lambda: model(ids, use_cache=False))
    return out


def decode_path(model, ids, steps) -> dict:
    def run(cache, nxt):
        t = time.perf_counter()
        for _ in range(steps):
            o = model(nxt, cache=cache, use_cache=True)
            cache, nxt = o.cache, o.logits[:, -1:].argmax(-1)
        return (time.perf_counter() - t) / steps

    out = {}
    first = model(ids, use_cache=True)
    nxt = first.logits[:, -1:].argmax(-1)
    out["stock"] = run(copy.deepcopy(first.cache), nxt)
    for name, s in [("swa", 0.0), *SPARSE]:
        with alisa.apply(model, name, prefill="dense", sparsity=s):
            cache = model(ids, use_cache=True).cache  # the prompt attends fully (observed rows seed the state)
            out[f"{name}@{s}"] = run(cache, nxt)
    out["stock (again)"] = run(copy.deepcopy(first.cache), nxt)  # drift check: the machine stayed quiet
    return out


def flips(model, ids) -> dict:
    """Selections that differ between the two routes, over every (layer, query, key)."""
    keeps = {}
    inner = attention.attend_with_feedback
    for route in ("reference", "auto"):
        got = []

        def spy(*a, **kw):
            p, k = inner(*a, **kw)
            got.append(k)
            return p, k

        attention.ROUTE, attention.attend_with_feedback = route, spy
        try:
            with alisa.apply(model, "swa", sparsity=0.8):
                model(ids, use_cache=False)
        finally:
            attention.ROUTE, attention.attend_with_feedback = "auto", inner
        keeps[route] = torch.cat([k.flatten() for k in got])
    diff = int((keeps["reference"] != keeps["auto"]).sum())
    return {"selections": int(keeps["reference"].sum()), "flipped": diff}


def paper_accuracy() -> dict:
    run_id = f"bench-{int(time.time())}"
    cmd = [sys.executable, "-m", "alisa.eval", "+experiment=paper_accuracy", "grid.policies=[dense,swa,h2o]",
           "grid.sparsities=[0.8]", "tasks=[copa_local,piqa_local]", "limit=100", "logger=none",
           "experiment_name=bench_core_paper_accuracy", f"run_id={run_id}"]
    subprocess.run(cmd, check=True, cwd=REPO)
    wall: dict[str, float] = {}
    for f in (REPO / "results" / "bench_core_paper_accuracy" / run_id / "points").glob("*.json"):
        r = json.loads(f.read_text())
        key = "dense" if r["policy"] == "dense" else f"{r['policy']}@{r['sparsity']}"
        wall[key] = wall.get(key, 0.0) + r["wall_time_s"]
    return {"command": " ".join(cmd), "wall_s": wall}


def main() -> int:
    ap = OneLineArgumentParser(prog="python scripts/bench_core.py", description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--skip-4096", action="store_true")
    ap.add_argument("--skip-paper", action="store_true")
    a = ap.parse_args()
    ap.device(a.device)
    quiet_libraries()
    model, tok = alisa.load_model("smollm2-135m", device=a.device)
    print(f"SmolLM2-135M fp32 on {a.device} ({torch.get_num_threads()} threads), torch {torch.__version__}", flush=True)
    text = workload_prompts(tok, 8, 4096, seed=0)
    res: dict = {}
    targets = []
    with torch.no_grad():
        for n in (512,) if a.skip_4096 else (512, 4096):
            t = accuracy_path(model, text[:1, :n].to(a.device))
            res[f"accuracy_{n}"] = t
            print(f"accuracy path, {n} tokens: " + ", ".join(f"{k} {v:.2f} s" for k, v in t.items()), flush=True)
            for k in (f"{p}@{s}" for p, s in SPARSE):
                targets.append((f"accuracy path {n} tok: {k} <= {1.3 if n == 512 else 1.5}x dense", t[k] / t["dense"], 1.3 if n == 512 else 1.5))
        d = decode_path(model, text[:, :2048].to(a.device), 16)
        res["decode_b8_p2048"] = d
        print("public decode path, batch 8, 2048-token prompt, dense prefill: "
              + ", ".join(f"{k} {v * 1e3:.0f} ms/step" for k, v in d.items()), flush=True)
        stock = (d["stock"] + d["stock (again)"]) / 2
        targets += [("decode path: swa@0.8 step <= 1.2x stock", d["swa@0.8"] / stock, 1.2),
                    ("decode path: swa@0 step <= 1.15x stock", d["swa@0.0"] / stock, 1.15),
                    ("decode path: h2o@0.8 step <= 1.2x stock", d["h2o@0.8"] / stock, 1.2)]
        f = flips(model, text[:1, :512].to(a.device))
        res["route_flips_512"] = f
        print(f"compiled vs reference route, swa@0.8 over 512 tokens: {f['flipped']} of {f['selections']} selections differ", flush=True)
    if not a.skip_paper:
        p = paper_accuracy()
        res["paper_accuracy"] = p
        w = p["wall_s"]
        print("paper_accuracy per point (COPA 4-shot + 100 PIQA docs): " + ", ".join(f"{k} {v:.0f} s" for k, v in w.items()))
        for k in (f"{p}@{s}" for p, s in SPARSE):
            targets.append((f"paper_accuracy: {k} wall <= 1.15x dense", w[k] / w["dense"], 1.15))
    print()
    out = []
    for name, ratio, bound in targets:
        ok = ratio <= bound
        print(f"  {'PASS' if ok else 'MISS'}  {name}: measured {ratio:.2f}x")
        out.append({"target": name, "ratio": ratio, "bound": bound, "met": ok})
    print(f"\nreproduce: python scripts/bench_core.py {' '.join(sys.argv[1:])}")
    write_json(REPO / "results" / "bench_core" / f"{a.device}.json", {
        "model": "smollm2-135m", "dtype": "float32", "results": res, "targets": out,
        "command": "python scripts/bench_core.py " + " ".join(sys.argv[1:]),
        "hardware": hardware(a.device), "versions": versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
