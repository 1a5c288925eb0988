"""Batched greedy generation over a tiered, token-granular KV store (the ALISA runtime).

The prompt is prefilled through the core path (``alisa.apply``: the same policy code,
masks and eviction as the accuracy path); each layer's store is then adopted by a
:class:`~alisa.runtime.tiered.TieredStore` and every decode step runs the policy's
selection there, moving tokens between tiers as the :class:`~alisa.runtime.tiered.Plan`
says. :meth:`Engine.generate` returns the tokens and what was measured.
"""

from __future__ import annotations

import contextlib
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..integration import AlisaCache, apply
from ..policies import Policy, make_policy
from .linear import check as check_linear
from .linear import decode_linear
from .recompute import capture_inputs, kv_from_inputs
from .tiered import Link, Plan, TieredStore, Traffic


class BudgetTooSmall(ValueError):
    """A device budget below what one decode step needs under any plan (bad input, not a measurement)."""


class BudgetExceeded(RuntimeError):
    """A tier holds more KV than its budget allows (reported as out of memory)."""


class TieredCache(AlisaCache):
    """An :class:`AlisaCache` whose layers move to a :class:`TieredStore` after the prompt."""

    def __init__(self, policy: Policy, num_layers: int, *, model, plan: Plan, int8: bool, device, host,
                 recorder=None, reserve: int = 0, prefetch: bool = False):
        super().__init__(policy, num_layers)
        self.model, self.plan, self.int8 = model, plan, int8
        self.device, self.host = torch.device(device), torch.device(host)
        self.recorder = recorder
        self.reserve = reserve
        self.link = Link(self.device)  # one pair of copy streams for every layer
        self.prefetch = prefetch  # fetch layer l + 1's selected host keys right after layer l's step
        self.tiered: list[TieredStore | None] = [None] * num_layers
        self.step = 0  # the decode step the next schedule prepares for (sets :attr:`steady`)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        ts = self.tiered[layer_idx]
        if ts is None:  # the prompt: the core path's store
            return super().update(key_states, value_states, layer_idx)
        if key_states.shape[2] != 1:
            raise ValueError(f"the runtime decodes one token per step after the prompt (got a chunk of {key_states.shape[2]})")
        x = self.recorder[layer_idx] if self.plan.records_inputs else None
        ts.append(key_states, value_states, self.chunk_pos, x)
        if not ts.static:  # a static step counts it outside (:meth:`between_steps`): a compiled step would guard on it
            self.layers[layer_idx].store.seen += 1
        return key_states, value_states

    def attend(self, layer_idx, query, chunk, scale, sliding_window, stats):
        if sliding_window is not None:
            raise ValueError("the runtime does not combine a model's own sliding window with a policy; use the accuracy path")
        ts = self.tiered[layer_idx]
        if ts is None:  # the prompt: the core path exactly (masks, eviction), then the runtime takes over
            out = super().attend(layer_idx, query, chunk, scale, sliding_window, stats)
            store = self.store(layer_idx)
            x = self.recorder[layer_idx] if self.plan.records_inputs else None
            ts = self._adopt(layer_idx, *store.kv(), store.state, x, chunk.q_pos)
        else:
            def recompute(x, positions):
                return kv_from_inputs(self.model, layer_idx, x, positions)

            n_max = ts.n_max if ts.static else self.layers[layer_idx].store.seen  # static: one bound for every step
            out = ts.attend(query, chunk.q_pos[:, 0], scale, recompute, stats, layer_idx, n_max=n_max)
            if self.policy.evicts:
                ts.evict(self.policy.retain(ts.pos, chunk.t_next, ts.state))
            if ts.static:  # the tiers move after the whole forward (:meth:`static_step`, :meth:`between_steps`)
                return out
        ts.schedule(self.plan, self.step, chunk.t_next)
        if self.prefetch:  # the next layer's query in this step, or layer 0's in the next one (if there is one)
            last = layer_idx + 1 == len(self.tiered)
            following = self.tiered[0 if last else layer_idx + 1]
            if following is not None and not (last and self.step + 1 >= self.reserve):  # reserve: the tokens to decode
                following.prefetch(chunk.t_next if last else chunk.q_pos[:, 0])
        return out

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, step: int) -> None:
        self._step = step
        self.steady = self.steady_phase(step)  # what the static step reads: a compiled step guards on it, not on the step

    def _adopt(self, layer_idx: int, k, v, pos, state, x=None, x_pos=None) -> TieredStore:
        ts = TieredStore(self.policy, self.device, self.host, self.int8, k.dtype, self.reserve, self.link)
        store = self.store(layer_idx)
        store.seen = max(store.seen, pos.shape[1])
        ts.adopt(k, v, pos, state, x, x_pos, n_max=store.seen + self.reserve)  # the bound every decode step passes
        store.keys = store.values = store.pos = store.state = None  # the tiered store owns the tokens now
        self.tiered[layer_idx] = ts
        return ts

    def adopt_prefill(self, kv: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> None:
        """Start from a shared dense prefill's K, V (copied once, into the device pool), evicted as
        this (stateless) policy says."""
        q_pos = self.begin(mask)
        keep = self.policy.retain(q_pos, self.n_real, None)
        for l, (k, v) in enumerate(kv):
            self._adopt(l, k, v, torch.where(keep, q_pos, -1), None).schedule(self.plan, self.step, self.n_real)

    def make_static(self) -> None:
        """Fix the shapes of every layer's decode step for the tokens still to decode
        (:meth:`TieredStore.make_static`)."""
        for ts in self.tiered:
            ts.make_static(self.reserve, self.plan)

    def steady_phase(self, step: int) -> int | None:
        """The plan's phase at decode ``step`` if the tiers move in it and it was in effect the step
        before too: then the fixed step moves them itself (:meth:`static_step`); None otherwise."""
        phase = self.plan.phase(step)
        return phase if phase > 1 and self.plan.phase(step - 1) == phase else None

    def static_step(self, model):
        """The fixed-shape decode step: ``model``'s forward, then every layer's tier moves for the
        next step in fixed widths (:meth:`TieredStore.schedule_static`) in a steady phase; one
        callable, so a CUDA graph captures both."""
        def step(**inputs):
            out = model(**inputs)
            if self.steady is not None:
                for ts in self.tiered:
                    ts.schedule_static(self.plan, self.steady, self.n_real)
            return out
        return step

    def between_steps(self, step: int) -> None:
        """A static decode, after its step ``step``: count the step's transfers and, where the
        step did not (a phase starts: its first move is large; a layer's rows had more to move than
        its fixed slots), move the tiers as the plan says for the next one (what the eager step
        does after each layer's attention; the prompt's forward ran its own schedule)."""
        for layer in self.layers:
            layer.store.seen += 1
        steady = self.steady_phase(step) is not None
        late = torch.stack([ts.late for ts in self.tiered]).tolist() if steady else [1] * len(self.tiered)  # one read-back
        for ts, n in zip(self.tiered, late):
            ts.static_step_traffic(steady)
            if n:  # rows the step's fixed-width moves could not finish (or a phase starts)
                ts.schedule(self.plan, step, self.n_real)

    def static_key(self) -> tuple:
        """What the static step does (:meth:`TieredStore.static_key` of every layer, and its tier moves)."""
        return (self.steady, *(ts.static_key() for ts in self.tiered))

    def kv_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for ts in self.tiered:
            if ts is not None:
                for k, v in ts.kv_bytes().items():
                    out[k] = out.get(k, 0) + v
        return out

    def counts(self) -> dict[str, float]:
        """Tokens per sequence in each tier, summed over layers then averaged per layer."""
        live = [ts.counts() for ts in self.tiered if ts is not None]
        return {k: sum(c[k] for c in live) / len(live) for k in live[0]} if live else {}

    def traffic(self) -> Traffic:
        self.link.settle()
        total = Traffic()
        for ts in self.tiered:
            if ts is not None:
                ts.settle_static()
                total.add(ts.traffic)
        return total


@dataclass
class Generation:
    tokens: torch.Tensor  # (B, new) generated token ids
    prefill_s: float
    step_s: list[float]
    kv: dict[str, int]  # peak bytes held per tier over the run (summed over layers)
    tiers: list[dict[str, float]]  # tokens per tier (mean per layer and sequence) before each decode step
    phases: list[int]
    traffic: Traffic
    kept_fraction: float | None
    peak_rss_bytes: int
    peak_cuda_bytes: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def total_s(self) -> float:
        return self.prefill_s + sum(self.step_s)

    def summary(self) -> dict:
        B, new = self.tokens.shape
        decode_s = sum(self.step_s)
        return {
            "batch": B, "new_tokens": new,
            "throughput_tok_s": B * new / self.total_s,  # the paper's metric: generated tokens / end-to-end time
            "decode_tok_s": B * len(self.step_s) / decode_s if decode_s > 0 else None,
            "prefill_s": self.prefill_s, "decode_s": decode_s, "total_s": self.total_s,
            "step_s_mean": decode_s / len(self.step_s) if self.step_s else None,
            "step_s_median": statistics.median(self.step_s) if self.step_s else None, "step_s": list(self.step_s),
            "kv_bytes_peak": self.kv, "tiers_per_step": self.tiers, "phase_per_step": self.phases,
            "phase_switch_steps": _switches(self.phases),
            "bytes_d2h": self.traffic.d2h_bytes, "bytes_h2d": self.traffic.h2d_bytes,
            "tokens_offloaded": self.traffic.tokens_offloaded, "tokens_fetched": self.traffic.tokens_fetched,
            "tokens_deleted": self.traffic.tokens_deleted, "tokens_recomputed": self.traffic.tokens_recomputed,
            "prefetch_hits": self.traffic.prefetch_hits, "prefetch_misses": self.traffic.prefetch_misses,
            "moves_late": self.traffic.moves_late,
            "seconds_transfer": self.traffic.seconds["transfer"], "seconds_recompute": self.traffic.seconds["recompute"],
            "seconds_gather": self.traffic.seconds.get("gather"),
            "kept_fraction": self.kept_fraction, "peak_rss_bytes": self.peak_rss_bytes,
            "peak_cuda_bytes": self.peak_cuda_bytes, **self.extra,
        }


def _switches(phases: list[int]) -> dict[str, int | None]:
    first = {}
    for j, p in enumerate(phases):
        first.setdefault(p, j)
    return {"phase2": first.get(2), "phase3": first.get(3)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """What ``generate`` passes: real positions, padding at 1."""
    p = mask.long().cumsum(-1) - 1
    return p.masked_fill(mask == 0, 1)


def greedy_steps(model, tok: torch.Tensor, mask: torch.Tensor, cache, new_tokens: int, before=None,
                 keep_logits: bool = False, static: bool = False, after=None) -> tuple[list[torch.Tensor], list[float], list[torch.Tensor]]:
    """The loop greedy ``generate`` runs after the prompt: one token per forward, each timed.

    ``tok`` (B,) is the token the prompt produced; ``before(j)`` runs ahead of forward ``j``
    (untimed: measurement), ``after(j)`` right after it (timed: part of the step). Returns the
    tokens (``tok`` first), the per-step seconds and, with ``keep_logits``, each step's
    last-position logits.

    ``static``: every forward gets the same input buffers, updated in place (the token, its
    position, a one-column padding mask: decode tokens are real), as a captured graph needs;
    the model must not build a mask from the whole history (alisa's attention does not)."""
    dev = mask.device
    tokens, steps, logits = [tok], [], []
    if static:
        ids, pos, ones = tok[:, None].clone(), position_ids(mask)[:, -1:].clone(), mask.new_ones(mask.shape[0], 1)
    for j in range(1, new_tokens):
        if before is not None:
            before(j)
        if static:
            ids.copy_(tok[:, None])
            pos += 1
            inputs = dict(input_ids=ids, attention_mask=ones, position_ids=pos)
        else:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], 1)
            inputs = dict(input_ids=tok[:, None], attention_mask=mask, position_ids=position_ids(mask)[:, -1:])
        t0 = time.perf_counter()
        out = model(**inputs, cache=cache, use_cache=True)
        tok = out.logits[:, -1].argmax(-1)
        if after is not None:
            after(j)
        _sync(dev)
        steps.append(time.perf_counter() - t0)
        tokens.append(tok)
        if keep_logits:
            logits.append(out.logits[:, -1].to(torch.float32, copy=True))  # a replayed graph reuses its output buffer
    return tokens, steps, logits


