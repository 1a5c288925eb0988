"""The GPU benchmark targets, measured side by side in one run (OPT-6.7B shape, fp16, random weights).

    python scripts/bench_gpu.py                  # one H100/H200: designed for <= 8 minutes
    python scripts/bench_gpu.py --new 512        # longer generation at batch 16
    python scripts/bench_gpu.py --dry            # the same code paths on the CPU, a tiny OPT-like shape
    python scripts/bench_gpu.py --deadline 480   # under a 10-minute limit: no run starts after 8 minutes

In one process: the machine's rates (``alisa.profile.measure``: the device copy bandwidth, pinned
host <-> device bandwidth, the runtime's gather + copy, the cost model's profile), then, on
128-token prompts, at batch 16 (``--new`` tokens): stock eager (transformers' DynamicCache),
hf_static (StaticCache, compiled with CUDA graphs on CUDA), flexgen, the engine dense / h2o@0.8 /
swa@0.8 (sparse prefill for h2o and swa), each eager and with its fixed-shape decode step captured
as a CUDA graph (``Engine(static=True)``: targets (a) and (b) are the captured step's); at batch 64 (``--big-new`` tokens) without a device KV
budget (stock, the engine) and with one (``--budget-gib``, default 4 GiB: hf_offloaded, flexgen
at the smallest host fraction that fits, the engine with the plan
``alisa.runtime.costmodel.search`` picks from the profile measured in this run; flexgen and
swa@0.8 also with the fixed-shape step, which target (d) uses where it was captured). Prints a table,
each target as a measured ratio with PASS / MISS (N/A with the reason where a record it needs did
not run), the reproducing command, and writes results/bench_gpu/<card>.json (``--dry``: dry.json).
``--extra`` adds hf_offloaded at batch 16 and hf_static at batch 64 (minutes more on a GPU);
``--compiled`` adds, at batch 16, the engine's fixed-shape step compiled by ``torch.compile``
(inductor fuses its small ops; the compiled step is what the CUDA graph captures): targets (a)
and (b) then use whichever captured step (plain or compiled) is faster. A decode step's time (the
table's, (a)'s and (b)'s) is the run's median step: its first steps pay a capture or a compile
(the mean and every step are in the JSON).
The JSON is rewritten after every run, marked ``partial`` until the end, so a run killed at a time
limit keeps what it measured; ``--deadline S`` starts no run after S seconds (each is recorded as
skipped, saying so) and ends normally, targets and all; ``--small-only`` runs only the small batch.
A device that fails for good (a sticky CUDA error) ends the runs the same way.
Without a CUDA device and without ``--dry``: one line, exit 2, nothing written.
"""

from __future__ import annotations

import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alisa.config import OneLineArgumentParser, compile_backend  # noqa: E402
from alisa.results import REPO, git_commit, hardware, versions, write_json  # noqa: E402
from alisa.runtime import SYSTEMS  # noqa: E402

DRY_NOTE = "dry run: figures are not GPU figures"
# --dry: a tiny OPT-like shape (same family and code paths as OPT-6.7B), float32 on the CPU
DRY_SHAPE = dict(model_type="opt", vocab_size=1000, hidden_size=256, ffn_dim=1024, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=2048, word_embed_proj_dim=256,
                 do_layer_norm_before=True, activation_function="relu")
DEFAULTS = {False: dict(prompt=128, batch=16, big_batch=64, new=256, big_new=128),
            True: dict(prompt=32, batch=2, big_batch=4, new=8, big_new=8)}
ENGINE = [("engine dense", "dense", None, "dense"), ("engine h2o@0.8", "h2o", 0.8, "sparse"),
          ("engine swa@0.8", "swa", 0.8, "sparse")]


