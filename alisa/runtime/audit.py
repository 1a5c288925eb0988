"""Is a decode step replayable? An op-level audit of the runtime's step, on any device.

A CUDA graph (or ``torch.compile(mode="reduce-overhead")``) records the kernels of one step
and replays them with the same arguments: the same shapes, the same buffers, the same
host scalars. Replaying step j as step j + 1 computes step j + 1 only if the eager step j + 1
would have issued exactly the same ops on exactly the same persistent buffers, read
nothing back to the host, and kept its state in place. This module checks that on the CPU,
where no graph can be captured:

* :class:`StepTrace` (a ``TorchDispatchMode``) records every aten op of one forward: its
  name, its non-tensor arguments and, for each tensor argument, either the persistent
  buffer it views (storage address, offset, shape, stride: a buffer that existed before the
  step) or the index of the temporary this step created (temporaries are re-created by a
  replay at the same place, so their addresses do not matter);
* host read-backs (``aten._local_scalar_dense``: ``.item()``, ``int(t)``, ``bool(t)``) and
  ops whose output shape depends on data (``nonzero``, ``masked_select``, ...) are listed;
* :func:`audit_decode` runs two consecutive decode steps of an :class:`~alisa.runtime.engine.Engine`
  and reports ops per layer-step, the read-backs, and the first ops where the two traces
  differ (with the Python line that issued them).

The compiled (numba) route is not a torch op and is invisible here: audit the reference
route (``alisa.attention.ROUTE = "reference"``), which is the one CUDA runs.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("_local_scalar_dense", "item", "is_nonzero", "equal", "tolist")
DYNAMIC_SHAPE_OPS = ("nonzero", "masked_select", "unique", "_unique2", "repeat_interleave", "masked_scatter_")
_ALISA = "/alisa/"


def _where() -> str:
    """The innermost alisa (else transformers, else any non-torch) line that issued the current op."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/runtime/audit.py" not in f.filename]
    for pick in (lambda f: _ALISA in f.filename, lambda f: "/transformers/" in f.filename,
                 lambda f: "/torch/" not in f.filename):
        hits = [f for f in frames if pick(f)]
        if hits:
            f = hits[-1]
            return f"{f.filename.rsplit('/', 2)[-2]}/{f.filename.rsplit('/', 1)[-1]}:{f.lineno} ({f.name})"
    return "?"