class Replayed:
    """A decode forward captured once as a CUDA graph, then replayed (``greedy_steps(static=True)``
    passes the same input buffers every call, and a static cache keeps every shape and buffer).

    The first ``warmup`` calls run eagerly (real steps: they also initialise what a capture may
    not, e.g. the BLAS handles); the next one is captured, which runs no kernel, and then
    replayed once to compute it. ``key()`` says what the step does (e.g. whether it fetches host
    keys, :meth:`TieredCache.static_key`): when it changes, the graph is dropped, the next call
    runs eagerly (its new ops' first run) and the one after is captured again. If a capture
    fails, ``error`` says why and every later step runs eagerly (the failed capture ran nothing,
    so the step is simply run again)."""

    def __init__(self, model, key=lambda: None, warmup: int = 2):
        self.model, self.key, self.warmup = model, key, warmup
        self.graph = self.out = self.error = None
        self.captures = 0
        self._key = None

    @property
    def status(self) -> str:
        if self.error:
            return f"eager (capture failed: {self.error})"
        if self.graph is None:
            return "eager (not captured yet)"
        return "captured" if self.captures == 1 else f"captured ({self.captures} graphs: the step changed {self.captures - 1}x)"

    def __call__(self, **inputs):
        key = self.key()
        if self.graph is not None and key != self._key:
            self.graph = self.out = None  # the step does something else now: one eager run, then capture it again
            self.warmup = 1
        if self.graph is not None:
            self.graph.replay()
            return self.out
        if self.warmup > 0 or self.error is not None:
            self.warmup -= 1
            return self.model(**inputs)
        graph, failed = torch.cuda.CUDAGraph(), None
        try:
            with torch.cuda.stream(torch.cuda.current_stream()):  # current again even when ending the capture fails
                with torch.cuda.graph(graph):
                    try:
                        out = self.model(**inputs)
                    except Exception as e:  # noqa: BLE001 - ending the broken capture then raises its own error
                        failed = e
                        raise
        except Exception as e:  # noqa: BLE001 - reported in the record; the step runs eagerly instead
            cause = failed or e
            self.error = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"[:300]
            return self.model(**inputs)
        self.graph, self.out, self._key = graph, out, key
        self.captures += 1
        graph.replay()
        return out