def parse(argv):
    ap = OneLineArgumentParser(prog="python scripts/bench_gpu.py", description=__doc__.splitlines()[0])
    ap.add_argument("--dry", action="store_true", help="run on the CPU with a tiny OPT-like shape (figures are not GPU figures)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; dry 32)")
    ap.add_argument("--batch", type=int, default=None, help="the small batch (default 16; dry 2)")
    ap.add_argument("--big-batch", type=int, default=None, help="the large batch, with and without a budget (default 64; dry 4)")
    ap.add_argument("--new", type=int, default=None, help="new tokens at the small batch (default 256; dry 8)")
    ap.add_argument("--big-new", type=int, default=None, help="new tokens at the large batch (default 128; dry 8)")
    ap.add_argument("--budget-gib", type=float, default=None,
                    help="device KV budget at the large batch, GiB (default 4; dry: half the dense KV there)")
    ap.add_argument("--layers", type=int, default=None, help="override the shape's num_hidden_layers")
    ap.add_argument("--hidden", type=int, default=None, help="override hidden_size (and word_embed_proj_dim; ffn_dim = 4x)")
    ap.add_argument("--extra", action="store_true",
                    help="also hf_offloaded at the small batch and hf_static at the large one (minutes more on a GPU)")
    ap.add_argument("--compiled", action="store_true",
                    help="also the engine's fixed-shape step compiled by torch.compile (inductor) at the small batch "
                         "(a compile per policy: about a minute each on a GPU)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {', '.join(SYSTEMS)}")
    ap.add_argument("--small-only", action="store_true",
                    help="only the small batch (no large-batch runs: targets (c) and (d) are N/A)")
    ap.add_argument("--resume", action="store_true",
                    help="keep the finished runs of the --out JSON (same card, shape and workload) and run only the others: "
                         "a run cut off at a time limit, continued")
    ap.add_argument("--deadline", type=float, default=None,
                    help="seconds from the start after which no further run starts (each is recorded as skipped) "
                         "and the results so far are written: keep it under a time limit that would kill the run")
    ap.add_argument("--out", default=None, help="output JSON (default results/bench_gpu/<card>.json; dry: dry.json)")
    a = ap.parse_args(argv)
    for k, v in DEFAULTS[a.dry].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    ap.at_least(a, prompt=1, batch=1, big_batch=1, new=2, big_new=2, layers=1, hidden=1)
    if a.compiled:
        ap.check(compile_backend)
    if a.budget_gib is not None and not (a.budget_gib > 0 and math.isfinite(a.budget_gib)):
        ap.error(f"--budget-gib={a.budget_gib} is invalid: allowed is a number of GiB > 0")
    if a.deadline is not None and not (a.deadline > 0 and math.isfinite(a.deadline)):
        ap.error(f"--deadline={a.deadline} is invalid: allowed is a number of seconds > 0")
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad or not a.systems:
        ap.error(f"--systems entry {(bad or [''])[0]!r} is invalid: allowed are {', '.join(SYSTEMS)}")
    heads = DRY_SHAPE["num_attention_heads"] if a.dry else 32
    if a.hidden is not None and a.hidden % heads:
        ap.error(f"--hidden={a.hidden} is invalid: allowed is a multiple of {heads} (the shape's attention heads)")
    return a


def card_name(dev: torch.device) -> str:
    return "dry" if dev.type != "cuda" else re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(dev).lower()).strip("-")


def check_writable(out: Path) -> str | None:
    """Why ``out`` cannot be written (None: it can), before anything runs; creates nothing that stays."""
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if out.is_dir():
        return "a folder"
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-probe-")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        return f"{e.strerror or e}: {str(probe)!r}"
    return None


def model_config(a):
    """OPT-6.7B's shape (conf/model/opt-6.7b.yaml) in fp16; --dry: DRY_SHAPE in fp32: (config, name, shape, dtype)."""
    from transformers import AutoConfig

    from alisa.config import shape_configs

    hf = dict(DRY_SHAPE if a.dry else shape_configs()["opt-6.7b"])
    if a.layers is not None:
        hf["num_hidden_layers"] = a.layers
    if a.hidden is not None:
        hf.update(hidden_size=a.hidden, word_embed_proj_dim=a.hidden, ffn_dim=4 * a.hidden)
    name = "random:dry-opt" if a.dry else "random:opt-6.7b"
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    config.name_or_path = name
    dtype = torch.float32 if a.dry else torch.float16
    return config, name, {"model_type": config.model_type, **hf, "dtype": str(dtype).removeprefix("torch.")}, dtype


