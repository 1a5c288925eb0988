"""``python -m alisa.check_policy NAME``: does a policy keep the contract, and do all paths agree under it?

On a tiny random model of every covered family (``alisa.testing``) and a left-padded batch of 3
sequences, the policy (built-in, registered or plug-in; run on the reference route, where every
selection goes through its ``select``) is checked for:

1. **contract**, every query of every path: the keys selected are causal (``0 <= pos <= t``), at
   least one for a real query, and ``select`` returns a bool mask of the slots; a key that
   ``retain`` let the decode cache drop is never selected later; ``params`` reports every
   hyperparameter;
2. **simulation ≡ decode** (docs/semantics.md §3): the accuracy path (one forward) and the decode
   path (``alisa.apply``; a prefix prefilled, then token by token with real eviction) select the
   same keys for every (layer, sequence, position), and their logits agree within 1e-4;
3. **decode ≡ runtime**: greedy generation through the decode cache and through the runtime
   (``alisa.runtime.Engine``: everything on the device, and a plan that offloads and recomputes),
   with sparse and dense prefill, selects the same keys and gives the same tokens, logits within 1e-4.

The first failure is one line naming the family, the check, the layer, sequence and position, and
what differs (exit 1); when all pass, a summary table (exit 0). Bad input: one line, exit 2.

    python -m alisa.check_policy swa --sparsity 0.8
    python -m alisa.check_policy sinks --budget 9 --param n_sinks=2
"""

from __future__ import annotations

import copy
import math
import sys
import traceback
from dataclasses import dataclass, field

import torch

TOL = 1e-4  # float32 logits, docs/semantics.md §3
T = 40  # tokens of the simulation ≡ decode batch
SPLITS = (1, 13, 30)  # prompt lengths (columns, padding included) before token-by-token decoding
PROMPT, NEW = 24, 8  # decode ≡ runtime: prompt columns and generated tokens


class Failure(Exception):
    """The first place where the policy breaks the contract or two paths disagree (one line)."""


