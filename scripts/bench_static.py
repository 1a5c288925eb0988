"""The fixed-shape (capturable) decode step against the eager one, interleaved in one process.

    python scripts/bench_static.py                              # batch 16, prompt 1024, 12 new, 3 rounds
    python scripts/bench_static.py --batch 4 --prompt 256 --new 8 --rounds 2   # a quick look
    python scripts/bench_static.py --compiled                   # also the static step compiled (inductor)

SmolLM2-135M (fp32) on this machine's device tier. Issue 10's CPU target: the static step
(``Engine(static=True)``, what a GPU captures as a CUDA graph; eager here) is not slower than the
eager one, for Phase I and for offload plans. Two cores drift by 10-20% within minutes, so the
two are not run one after the other: each round runs every case eager then static, and the ratio
is the median of the rounds' median steps. Cases: dense, swa@0.8 (sparse prefill), swa@0.8 with
half of its non-local KV on the host (``Plan(alpha=0.5, p1=0)``), and the FlexGen-style static
offload of half the dense KV. Prints each ratio (and each round's), checks that eager and static
generated the same tokens, and writes results/bench_static/<tag>.json. ``--compiled`` also runs the
static step compiled by ``torch.compile`` (``Engine(compiled=True)``, inductor: needs a C++
compiler) in each round: its ratio to the eager step uses each run's median step (the first
steps of a run compile; their seconds are printed apart).
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alisa.config import OneLineArgumentParser, compile_backend  # noqa: E402
from alisa.results import REPO, hardware, versions, write_json  # noqa: E402
from alisa.runtime.tiered import Plan  # noqa: E402

CASES = [("dense", dict(policy="dense"), None),
         ("swa@0.8", dict(policy="swa", sparsity=0.8, prefill="sparse"), None),
         ("swa@0.8, alpha 0.5", dict(policy="swa", sparsity=0.8, prefill="sparse"), Plan(alpha=0.5, p1=0)),
         ("flexgen-style, alpha 0.5", dict(policy="dense"), Plan(alpha=0.5, p1=0, local_on_device=False))]
BOUND = 1.05  # "not slower", with 5% for this machine's drift (as scripts/bench_runtime.py)


def main() -> int:
    ap = OneLineArgumentParser(prog="python scripts/bench_static.py", description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tag", default=None)
    ap.add_argument("--compiled", action="store_true", help="also the static step compiled by torch.compile (inductor)")
    a = ap.parse_args()
    ap.at_least(a, batch=1, prompt=1, new=2, rounds=1)  # new: the prompt's token plus at least one decode step
    ap.file_tag(a.tag)
    ap.fits("smollm2-135m", a.prompt, a.new)
    if a.compiled:
        ap.check(compile_backend)
    from alisa.models import load_model, quiet_libraries  # the model stack after the arguments: bad input is told at once

    quiet_libraries()
    from alisa.runtime.engine import Engine, dense_prefill
    from alisa.runtime.throughput import workload_prompts

    model, tok = load_model("smollm2-135m", device="cpu")
    ids = workload_prompts(tok, a.batch, a.prompt, seed=0)
    pf = dense_prefill(model, ids)
    variants = ["eager", "static"] + (["compiled"] if a.compiled else [])
    steps: dict[tuple[str, str], list[float]] = {}
    same: dict[str, bool] = {}
    late: dict[str, int] = {}  # row layer-steps whose tier moves the fixed step finished outside itself
    compile_s: dict[str, list[float]] = {}
    graph: dict[str, str] = {}
    for r in range(a.rounds):
        for name, kw, plan in CASES:
            toks = []
            for v in variants:
                g = Engine(model, plan=plan, static=v != "eager", compiled=v == "compiled", **kw).generate(
                    ids, None, a.new, prefilled=pf if kw["policy"] == "dense" else None)
                steps.setdefault((name, v), []).append(statistics.median(g.step_s))
                toks.append(g.tokens)
                if v == "static":
                    late[name] = late.get(name, 0) + g.traffic.moves_late
                if v == "compiled":
                    compile_s.setdefault(name, []).append(g.extra["compile_s"])
                    graph[name] = g.extra["graph"]
            same[name] = same.get(name, True) and all(torch.equal(toks[0], t) for t in toks[1:])
        print(f"round {r + 1}/{a.rounds} done", flush=True)
    out = []
    print(f"\nbatch {a.batch}, prompt {a.prompt}, {a.new} new; median decode step, static / eager (target <= {BOUND}x):")
    for name, _, plan in CASES:
        e, s = steps[(name, "eager")], steps[(name, "static")]
        ratio = statistics.median(s) / statistics.median(e)
        rounds = [round(y / x, 3) for x, y in zip(e, s)]
        ok = ratio <= BOUND and same[name]
        print(f"  {'PASS' if ok else 'MISS'}  {name:<26} eager {statistics.median(e) * 1e3:7.1f} ms  static "
              f"{statistics.median(s) * 1e3:7.1f} ms  {ratio:.2f}x  rounds {rounds}  same tokens: {same[name]}  "
              f"moves late: {late[name]}")
        rec = {"case": name, "plan": None if plan is None else vars(plan), "eager_step_s": e, "static_step_s": s,
               "ratio": ratio, "round_ratios": rounds, "same_tokens": same[name], "moves_late": late[name],
               "bound": BOUND, "met": ok}
        if a.compiled:
            c = steps[(name, "compiled")]
            rec.update(compiled_step_s=c, compiled_ratio=statistics.median(c) / statistics.median(e),
                       compiled_round_ratios=[round(y / x, 3) for x, y in zip(e, c)], compile_s=compile_s[name], graph=graph[name])
            print(f"        compiled {statistics.median(c) * 1e3:7.1f} ms  {rec['compiled_ratio']:.2f}x eager  rounds "
                  f"{rec['compiled_round_ratios']}  compile s {[round(x, 1) for x in compile_s[name]]}  ({graph[name]})")
        out.append(rec)
    print(f"\nreproduce: python scripts/bench_static.py {' '.join(sys.argv[1:])}")
    tag = a.tag or f"b{a.batch}-p{a.prompt}-n{a.new}{'-compiled' if a.compiled else ''}-cpu"
    write_json(REPO / "results" / "bench_static" / f"{tag}.json", {
        "workload": {"batch": a.batch, "prompt": a.prompt, "new_tokens": a.new, "rounds": a.rounds,
                     "model": "smollm2-135m", "dtype": str(model.dtype)},
        "cases": out, "command": "python scripts/bench_static.py " + " ".join(sys.argv[1:]),
        "hardware": hardware("cpu"), "versions": versions()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