class Compiled:
    """The static decode step compiled once per run by ``torch.compile`` (inductor, fixed shapes,
    one graph: a break is an error): the step's many small ops fused into fewer kernels, for the
    CPU and, inside :class:`Replayed`, for a CUDA graph. Stateful policies run their PyTorch
    reference route in it (:func:`alisa.attention.route`); the step is the uncompiled one's.

    The step re-specializes where what it does changes (a plan's phase; the host pool's first
    tokens): a handful of graphs per run, counted in :attr:`graphs`, their seconds (the calls that
    compiled) in :attr:`compile_s`. Every run compiles afresh (new buffers, new hooks), so the
    previous run's graphs are dropped first, not piled up against dynamo's recompile limit (past
    it dynamo would run the step uncompiled, silently). If compiling fails (no C++ compiler, an op
    inductor cannot lower, more than ``RECOMPILE_LIMIT`` graphs), :attr:`error` says why and every
    later step runs uncompiled (a failed compile ran nothing)."""

    BACKEND = None  # None: ``ALISA_COMPILE_BACKEND`` (:func:`alisa.config.compile_backend`); tests set a name or a callable
    RECOMPILE_LIMIT = 32

    @classmethod
    def backend(cls):
        from ..config import compile_backend  # (the config module brings Hydra: only where a step is compiled)

        return compile_backend() if cls.BACKEND is None else cls.BACKEND

    def __init__(self, step):
        self.step, self.error, self.graphs, self.compile_s = step, None, 0, 0.0
        self.backend_name = self.backend()
        torch._dynamo.eval_frame.remove_from_cache(step)  # the last run's graphs (its closure shares this code)
        self.fn = torch.compile(step, backend=self.backend_name, dynamic=False, fullgraph=True)

    @property
    def status(self) -> str:
        if self.error:
            return f"not compiled (compile failed: {self.error})"
        return f"compiled ({self.backend_name}, {self.graphs} graph{'s' if self.graphs != 1 else ''})"

    def __call__(self, **inputs):
        if self.error is not None:
            return self.step(**inputs)
        from torch._dynamo.utils import counters

        before, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
        try:
            with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT, fail_on_recompile_limit_hit=True):
                out = self.fn(**inputs)
        except torch._dynamo.exc.TorchDynamoException as e:  # reported in the record; the step runs uncompiled
            cause = getattr(e, "inner_exception", None) or e  # a backend's own error, e.g. no C++ compiler
            msg = str(cause).strip()
            self.error = f"{type(e).__name__}: {type(cause).__name__}: {msg.splitlines()[0] if msg else ''}"[:300]
            return self.step(**inputs)
        new = counters["stats"]["unique_graphs"] - before
        if new:
            self.graphs += new
            self.compile_s += time.perf_counter() - t0
        return out