@dataclass
class Recorder:
    """What an instrumented policy did in one run: selections and drops by (layer, sequence, position)."""

    layer: int = 0
    selected: dict = field(default_factory=dict)  # (layer, b, t) -> sorted tuple of positions
    dropped: dict = field(default_factory=dict)  # (layer, b, position) -> the t_next at which retain dropped it
    problems: list = field(default_factory=list)  # (t, layer, b, message): contract breaches

    def on_select(self, pos: torch.Tensor, t: torch.Tensor, keep) -> None:
        # Stateful policies get pos (B, C) and t (B,); stateless ones broadcast, e.g. (B, 1, C) with (B, Q, 1).
        tt = t[..., None] if t.dim() == pos.dim() - 1 else t
        try:
            shape = torch.broadcast_shapes(pos.shape, tt.shape)
        except RuntimeError:
            shape = None
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != shape:
            what = f"a {keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            self.problems.append((-1, self.layer, 0, f"select returned {what} for pos {tuple(pos.shape)} and t "
                                  f"{tuple(t.shape)}: allowed is a bool mask of shape {tuple(shape or ())}"))
            return
        C = shape[-1]
        P = pos.expand(shape).reshape(-1, C)
        Tq = tt.expand(*shape[:-1], 1).reshape(-1)
        K = keep.reshape(-1, C)
        per_b = K.shape[0] // pos.shape[0]
        real = Tq >= 0
        bad = K & ~((P >= 0) & (P <= Tq[:, None])) & real[:, None]
        empty = real & ~K.any(-1)
        for r in torch.nonzero(bad.any(-1) | empty).flatten().tolist():
            t_r, b = int(Tq[r]), r // per_b
            if empty[r]:
                self.problems.append((t_r, self.layer, b, f"select picked no key for the real query at position {t_r}: "
                                      "allowed is at least one causal key"))
            else:
                j = P[r][bad[r]].tolist()
                self.problems.append((t_r, self.layer, b, f"select picked slots at positions {j} for the query at "
                                      f"position {t_r}: allowed are keys at positions 0..{t_r} (causal; -1 is padding)"))
        for r in torch.nonzero(real).flatten().tolist():
            self.selected[(self.layer, r // per_b, int(Tq[r]))] = tuple(sorted(P[r][K[r]].tolist()))

    def on_retain(self, pos: torch.Tensor, t_next: torch.Tensor, keep) -> None:
        if not isinstance(keep, torch.Tensor) or keep.dtype != torch.bool or keep.shape != pos.shape:
            what = f"a {keep.dtype} tensor of shape {tuple(keep.shape)}" if isinstance(keep, torch.Tensor) else type(keep).__name__
            self.problems.append((-1, self.layer, 0, f"retain returned {what} for pos {tuple(pos.shape)}: allowed is a "
                                  "bool mask of the same shape"))
            return
        gone = (pos >= 0) & ~keep
        for b, s in torch.nonzero(gone).tolist():
            key = (self.layer, b, int(pos[b, s]))
            self.dropped[key] = min(self.dropped.get(key, math.inf), int(t_next[b]))


def instrument(policy, recorder: Recorder):
    """A copy of ``policy`` whose select and retain report to ``recorder`` (and run on the reference route)."""
    checked = copy.copy(policy)
    checked.kernel = None  # the compiled route never calls select

    def select(pos, t, state, **kw):  # kw: what a query-aware policy is also given (quest: query=)
        keep = type(policy).select(checked, pos, t, state, **kw)
        recorder.on_select(pos, t, keep)
        return keep

    def retain(pos, t_next, state):
        keep = type(policy).retain(checked, pos, t_next, state)
        recorder.on_retain(pos, t_next, keep)
        return keep

    checked.select, checked.retain = select, retain
    return checked


class _LayerHooks:
    """Tells a recorder which layer's attention is running."""

    def __init__(self, model, recorder: Recorder):
        from .integration import _attention_modules

        self.handles = [m.register_forward_pre_hook(self._hook(recorder, m.layer_idx)) for m in _attention_modules(model)]

    @staticmethod
    def _hook(recorder, layer):
        def hook(module, args):
            recorder.layer = layer
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# --- the three checks, on one model ------------------------------------------------------------

def _where(b: int, t: int, layer: int | None = None) -> str:
    return (f"layer {layer}, " if layer is not None else "") + f"sequence {b}, position {t}"


def _first(issues):
    """The earliest (position, then layer, then sequence) of ``(t, layer, b, message)`` issues, or None."""
    return min(issues, key=lambda x: (x[0], x[1], x[2]), default=None)


def _contract(recorders: dict[str, Recorder], family: str) -> None:
    for path, rec in recorders.items():
        first = _first(rec.problems)
        if first is not None:
            t, layer, b, msg = first
            where = f"layer {layer}" if t < 0 else _where(b, t, layer)
            raise Failure(f"{family}, {path}, {where}: {msg}")


def _same_selections(ref: Recorder, got: Recorder, ref_name: str, got_name: str, family: str, what: str,
                     prompt: torch.Tensor | None = None) -> None:
    """Retain never dropped a key ``ref`` selects later; both select the same keys everywhere."""
    issues = []
    for (layer, b, t), keys in ref.selected.items():
        dropped = [(j, got.dropped[(layer, b, j)]) for j in keys if got.dropped.get((layer, b, j), math.inf) <= t]
        if dropped:
            j, at = dropped[0]
            issues.append((t, layer, b, 0, f"the {ref_name} selects key {j}, which retain(pos, t_next={at}) let the "
                           f"{got_name} drop: retain must keep every key a query at t_next or later may select"))
    for key in sorted(set(ref.selected) | set(got.selected)):
        a, g = ref.selected.get(key), got.selected.get(key)
        if a != g:
            layer, b, t = key
            only_a = sorted(set(a or ()) - set(g or ()))
            only_g = sorted(set(g or ()) - set(a or ()))
            issues.append((t, layer, b, 1, f"the {got_name} attends keys {_keys(g)}, the {ref_name} {_keys(a)} "
                           f"(only in the {ref_name}: {only_a}; only in the {got_name}: {only_g})"))
    if issues:
        t, layer, b, _, msg = min(issues, key=lambda x: (x[0], x[3], x[1], x[2]))
        step = "" if prompt is None or t < int(prompt[b]) else f" (decode step {t - int(prompt[b])})"
        raise Failure(f"{family}, {what}, {_where(b, t, layer)}{step}: {msg}")


def _keys(keys) -> str:
    if keys is None:
        return "(select not called)"
    return str(list(keys)) if len(keys) <= 12 else f"[{', '.join(map(str, keys[:5]))}, ..., {', '.join(map(str, keys[-5:]))}] ({len(keys)})"


def _run(model, policy, fn):
    rec = Recorder()
    checked = instrument(policy, rec)
    with _LayerHooks(model, rec):
        out = fn(checked)
    return out, rec


def check_simulation_decode(model, policy, family: str) -> dict:
    """Check 2 (and the contract on both paths); returns figures for the summary."""
    from . import apply
    from .testing import decode, padded_batch

    ids, mask = padded_batch(T)
    real = mask.bool()
    pads = (~real).sum(1)

    def simulate(p):
        with apply(model, p) as ctl:
            return model(ids, attention_mask=mask, use_cache=False).logits, ctl.kept_fraction()["overall"]

    (sim, kept), sim_rec = _run(model, policy, simulate)
    recs = {"accuracy path": sim_rec}
    worst, held = 0.0, None
    for split in SPLITS:
        def run_decode(p):
            with apply(model, p):
                return decode(model, ids, mask, split)

        (dec, cache), dec_rec = _run(model, policy, run_decode)
        what = f"decode path (prompt of {split} columns)"
        _contract({**recs, what: dec_rec}, family)
        _same_selections(sim_rec, dec_rec, "accuracy path", "decode path", family, what, prompt=real[:, :split].sum(1))
        diff = (sim - dec).abs().amax(-1).masked_fill(~real, 0)  # (B, T)
        if bool(_over(diff).any()):
            b, i = divmod(_first_col(diff), T)
            raise Failure(f"{family}, {what}, {_where(b, i - int(pads[b]))}: the logits differ from the accuracy path's by "
                          f"{float(diff[b, i]):.2e} > {TOL:g}, although every selection agrees")
        worst = max(worst, float(diff.max()))
        held = (max(cache.tokens_held()), T)
    return {"sim_decode": worst, "kept": kept, "held": held}


def _over(diff: torch.Tensor) -> torch.Tensor:
    return ~(diff <= TOL)  # NaN counts as over


def _first_col(diff: torch.Tensor) -> int:
    """Flat index (b * T + i) of the earliest column i, then sequence b, where ``diff`` exceeds the tolerance."""
    over = _over(diff)
    i = int(over.any(0).int().argmax())
    b = int(over[:, i].int().argmax())
    return b * diff.shape[1] + i


def _greedy_core(model, ids, mask, policy, prefill):
    """Greedy decoding through the decode path's cache: (tokens (B, NEW), logits (B, NEW, V))."""
    from . import apply
    from .runtime.engine import greedy_steps, position_ids

    with apply(model, policy, prefill) as ctl:
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
        last = out.logits[:, -1]
        tokens, _, logits = greedy_steps(model, last.argmax(-1), mask, ctl.last_cache, NEW, keep_logits=True)
    return torch.stack(tokens, 1), torch.stack([last.float(), *logits], 1)


def check_decode_runtime(model, policy, family: str) -> dict:
    """Check 3 (and the contract in the runtime); returns figures for the summary."""
    from .runtime.engine import Engine
    from .runtime.tiered import Plan
    from .testing import padded_batch

    ids, mask = padded_batch(PROMPT)
    prompt = mask.sum(1)
    plans = {"all on the device": Plan(), "offload + recompute": Plan(alpha=0.7, beta=0.5, p1=1, p2=4)}
    worst, runs = 0.0, 0
    for prefill in ("sparse", "dense"):
        (ref_tok, ref_logits), core_rec = _run(model, policy, lambda p: _greedy_core(model, ids, mask, p, prefill))
        for plan_name, plan in plans.items():
            what = f"runtime ({plan_name}, prefill={prefill})"
            g, rt_rec = _run(model, policy, lambda p: Engine(model, p, prefill=prefill, plan=plan).generate(
                ids, mask, NEW, keep_logits=True))
            _contract({f"decode path (prefill={prefill})": core_rec, what: rt_rec}, family)
            _same_selections(core_rec, rt_rec, "decode path", "runtime", family, what, prompt=prompt)
            diff = (g.extra["logits"] - ref_logits).abs().amax(-1)  # (B, NEW)
            bad = (g.tokens != ref_tok) | _over(diff)
            if bool(bad.any()):
                j = int(bad.any(0).int().argmax())
                b = int(bad[:, j].int().argmax())
                raise Failure(f"{family}, {what}, {_where(b, int(prompt[b]) + j)} (generated token {j}): the runtime gives "
                              f"token {int(g.tokens[b, j])}, the decode path {int(ref_tok[b, j])}; logits differ by "
                              f"{float(diff[b, j]):.2e} (allowed {TOL:g}), although every selection agrees")
            worst, runs = max(worst, float(diff.max())), runs + 1
    return {"decode_runtime": worst, "runs": runs}


def check_params_reported(policy) -> None:
    from .policies import hyperparameters

    names = sorted(hyperparameters(type(policy)))
    reported = sorted(policy.params)
    if reported != names:
        raise Failure(f"contract: params reports {reported or 'nothing'}, but the constructor's hyperparameters are "
                      f"{names or 'none'}: allowed is a params property returning each of them (records and the policy "
                      "key are built from it)")


@torch.no_grad()
def check(policy, families=None, echo=None) -> list[dict]:
    """Run the three checks on ``policy`` (a built :class:`~alisa.policies.Policy`) for each family;
    raises :class:`Failure` at the first problem; returns one summary row per family."""
    from .testing import FAMILIES, tiny_model

    check_params_reported(policy)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend (10x slower on a busy 2-core machine)
    try:
        return _check_families(policy, families or sorted(FAMILIES), echo)
    finally:
        torch.set_num_threads(threads)


def _check_families(policy, families, echo) -> list[dict]:
    import inspect

    from .testing import tiny_model

    try:
        source = inspect.getsourcefile(type(policy))
    except TypeError:
        source = None
    rows = []
    for family in families:
        model = tiny_model(family)
        row = {"family": family}
        try:
            row.update(check_simulation_decode(model, policy, family))
            row.update(check_decode_runtime(model, policy, family))
        except Failure:
            raise
        except Exception as e:  # noqa: BLE001 - the policy raised: say where, in one line
            frames = traceback.extract_tb(e.__traceback__)
            mine = [f for f in frames if f.filename == source]  # the deepest frame in the policy's own file
            frame = (mine or frames)[-1]
            first = (str(e).strip().splitlines() or [""])[0]
            raise Failure(f"{family}: the policy raised {type(e).__name__}: {first} (at {frame.filename}:{frame.lineno}, "
                          f"in {frame.name})") from None
        rows.append(row)
        if echo:
            echo(row)
    return rows


# --- the command line ---------------------------------------------------------------------------

def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


HEADER = f"{'family':<10}{'contract':<10}{'sim≡decode':<12}{'decode≡runtime':<18}{'kept':<7}held/seen   (max |Δ logit|, kept fraction, tokens held at the end)"


def _row_line(r: dict) -> str:
    """One family's figures: max |Δ logit| of each equivalence, the kept fraction, tokens held at the end."""
    held, seen = r["held"]
    runtime = f"{r['decode_runtime']:.1e} ({r['runs']} runs)"
    return f"{r['family']:<10}{'ok':<10}{r['sim_decode']:<12.1e}{runtime:<18}{r['kept']:<7.3f}{held:.1f}/{seen}"


def main(argv: list[str] | None = None) -> int:
    from .config import OneLineArgumentParser
    from .policies import available, make_policy, policy_class
    from .testing import FAMILIES

    ap = OneLineArgumentParser(prog="python -m alisa.check_policy", description=__doc__.split("\n\n")[0])
    ap.add_argument("name", help="policy name (built-in or plug-in)")
    ap.add_argument("--sparsity", type=float, default=None, help="KV sparsity in [0, 1) (default 0.8)")
    ap.add_argument("--budget", type=int, default=None, help="a fixed budget of tokens instead of a sparsity")
    ap.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter (repeatable)")
    ap.add_argument("--families", default=",".join(sorted(FAMILIES)), help="comma-separated model families")
    a = ap.parse_args(argv)

    def bad(msg: str) -> int:
        print(f"error: {msg}", file=sys.stderr)
        return 2

    try:
        cls = policy_class(a.name)
    except ValueError as e:
        if a.name in available():  # an installed plug-in that cannot be used: the policy fails the check
            print(f"FAIL {a.name}: {e}", file=sys.stderr)
            return 1
        return bad(str(e))
    params = {}
    for item in a.param:
        key, eq, value = item.partition("=")
        if not eq or not key:
            return bad(f"--param {item!r} is invalid: allowed is KEY=VALUE")
        params[key] = _parse_value(value)
    families = [f for f in a.families.split(",") if f]
    for f in families:
        if f not in FAMILIES:
            return bad(f"--families entry {f!r} is invalid: allowed are {', '.join(sorted(FAMILIES))}")
    kw = {}
    if a.budget is not None and a.sparsity is not None:
        return bad("--sparsity and --budget were both given: allowed is one of them")
    if a.budget is not None:
        kw["budget"] = a.budget
    elif cls.takes_budget:
        kw["sparsity"] = 0.8 if a.sparsity is None else a.sparsity
    elif a.sparsity is not None:
        kw["sparsity"] = a.sparsity
    try:
        policy = make_policy(a.name, **kw, **params)
    except ValueError as e:
        return bad(str(e))

    from .models import quiet_libraries

    quiet_libraries()
    setting = ", ".join(f"{k}={v}" for k, v in {**kw, **policy.params}.items())
    print(f"check_policy {a.name} ({cls.__module__}:{cls.__qualname__}), {setting or 'no settings'}: "
          f"simulation ≡ decode ≡ runtime on tiny random models")
    print(HEADER)
    try:
        rows = check(policy, families, echo=lambda r: print(_row_line(r), flush=True))
    except Failure as e:
        sys.stdout.flush()
        print(f"FAIL {a.name}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    print(f"all checks pass on {len(rows)} families: the contract holds; simulation ≡ decode ≡ runtime "
          f"(logits within {TOL:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