def _flat(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flat(y)
    else:
        yield x


@dataclass
class Op:
    name: str
    args: tuple
    where: str
    kernel: bool = True  # False: a view or a no-op conversion (its output is an input's memory; launches nothing)


@dataclass
class Trace:
    ops: list[Op] = field(default_factory=list)

    @property
    def kernels(self) -> int:
        """Ops that compute or copy (what a GPU launches); views and no-op conversions excluded."""
        return sum(o.kernel for o in self.ops)

    @property
    def syncs(self) -> list[Op]:
        """The host read-backs."""
        return [o for o in self.ops if o.name in SYNC_OPS]

    @property
    def dynamic(self) -> list[Op]:
        """The ops whose output shape depends on data."""
        return [o for o in self.ops if o.name in DYNAMIC_SHAPE_OPS]


class StepTrace(TorchDispatchMode):
    """Record one step's aten ops (see the module docstring). ``locate``: keep each op's Python
    line (slow: a stack walk per op)."""

    def __init__(self, locate: bool = True):
        super().__init__()
        self.trace = Trace()
        self.locate = locate
        self._temps: dict[int, int] = {}  # storage address -> index of the temporary created there
        self._n = 0  # temporaries created so far

    def _sig(self, x):
        if isinstance(x, torch.Tensor):
            st = x.untyped_storage().data_ptr() if x.layout == torch.strided else 0
            base = ("T", self._temps[st]) if st in self._temps else ("P", st)
            return (*base, tuple(x.shape), tuple(x.stride()) if x.layout == torch.strided else (),
                    x.storage_offset() if x.layout == torch.strided else 0, str(x.dtype), x.device.type)
        if isinstance(x, (list, tuple)):
            return type(x).__name__, tuple(self._sig(y) for y in x)
        if isinstance(x, dict):
            return tuple((k, self._sig(v)) for k, v in sorted(x.items()))
        if isinstance(x, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
            return str(x)
        return x

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        op = Op(name, (self._sig(args), self._sig(kwargs)), _where() if self.locate else "")
        out = func(*args, **kwargs)
        inputs = {a.untyped_storage().data_ptr() for a in _flat((args, tuple(kwargs.values())))
                  if isinstance(a, torch.Tensor) and a.layout == torch.strided}
        aliases = False
        for t in (out if isinstance(out, (list, tuple)) else (out,)):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                st = t.untyped_storage().data_ptr()
                if st in inputs:
                    aliases = True
                else:
                    self._temps[st] = self._n  # a new buffer (not a view or in-place result of an input)
                    self._n += 1
        op.kernel = not (func.is_view or (aliases and not func._schema.is_mutable))
        self.trace.ops.append(op)
        return out


def trace_call(fn, *args, locate: bool = True, **kwargs) -> tuple[Trace, object]:
    """Run ``fn(*args, **kwargs)`` under a :class:`StepTrace`; returns (its trace, its result)."""
    with StepTrace(locate) as m:
        out = fn(*args, **kwargs)
    return m.trace, out


@dataclass
class Audit:
    """What :func:`audit_decode` found for one engine configuration."""

    ops_per_step: int
    ops_per_layer: float
    kernels_per_layer: float  # the ops that compute or copy (views excluded): what a GPU step launches
    syncs: list[str]  # "op at where" for every host read-back of the step
    dynamic: list[str]  # ops whose output shape depends on data
    differences: list[str]  # the first ops where step j + 1's trace differs from step j's
    n_differences: int
    differing_lines: dict[str, int]  # Python line -> ops it issued that differ between the two steps

    @property
    def replayable(self) -> bool:
        return not self.syncs and not self.dynamic and not self.n_differences

    def summary(self, lines: int = 8) -> str:
        head = (f"{self.ops_per_step} ops per step ({self.ops_per_layer:.0f} per layer, {self.kernels_per_layer:.0f} of them "
                f"kernels), {len(self.syncs)} host read-backs, "
                f"{len(self.dynamic)} data-dependent shapes, {self.n_differences} ops differ between two steps")
        out = [head] + [f"  read-back: {s}" for s in self.syncs[:10]] + [f"  dynamic: {s}" for s in self.dynamic[:10]]
        top = sorted(self.differing_lines.items(), key=lambda kv: -kv[1])[:lines]
        return "\n".join(out + [f"  differs ({n} ops): {w}" for w, n in top])


def compare(a: Trace, b: Trace, limit: int = 12) -> tuple[int, list[str], dict[str, int]]:
    """How many op positions differ between two traces, the first ``limit`` of them, and the
    count per Python line (of the first trace)."""
    n, out, lines = abs(len(a.ops) - len(b.ops)), [], {}
    if len(a.ops) != len(b.ops):
        out.append(f"the steps issue {len(a.ops)} and {len(b.ops)} ops")
    for i, (x, y) in enumerate(zip(a.ops, b.ops)):
        if x.name != y.name or x.args != y.args:
            n += 1
            lines[x.where] = lines.get(x.where, 0) + 1
            if len(out) < limit:
                what = "op" if x.name != y.name else "arguments"
                out.append(f"#{i} {x.name} at {x.where} / {y.name} at {y.where}: {what} differ")
    return n, out, lines


def audit_decode(engine, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 warmup: int = 2, locate: bool = True) -> Audit:
    """Generate with ``engine`` and trace decode steps ``warmup + 1`` and ``warmup + 2`` (each one
    model forward); the engine runs as it always does (its own route, plan and prefill), but its
    static step is not captured as a CUDA graph (the ops traced are those a capture records)."""
    from . import engine as E

    traces: list[Trace] = []
    real = E.greedy_steps

    def traced(model, tok, mask, cache, new_tokens, before=None, keep_logits=False, **kw):
        step = [0]

        def model_traced(**kw):
            step[0] += 1
            if step[0] <= warmup:
                return model(**kw)
            trace, out = trace_call(model, locate=locate, **kw)
            traces.append(trace)
            return out

        return real(model_traced, tok, mask, cache, new_tokens, before, keep_logits, **kw)

    class Uncaptured:  # on CUDA: trace the step itself, not a capture of it (what a capture would record)
        status = "eager (audited)"

        def __init__(self, step, *args, **kwargs):
            self.step = step

        def __call__(self, **kw):
            return self.step(**kw)

    replayed, E.greedy_steps, E.Replayed = E.Replayed, traced, Uncaptured
    try:
        engine.generate(input_ids, attention_mask, max_new_tokens=warmup + 3)
    finally:
        E.greedy_steps, E.Replayed = real, replayed
    a, b = traces
    n, diffs, lines = compare(a, b)
    L = engine.model.config.num_hidden_layers
    fmt = lambda o: f"{o.name} at {o.where}"  # noqa: E731
    return Audit(len(b.ops), len(b.ops) / L, b.kernels / L, [fmt(o) for o in b.syncs], [fmt(o) for o in b.dynamic], diffs, n, lines)


def main(argv=None) -> int:
    """``python -m alisa.runtime.audit``: audit the Phase-I decode step of every built-in policy
    on a tiny random model, on the reference route (CUDA's)."""
    from .. import attention
    from ..config import OneLineArgumentParser
    from ..policies import make_policy
    from ..testing import FAMILIES, tiny_model
    from .engine import Engine

    ap = OneLineArgumentParser(prog="python -m alisa.runtime.audit", description=main.__doc__)
    ap.add_argument("--family", default="llama", choices=sorted(FAMILIES))
    ap.add_argument("--policies", default="dense,local,sinks,h2o,swa,tova,snapkv,quest")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--lines", type=int, default=8, help="differing Python lines to show per policy")
    a = ap.parse_args(argv)
    ap.at_least(a, lines=0)
    try:
        policies = [make_policy(p) if p == "dense" else make_policy(p, sparsity=a.sparsity) for p in a.policies.split(",")]
    except ValueError as e:
        print(f"error: {e}")
        return 2
    model = tiny_model(a.family)
    ids = torch.randint(2, model.config.vocab_size, (4, 64), generator=torch.Generator().manual_seed(0))
    saved, attention.ROUTE = attention.ROUTE, "reference"
    try:
        for policy in policies:
            prefill = "dense" if policy.shares_dense_prefill("dense") else "sparse"
            print(f"{policy!r} (prefill {prefill}): " + audit_decode(Engine(model, policy, prefill=prefill), ids).summary(a.lines),
                  flush=True)
    finally:
        attention.ROUTE = saved
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