def build_model(config, dtype: torch.dtype, dev: torch.device):
    """Random weights (seed 0), made on the device."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(dev).eval()


def _first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"


def measure_one(model, system, ids, new, **kw) -> dict:
    """run_point, with any failure recorded (one line) instead of ending the run. A device that
    fails after the run (a sticky CUDA error: every later call fails too) is ``device_error``."""
    from alisa.runtime.engine import BudgetTooSmall
    from alisa.runtime.throughput import run_point

    dev = next(model.parameters()).device
    t0 = time.perf_counter()
    try:
        r = run_point(model, system, ids, new, **kw)
    except BudgetTooSmall as e:  # a budget below what any plan needs (the engine says the minimum)
        r = {"system": system, "status": "skipped", "reason": str(e)}
    except Exception as e:  # noqa: BLE001  (a benchmark goes on; the record says what failed)
        r = {"system": system, "status": "failed", "error": _first_line(e)}
    r.pop("tiers_per_step", None)
    r["wall_s"] = time.perf_counter() - t0
    err = release(dev)
    if err:
        r["device_error"] = err
    return r


def release(dev: torch.device) -> str | None:
    """Give the device's cached memory back after a run; why the device failed there (a sticky
    CUDA error: every later call fails too), or None."""
    if dev.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(dev)
        torch.cuda.empty_cache()
    except Exception as e:  # noqa: BLE001
        return _first_line(e)
    return None


def audit_step(engine, ids) -> str:
    """``alisa.runtime.audit`` of the engine's decode step on a short prompt, in one line (or why it failed)."""
    from alisa.runtime.audit import audit_decode

    try:
        return " | ".join(audit_decode(engine, ids).summary(lines=4).splitlines())
    except Exception as e:  # noqa: BLE001 - a diagnosis, not a measurement: record it and go on
        return f"audit failed: {_first_line(e)}"


def flexgen_fraction(prof, config, dtype: str, wl, budget: int | None) -> tuple[float, str]:
    """FlexGen-style static offload: half the KV on the host, or the smallest fraction (grid of 0.05) that the
    cost model's residency says fits ``budget``."""
    from alisa.policies import make_policy
    from alisa.runtime.costmodel import ALPHAS, predict
    from alisa.runtime.tiered import Plan

    if budget is None:
        return 0.5, "no budget: half of the KV on the host (FlexGen's static split)"
    for f in [x for x in ALPHAS if x >= 0.5]:
        if predict(prof, config, dtype, make_policy("dense"), wl, Plan(alpha=f, p1=0, local_on_device=False), budget).feasible:
            return f, f"the smallest host fraction >= 0.5 whose device KV fits the budget ({budget} B)"
    return 1.0, f"even all KV on the host exceeds the budget ({budget} B): run anyway, recorded as it ends"


def row(name: str, r: dict) -> str:
    def f(v, scale=1.0, fmt="{:.1f}"):
        return fmt.format(v * scale) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"

    kv = r.get("kv_bytes_peak") or {}
    moved = (r.get("bytes_h2d") or 0) + (r.get("bytes_d2h") or 0) if r.get("status") == "ok" else None
    note = r.get("reason") or r.get("error") or ""
    if r.get("status") == "ok":
        bits = []
        if "compiled" in r:
            bits.append("compiled" if r["compiled"] else "eager")
        if r.get("graph"):
            bits.append(r["graph"])
        if r.get("system") == "flexgen":
            bits.append(f"host fraction {r['plan']['alpha']:.2f}")
        elif r.get("plan") and (r["plan"].get("alpha") or 0) > 0:
            bits.append(f"alpha={r['plan']['alpha']:.2f} p1={r['plan']['p1']}")
        note = ", ".join(bits)
    if r.get("resumed"):
        note = f"(resumed) {note}"
    return (f"{name:<30} {r.get('status', '?'):<7} {f(r.get('step_s_median') or r.get('step_s_mean'), 1e3):>9} {f(r.get('decode_tok_s')):>10} "
            f"{f(r.get('throughput_tok_s')):>10} {f(r.get('prefill_s'), 1.0, '{:.3f}'):>9} {f(kv.get('device'), 1e-6, '{:.2f}'):>10} "
            f"{f(kv.get('host'), 1e-6, '{:.2f}'):>10} {f(moved, 1e-6, '{:.2f}'):>10} {f(r.get('wall_s')):>6}  {note[:90]}")