def shares_dense_prefill(policy: Policy, prefill: str) -> bool:
    """Whether the prompt pass under ``policy`` is the unmodified model's (so one can serve many runs)."""
    return policy.shares_dense_prefill(prefill)


@dataclass
class Prefilled:
    """One dense prefill of a prompt, shared by variants that would compute the same one."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]  # per layer (B, H_kv, T, D)
    logits: torch.Tensor  # (B, V) at the last position
    seconds: float


@torch.inference_mode()
def dense_prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Prefilled:
    """The unmodified model's prompt forward with its default cache (what stock ``generate`` runs first).
    ``Prefilled.kv`` holds that cache's own tensors: users copy them."""
    dev = next(model.parameters()).device
    ids = input_ids.to(dev)
    mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(dev)
    _sync(dev)
    t0 = time.perf_counter()
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
    _sync(dev)
    seconds = time.perf_counter() - t0
    cache = out.cache if getattr(out, "cache", None) is not None else out.past_key_values
    return Prefilled([(l.keys, l.values) for l in cache.layers], out.logits[:, -1], seconds)


class Engine:
    """Greedy batched generation with a policy, a three-phase plan and optional INT8 KV.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM of a covered family, on the device tier.
    policy : Policy or str
        The KV policy (the same object the accuracy path uses); a name takes ``policy_kwargs``.
    prefill : {"dense", "sparse"}
        How the prompt attends (docs/semantics.md §3, path 2).
    plan : Plan
        Tier schedule; the default keeps everything on the device (Phase I).
    int8 : bool
        Store (and move) KV as INT8, de-quantized before use.
    device_budget, host_budget : int, optional
        KV bytes each tier may hold; exceeding one raises :class:`BudgetExceeded`.
    prefetch : bool, optional
        Fetch each layer's selected host keys while the layer before it computes (exact: a
        fetch ahead that differs from the step's selection is redone). Default: on a CUDA
        device, where the copy overlaps compute; on the CPU it only reorders work.
    static : bool
        Decode with fixed shapes (:meth:`TieredStore.make_static`, ``greedy_steps(static=True)``):
        every step issues the same ops on the same buffers, with no host read-back, so that a
        CUDA graph can replay it (``python -m alisa.runtime.audit`` checks that on any device).
        Every plan, INT8 included: the step moves the tiers in fixed widths too (a phase's first
        move outside it), host keys are read into fixed fetch slots (on CUDA the device reads and
        writes mapped pinned memory). The tokens are the eager step's.
    compiled : bool
        With ``static``: compile the fixed step with ``torch.compile`` (:class:`Compiled`: inductor
        fuses its small ops; on CUDA the compiled step is what the CUDA graph captures). The first
        step of a run pays the compile (on a 2-core CPU 90-290 s for SmolLM2's 30 layers, 10-30 s
        with inductor's disk cache warm, a few seconds for a tiny test model; in ``step_s``, and
        apart in ``extra["compile_s"]``). Needs a C++ compiler on the CPU (Triton on CUDA); where
        compiling fails, the record's ``graph`` says why and the step runs uncompiled. The
        uncompiled static step is the reference: same tokens, logits within float rounding.
    linear : {"auto", "plain", "mm"}
        The GEMM form of the decode step's linear layers (:mod:`alisa.runtime.linear`): ``auto``
        times both on the CPU once per process and shape and keeps the faster (on CUDA and for
        tiny models: ``plain``, PyTorch's own); the choice and its timings are in the record.
    """

    def __init__(self, model, policy: Policy | str = "dense", *, prefill: str = "dense", plan: Plan | None = None,
                 int8: bool = False, device_budget: int | None = None, host_budget: int | None = None,
                 prefetch: bool | None = None, static: bool = False, compiled: bool = False, linear: str = "auto",
                 **policy_kwargs):
        self.model = model
        self.policy = make_policy(policy, **policy_kwargs) if isinstance(policy, str) else policy
        self.prefill, self.plan, self.int8 = prefill, plan or Plan(), int8
        self.budgets = (device_budget, host_budget)
        self.device = next(model.parameters()).device
        self.prefetch = self.device.type == "cuda" if prefetch is None else bool(prefetch)
        self.static = bool(static)
        if compiled and not self.static:
            raise ValueError(f"compiled={compiled!r} needs static=True: only the fixed-shape decode step is compiled")
        if compiled:
            Compiled.backend()  # a bad ALISA_COMPILE_BACKEND: one line now, not at the first step
        self.compiled = bool(compiled)
        self.linear = check_linear(linear)

    @torch.inference_mode()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 32,
                 keep_logits: bool = False, prefilled: "Prefilled | None" = None) -> Generation:
        """Greedy-decode ``max_new_tokens`` per sequence (left padding allowed); ``keep_logits``
        also returns each step's last-position logits in ``Generation.extra["logits"]`` (B, new, V).

        ``prefilled`` (from :func:`dense_prefill` on the same prompt) replaces the prompt's
        forward for a stateless policy with dense prefill: its K, V are copied into the store
        (then evicted as the policy says), and its time is reported as the prefill time."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: allowed is an integer >= 1")
        model, dev = self.model, self.device
        self.check_budget(input_ids.shape[0], input_ids.shape[1], max_new_tokens)
        ids = input_ids.to(dev)
        mask = (attention_mask if attention_mask is not None else torch.ones_like(ids)).to(dev)
        recorder = capture_inputs(model) if self.plan.records_inputs else contextlib.nullcontext()
        with recorder as rec, decode_linear(model, self.linear, ids.shape[0]) as linear:
            def factory(policy, n_layers):
                return TieredCache(policy, n_layers, model=model, plan=self.plan, int8=self.int8, device=dev,
                                   host="cpu", recorder=rec, reserve=max_new_tokens, prefetch=self.prefetch)

            with apply(model, self.policy, self.prefill, cache_factory=factory) as ctl:
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                _sync(dev)
                t0 = time.perf_counter()
                if prefilled is None:
                    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=True, logits_to_keep=1)
                    last, cache = out.logits[:, -1], ctl.last_cache
                    _sync(dev)
                    prefill_s = time.perf_counter() - t0
                else:
                    if not shares_dense_prefill(self.policy, self.prefill):
                        raise ValueError(f"a shared prefill serves stateless policies with prefill='dense', not {self.policy!r} "
                                         f"with prefill={self.prefill!r}")
                    cache = factory(self.policy, model.config.num_hidden_layers)
                    cache.adopt_prefill(prefilled.kv, mask)
                    last, prefill_s = prefilled.logits, prefilled.seconds
                tiers, phases = [], []
                peak: dict[str, int] = {}

                def before(j: int) -> None:  # what the tiers hold going into decode step j - 1
                    self._track(peak, cache.kv_bytes())
                    tiers.append(cache.counts())
                    phases.append(self.plan.phase(j - 1))
                    cache.step = j

                step, after, extra = model, None, {"linear": linear}
                if self.static:
                    cache.make_static()
                    ctl.stats.ready(range(len(cache.tiered)), dev)
                    step, after = cache.static_step(model), cache.between_steps
                    compiled = Compiled(step) if self.compiled else None
                    step = compiled or step
                    step = Replayed(step, cache.static_key) if dev.type == "cuda" else step
                tokens, steps, logits = greedy_steps(step, last.argmax(-1), mask, cache, max_new_tokens, before, keep_logits,
                                                     static=self.static, after=after)
                if self.static:
                    extra["graph"] = step.status if isinstance(step, Replayed) else "eager (no CUDA graphs on the CPU)"
                    if compiled is not None:
                        extra["graph"] += f"; {compiled.status}"
                        extra["compile_s"] = compiled.compile_s
                if keep_logits:
                    extra["logits"] = torch.stack([last.float(), *logits], 1)
                self._track(peak, cache.kv_bytes())
                return Generation(
                    tokens=torch.stack(tokens, 1), prefill_s=prefill_s, step_s=steps, kv=peak, tiers=tiers, phases=phases,
                    traffic=cache.traffic(), kept_fraction=ctl.kept_fraction()["overall"],
                    peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                    peak_cuda_bytes=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
                    extra=extra)

    def check_budget(self, batch: int, prompt: int, new_tokens: int) -> None:
        """:class:`BudgetTooSmall` (one line, naming the value and the minimum) when the device budget is below
        what every plan needs: the local window of every layer stays on the device (FlexGen-style
        plans: the token each step writes). A budget above that floor that Phase I still exceeds
        is a measurement (:class:`BudgetExceeded`, an out-of-memory record), not bad input."""
        from .costmodel import Workload, device_floor

        budget = self.budgets[0]
        if budget is None:
            return
        dtype = torch.int8 if self.int8 else self.model.dtype  # int8: the payload alone, a lower bound
        floor = device_floor(self.model.config, dtype, self.policy, Workload(batch, prompt, new_tokens), self.plan.local_on_device)
        if budget < floor:
            raise BudgetTooSmall(f"device_budget={budget} B is below what one decode step needs under {self.policy!r} "
                             f"(batch {batch}, prompt {prompt}, {new_tokens} new): allowed is >= {floor} B")

    def _track(self, peak: dict[str, int], now: dict[str, int]) -> None:
        """Keep the peak of each figure; enforce the tier budgets."""
        for k, v in now.items():
            peak[k] = max(peak.get(k, 0), v)
        dev_budget, host_budget = self.budgets
        if dev_budget is not None and now.get("device", 0) > dev_budget:
            raise BudgetExceeded(f"device KV {now['device']} B exceeds the device budget {dev_budget} B")
        host = now.get("host", 0) + now.get("inputs", 0)
        if host_budget is not None and host > host_budget:
            raise BudgetExceeded(f"host KV {host} B exceeds the host budget {host_budget} B")