HEADER = (f"{'setting':<30} {'status':<7} {'step ms':>9} {'decode/s':>10} {'e2e tok/s':>10} {'prefill s':>9} "
          f"{'KV dev MB':>10} {'host MB':>10} {'moved MB':>10} {'wall s':>6}  note")


def step(r: dict) -> float:
    """A run's decode step: its median (the mean where an older record has none)."""
    return r.get("step_s_median") or r["step_s_mean"]


def _ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "ok"


def _why(*recs) -> str:
    for name, r in recs:
        if r is None:
            return f"{name} was not run (--systems or --small-only)"
        if r.get("status") != "ok":
            return f"{name} did not run: {r.get('status')} ({r.get('reason') or r.get('error') or ''})"
    return ""


def targets(rec: dict, a, rates: dict, roof_s: float) -> list[dict]:
    """Each target: the measured ratio, its bound, PASS / MISS; N/A with the reason where a record it needs did not run."""
    b, B = f"b{a.batch}", f"b{a.big_batch}"
    g = rec.get
    out = []

    def add(name, bound, le, parts, ratio_fn, extra_ok=lambda: (True, "")):
        why = _why(*parts)
        if why:
            out.append({"target": name, "ratio": None, "bound": bound, "met": None, "status": "N/A", "why": why})
            return
        ratio = ratio_fn()
        if ratio is None:
            out.append({"target": name, "ratio": None, "bound": bound, "met": None, "status": "N/A", "why": extra_ok()[1]})
            return
        cond, note = extra_ok()
        met = bool((ratio <= bound if le else ratio >= bound) and cond)
        out.append({"target": name, "ratio": ratio, "bound": bound, "met": met, "status": "PASS" if met else "MISS",
                    **({"why": note} if note else {})})

    # (a) and (b) are the graph-captured step's (plain or compiled: the faster; the eager step's records are printed
    # beside them), each run's median step (its first steps pay a capture or a compile)
    def captured(label):
        runs = [(f"{b} {label} {v}", g(f"{b} {label} {v}")) for v in ("static", "compiled")]
        ok = [(k, r) for k, r in runs if _ok(r) and str(r.get("graph", "")).startswith("captured")]
        if ok:
            return (*min(ok, key=lambda kr: step(kr[1])), "")
        k, r = runs[0]  # measured all the same, and said
        return k, r, f"{k} not captured: {r.get('graph')}" if _ok(r) else ""

    dense_key, dense, dense_note = captured("engine dense")
    stock = g(f"{b} stock")
    add(f"(a) engine dense step (batch {a.batch}) <= 2x bytes roofline", 2.0, True, [(dense_key, dense)],
        lambda: step(dense) / roof_s, lambda: (True, dense_note))
    add(f"(a) engine dense step <= 0.5x stock eager step (batch {a.batch})", 0.5, True,
        [(dense_key, dense), (f"{b} stock", stock)], lambda: step(dense) / step(stock), lambda: (True, dense_note))
    for pol in ("swa", "h2o"):
        key, r, note = captured(f"engine {pol}@0.8")

        def nothing_moved(r=r, notes=[n for n in (note, dense_note) if n]):
            moved = (r["bytes_h2d"] or 0) + (r["bytes_d2h"] or 0) + (r["kv_bytes_peak"].get("host") or 0)
            if moved:
                notes = [*notes, f"{moved} B offloaded or moved: the target is with nothing offloaded"]
            return moved == 0, "; ".join(notes)

        add(f"(b) {pol}@0.8 step <= 1.15x engine dense (batch {a.batch}, nothing offloaded)", 1.15, True,
            [(key, r), (dense_key, dense)], lambda r=r: step(r) / step(dense), nothing_moved)
    # (c): the eager step's moves, timed by the link; a static step reads host tokens through mapped memory inside its
    # kernels (no copy to time), so its bytes have no seconds of their own
    moving = [(k, r) for k, r in rec.items() if k.startswith(f"{B}-budget engine") and not k.endswith(" static") and _ok(r)
              and (r.get("bytes_h2d") or 0) + (r.get("bytes_d2h") or 0) > 0 and (r.get("seconds_transfer") or 0) > 0]
    moved = sum((r["bytes_h2d"] or 0) + (r["bytes_d2h"] or 0) for _, r in moving)
    secs = sum(r["seconds_transfer"] for _, r in moving)
    tier_rate = moved / secs if secs else None
    rates["tier_transfer_bw"] = tier_rate
    rates["tier_transfer_from"] = [k for k, _ in moving]
    h2d = rates.get("h2d_pinned_bw")
    name_c = "(c) tier transfer rate (engine, under the budget) >= 0.70x pinned H2D"
    if not moving:
        out.append({"target": name_c, "ratio": None, "bound": 0.7, "met": None, "status": "N/A",
                    "why": f"no engine record at batch {a.big_batch} under the budget moved bytes between tiers"})
    elif h2d is None:
        out.append({"target": name_c, "ratio": None, "bound": 0.7, "met": None, "status": "N/A",
                    "why": f"no pinned H2D rate ({rates.get('pinned_what')}); tier rate measured {tier_rate / 1e9:.2f} GB/s"})
    else:
        r = tier_rate / h2d
        out.append({"target": name_c, "ratio": r, "bound": 0.7, "met": r >= 0.7, "status": "PASS" if r >= 0.7 else "MISS"})
    def best(key):  # the fixed-shape step's record where it was captured as a CUDA graph, else the eager one
        st = g(key + " static")
        return (key + " static", st) if _ok(st) and str(st.get("graph", "")).startswith("captured") else (key, g(key))

    swa_key, swa_b = best(f"{B}-budget engine swa@0.8")
    for other, bound in ((f"{B}-budget flexgen", 1.5), (f"{B}-budget hf_offloaded", 1.4), (f"{B} stock", 1.0)):
        other, o = best(other)
        add(f"(d) swa@0.8 under the budget, end-to-end tok/s >= {bound}x {other.split(' ', 1)[1]}"
            f"{' (no budget)' if other.endswith('stock') else ''} (batch {a.big_batch}; {swa_key.split(' ', 1)[1]})", bound, False,
            [(swa_key, swa_b), (other, o)], lambda o=o: swa_b["throughput_tok_s"] / o["throughput_tok_s"])
    swa = g(f"{b} engine swa@0.8")
    add(f"(e) swa@0.8 sparse prefill <= 1.5x dense prefill (batch {a.batch})", 1.5, True, [(f"{b} engine swa@0.8", swa)],
        lambda: swa["prefill_s"] / rates["dense_prefill_s"])
    return out


def main(argv=None) -> int:
    a = parse(argv)
    a.saved = None  # where the runs so far were written (after each run), if anywhere

    def kept() -> str:
        return f"the runs before it are in {a.saved} (marked partial)" if a.saved else "nothing was saved"

    try:
        return _run(a, argv)
    except KeyboardInterrupt:
        print(f"interrupted; {kept()} (rerun the same command)", file=sys.stderr)
        return 130
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as e:  # outside any one system's run
        print(f"error: the benchmark failed ({_first_line(e)}); {kept()}", file=sys.stderr)
        return 1


def _run(a, argv) -> int:
    if not a.dry and not torch.cuda.is_available():
        print("error: no CUDA device is present: this benchmark measures a GPU; for a CPU dry run of the same code paths "
              "use `python scripts/bench_gpu.py --dry`", file=sys.stderr)
        return 2
    dev = torch.device("cpu" if a.dry else "cuda")
    out = Path(a.out) if a.out else REPO / "results" / "bench_gpu" / f"{card_name(dev)}.json"
    bad = check_writable(out)
    if bad:
        print(f"error: --out={str(out)!r} cannot be written ({bad}): allowed is a writable file path", file=sys.stderr)
        return 2
    earlier = None
    if a.resume and out.exists():
        from alisa.results import UnreadableFile, read_json_file

        try:
            earlier = read_json_file(out, "--resume: the earlier result")
            if not isinstance(earlier, dict) or not isinstance(earlier.get("records"), dict):
                raise UnreadableFile(f"--resume: the earlier result {out} has no records")
        except UnreadableFile as e:
            print(f"error: {e}: allowed is a result this script wrote (or no --resume)", file=sys.stderr)
            return 2
    from alisa.policies import make_policy
    from alisa.profile import measure
    from alisa.runtime.costmodel import Workload, search
    from alisa.runtime.engine import Engine, dense_prefill
    from alisa.runtime.recompute import kv_bytes_per_token
    from alisa.runtime.throughput import workload_prompts

    command = "python scripts/bench_gpu.py " + " ".join(sys.argv[1:] if argv is None else argv)
    t_start = time.perf_counter()
    cfg, name, shape, torch_dtype = model_config(a)
    dtype = shape["dtype"]
    kvb = kv_bytes_per_token(cfg, dtype) * cfg.num_hidden_layers  # one token of one sequence, all layers
    big_dense_kv = kvb * a.big_batch * (a.prompt + a.big_new)
    if a.budget_gib is not None:
        budget, budget_why = int(a.budget_gib * (1 << 30)), f"--budget-gib {a.budget_gib}"
    elif a.dry:
        budget, budget_why = big_dense_kv // 2, f"dry: half the dense KV at batch {a.big_batch} ({big_dense_kv} B)"
    else:
        budget, budget_why = 4 << 30, "default 4 GiB"
    rec: dict[str, dict] = {}
    dense_prefills: dict[int, float] = {}
    result = {
        "dry": a.dry, **({"note": DRY_NOTE} if a.dry else {}), "card": card_name(dev), "model": name, "shape": shape,
        "workload": {"prompt": a.prompt, "batch": a.batch, "new_tokens": a.new, "big_batch": a.big_batch,
                     "big_new_tokens": a.big_new, "device_budget": budget, "device_budget_why": budget_why}}
    done: dict[str, dict] = {}  # --resume: the earlier result's finished runs
    if earlier is not None:
        differ = [k for k in ("card", "model", "shape", "workload") if earlier.get(k) != result[k]]
        if differ:
            print(f"error: --resume: {out} was measured with another {', '.join(differ)}: allowed is the same card and "
                  "arguments (or no --resume)", file=sys.stderr)
            return 2
        done = {k: r for k, r in earlier["records"].items() if isinstance(r, dict) and r.get("status") == "ok"}
        dense_prefills.update({int(k): v for k, v in (earlier.get("dense_prefill_s") or {}).items()})

    if a.dry:
        print(f"{DRY_NOTE} (cpu, a tiny OPT-like shape)", flush=True)
    if earlier is not None:
        print(f"--resume: {len(done)} finished runs kept from {out} (measured {earlier.get('command')!r}); the others run now",
              flush=True)
    model = build_model(cfg, torch_dtype, dev)
    cfg = model.config
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"model {name} ({shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, {dtype}) on {dev}: "
          f"weights {weight_bytes / 1e9:.3f} GB, KV {kvb / 1e6:.3f} MB per token", flush=True)

    prof = measure(model, name, model.dtype, dev)  # the rates and the cost model's profile, this run
    rates = {"hbm_copy_bw": prof.hbm_copy_bw, "hbm_traffic_bw": 2 * prof.hbm_copy_bw, "h2d_pinned_bw": prof.h2d_pinned_bw,
             "d2h_pinned_bw": prof.d2h_pinned_bw, "copy_bw": prof.copy_bw, "attn_read_bw": prof.attn_read_bw,
             "hbm_what": prof.extra.get("hbm_copy_bw"), "pinned_what": prof.extra.get("pinned_bw")}

    def gb(v):
        return f"{v / 1e9:.1f} GB/s" if v else "n/a"

    print(f"{'device copy' if dev.type == 'cuda' else 'RAM copy (cpu)'} {gb(prof.hbm_copy_bw)} (traffic {gb(2 * prof.hbm_copy_bw)}); "
          f"pinned H2D {gb(prof.h2d_pinned_bw)}, D2H {gb(prof.d2h_pinned_bw)}"
          f"{'' if prof.h2d_pinned_bw else ' (' + str(rates['pinned_what']) + ')'}; runtime gather+copy {gb(prof.copy_bw)}", flush=True)

    print(f"device KV budget at batch {a.big_batch}: {budget / (1 << 30):.4g} GiB ({budget_why}; dense KV there at the "
          f"end: {big_dense_kv / (1 << 30):.4g} GiB)\n", flush=True)
    broken: list[str] = []  # the device failed (a sticky CUDA error): nothing more can run on it
    result.update(rates=rates, weight_bytes=weight_bytes, kv_bytes_per_token=kvb, profile=prof.to_dict(), records=rec,
                  dense_prefill_s=dense_prefills, command=command, hardware=hardware(dev.type), versions=versions(),
                  git=git_commit())
    print(HEADER, flush=True)

    def save(partial: bool) -> None:
        """Write what was measured (atomic); ``partial`` after each run, so a run killed at a time limit keeps it
        (a partial write that fails is retried at the next run; the final one reports)."""
        try:
            write_json(out, {**({"partial": "the run did not finish: records so far, no targets"} if partial else {}),
                             **result, "wall_s": time.perf_counter() - t_start})
            a.saved = out
        except OSError:
            if not partial:
                raise

    def stop() -> str | None:
        if broken:
            return f"not run: the device failed earlier ({broken[0]})"
        if a.deadline is not None and time.perf_counter() - t_start > a.deadline:
            return f"not run: --deadline {a.deadline:g} s passed ({time.perf_counter() - t_start:.0f} s in)"
        return None

    def run(key, system, ids, new, prefilled, annotate=None, **kw):
        """One run (or its --resume'd record, or why it did not run), saved, then its row printed.
        ``prefilled()`` gives the stage's shared dense prefill (made at its first use);
        ``annotate(r)`` adds what the bench knows about a run it made."""
        if system not in a.systems:
            return
        why = stop()
        if key in done:
            r = {**done[key], "resumed": True}
        elif why:
            r = {"system": system, "status": "skipped", "reason": why}
        else:
            try:
                pf = prefilled()
            except Exception as e:  # noqa: BLE001 - e.g. out of memory: this run fails, the next one tries again
                r = {"system": system, "status": "failed",
                     "error": f"the shared dense prefill at batch {ids.shape[0]}: {_first_line(e)}"}
                err = release(dev)
                if err:
                    r["device_error"] = err
            else:
                r = measure_one(model, system, ids, new, prefilled=pf, **kw)
            if annotate is not None:
                annotate(r)
        if r.get("device_error"):
            broken.append(f"after {key}: {r['device_error']}")
        rec[key] = r
        save(partial=True)  # before its row: a printed row is a saved one
        print(row(key, r), flush=True)
        if r.get("audit") and not r.get("resumed"):
            print(f"  audit of that step: {r['audit']}", flush=True)

    def runs_at(B: int, new: int, budget: int | None, systems: list[str]):
        ids = workload_prompts(None, B, a.prompt, seed=0, vocab=cfg.vocab_size)
        wl = Workload(B, a.prompt, new)
        made = []

        def prefilled():
            if not made:
                dense_prefill(model, ids)  # untimed: the first prompt pass at this shape (kernel choices, allocator)
                made.append(dense_prefill(model, ids))
                dense_prefills[B] = made[0].seconds
            return made[0]

        tag = f"b{B}" + ("-budget" if budget is not None else "")
        for s in ("stock", "hf_static", "hf_offloaded"):
            if s in systems:
                run(f"{tag} {s}", s, ids, new, prefilled)
        if "flexgen" in systems:
            f, why = flexgen_fraction(prof, cfg, dtype, wl, budget)
            for st in ([False, True] if budget is not None else [False]):  # under the budget also its fixed-shape step
                run(f"{tag} flexgen" + (" static" if st else ""), "flexgen", ids, new, prefilled,
                    lambda r, why=why: r.update(flexgen_fraction_why=why), flexgen_fraction=f, device_budget=budget, static=st)
        for label, pol_name, sp, prefill in ENGINE:
            pol = make_policy(pol_name, sparsity=sp)
            plan, pred = None, None
            if budget is not None:
                pred = search(prof, cfg, dtype, pol, wl, device_budget=budget)
                plan = pred.plan

            def predicted(r, pred=pred):
                if pred is not None:
                    r["predicted"] = pred.to_dict()
                    if r.get("decode_s"):
                        r["predicted_vs_measured_decode"] = pred.total_s / r["decode_s"]

            # under the budget swa@0.8 (target (d)) also runs its fixed-shape step with the same plan
            for st in ([False, True] if budget is not None and label == "engine swa@0.8" else [False]):
                run(f"{tag} {label}" + (" static" if st else ""), "engine", ids, new, prefilled, predicted, policy=pol,
                    prefill=prefill, plan=plan, device_budget=budget, static=st)
        if budget is None and B == a.batch:  # the fixed-shape step, captured as a CUDA graph (targets (a), (b))
            for label, pol_name, sp, prefill in ENGINE:
                pol = make_policy(pol_name, sparsity=sp)
                def audited(r, pol=pol, prefill=prefill):  # a step that was not captured: why, for the next try
                    if _ok(r) and not str(r.get("graph", "")).startswith("captured"):
                        r["audit"] = audit_step(Engine(model, pol, prefill=prefill, static=True), ids[:2, :16])

                for variant in ("static", "compiled") if a.compiled else ("static",):  # the compiled step is the static one
                    run(f"{tag} {label} {variant}", "engine", ids, new, prefilled, audited if variant == "static" else None,
                        policy=pol, prefill=prefill, static=True, compiled=variant == "compiled")
        made.clear()

    # Untimed: each engine policy once on a short prompt (first-use costs: kernel choices, the CPU route's JIT)
    warm_ids = workload_prompts(None, 1, min(a.prompt, 16), seed=1, vocab=cfg.vocab_size)
    for _, pol_name, sp, prefill in ENGINE:
        try:
            Engine(model, make_policy(pol_name, sparsity=sp), prefill=prefill).generate(warm_ids, None, 2)
        except Exception:  # noqa: BLE001  (the measured run records the failure)
            pass
    # What the targets need, within the time a GPU run is designed for; --extra adds hf_offloaded at the small
    # batch (it moves all KV both ways every step: minutes) and hf_static at the large one (a second compile)
    runs_at(a.batch, a.new, None, ["stock", "hf_static", "flexgen", "engine"] + (["hf_offloaded"] if a.extra else []))
    if not a.small_only:
        runs_at(a.big_batch, a.big_new, None, ["stock", "engine"] + (["hf_static"] if a.extra else []))
        runs_at(a.big_batch, a.big_new, budget, ["hf_offloaded", "flexgen", "engine"])

    # (a)'s roofline: the weights and the mean dense KV of a step at the small batch, read at the copy's traffic rate
    mean_ctx = a.prompt + a.new / 2  # decode step j (1..new-1) attends prompt + j tokens
    roof_s = (weight_bytes + kvb * a.batch * mean_ctx) / (2 * prof.hbm_copy_bw)
    rates["dense_prefill_s"] = dense_prefills.get(a.batch)
    tg = targets(rec, a, rates, roof_s)
    pf_s = rates["dense_prefill_s"]
    print(f"\nbytes roofline of a dense step at batch {a.batch}: {roof_s * 1e3:.2f} ms (weights {weight_bytes / 1e9:.3f} GB + "
          f"mean KV {kvb * a.batch * mean_ctx / 1e9:.3f} GB at {2 * prof.hbm_copy_bw / 1e9:.1f} GB/s, the copy's read+write "
          f"traffic); dense prefill (batch {a.batch}) {'-' if pf_s is None else f'{pf_s:.3f} s'}")
    if broken:
        print(f"the device failed: {broken[0]}; later runs did not run")
    if rates.get("tier_transfer_bw"):
        print(f"tier transfer rate under the budget: {rates['tier_transfer_bw'] / 1e9:.2f} GB/s "
              f"({', '.join(rates['tier_transfer_from'])})")
    for t in tg:
        ratio = f": measured {t['ratio']:.2f}x" if t["ratio"] is not None else ""
        print(f"  {t['status']:<4}  {t['target']}{ratio}{' (' + t['why'] + ')' if t.get('why') else ''}")
    if a.dry:
        print(DRY_NOTE)
    print(f"\nreproduce: {command}")
    result.update(step_roofline_s=roof_s, targets=tg, **({"device_failed": broken[0]} if broken else {}))
    try:
        save(partial=False)  # atomic: a failed write leaves the last partial one (or nothing)
    except OSError as e:
        print(f"error: --out={str(out)!r} cannot be written ({e.strerror or e}): allowed is a writable file path; "
              f"{'the runs are in it only as its last partial save' if a.saved else 'nothing was saved'}", file=sys.stderr)
        return 1
    print(f"saved {out} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
