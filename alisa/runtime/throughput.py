"""Throughput of one (system, policy, sparsity) point on one workload, with the baselines.

Systems, measured side by side on the same prompts:

* ``stock``: the unmodified model with transformers' default dense cache, greedy
  (the loop ``generate`` runs: one prompt forward, then one forward per token);
* ``hf_offloaded``: the same with transformers' offloaded ``DynamicCache(offloading=True)`` (needs CUDA; recorded
  as skipped elsewhere);
* ``hf_static``: the same with transformers' ``StaticCache`` (preallocated for prompt + new tokens,
  written in place); on CUDA the forward is compiled (``torch.compile(mode="reduce-overhead")``,
  CUDA graphs) with untimed warm-up steps, on the CPU it runs eager (the record says why);
* ``flexgen``: FlexGen-style static offload: the engine with the dense policy and a fixed
  fraction of all KV on the host, all of it moved to the device every step;
* ``engine``: the ALISA runtime with the point's policy (and a plan searched with the
  cost model when a profile and budgets are given).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict

import torch

from ..policies import Policy, make_policy
from . import SYSTEMS
from .engine import (BudgetExceeded, Engine, Prefilled, _sync, dense_prefill, greedy_steps, position_ids,
                     shares_dense_prefill)
from .tiered import Plan

STATIC_WARMUP_STEPS = 3  # compiled forwards before the timed ones: compile, CUDA-graph warm-up, record


def workload_prompts(tokenizer, batch: int, prompt: int, seed: int = 0, vocab: int | None = None) -> torch.Tensor:
    """(batch, prompt) token ids: windows of WikiText-2 test text (the local data folder) for a
    real tokenizer, else uniform random ids (random-weight models)."""
    g = torch.Generator().manual_seed(seed)
    if tokenizer is None:
        return torch.randint(10, vocab, (batch, prompt), generator=g)
    from ..data import load_rows

    text = "\n".join(r["page"] for r in load_rows("wikitext", "test"))
    ids = torch.tensor(tokenizer(text[: 12 * prompt * batch + 100_000]).input_ids)
    if len(ids) < prompt + batch:
        raise ValueError(f"WikiText-2 has too few tokens for prompt={prompt}")
    starts = torch.randint(0, len(ids) - prompt, (batch,), generator=g)
    return torch.stack([ids[s:s + prompt] for s in starts.tolist()])


@torch.inference_mode()
def stock_generate(model, ids: torch.Tensor, new_tokens: int, prefilled: Prefilled | None = None, offloaded: bool = False) -> dict:
    """Greedy decode with transformers' own ``DynamicCache`` (``offloading=True``: layers move to
    the CPU between uses, transformers' offloaded cache) after the unmodified prompt pass
    (``prefilled``, computed here when not given); per-step times."""
    from transformers import DynamicCache

    dev = next(model.parameters()).device
    ids = ids.to(dev)
    mask = torch.ones_like(ids)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    shared = prefilled is not None
    prefilled = prefilled or dense_prefill(model, ids, mask)
    cache = DynamicCache(offloading=offloaded)
    for l, (k, v) in enumerate(prefilled.kv):
        cache.update(k.clone() if shared else k, v.clone() if shared else v, l)
    prefill_s = prefilled.seconds
    tokens, steps, _ = greedy_steps(model, prefilled.logits.argmax(-1), mask, cache, new_tokens)
    return _cache_record(tokens, steps, prefill_s, cache, dev)


def _cache_record(tokens: list[torch.Tensor], steps: list[float], prefill_s: float, cache, dev: torch.device) -> dict:
    """The record of a greedy run on one of transformers' caches (all its KV on the device)."""
    kv = sum(l.keys.numel() * l.keys.element_size() + l.values.numel() * l.values.element_size() for l in cache.layers)
    B, new_tokens, decode_s = tokens[0].shape[0], len(tokens), sum(steps)
    return {"tokens": torch.stack(tokens, 1), "batch": B, "new_tokens": new_tokens,
            "throughput_tok_s": B * new_tokens / (prefill_s + decode_s), "decode_tok_s": B * len(steps) / decode_s if decode_s else None,
            "prefill_s": prefill_s, "decode_s": decode_s, "total_s": prefill_s + decode_s,
            "step_s_mean": decode_s / len(steps) if steps else None,
            "step_s_median": statistics.median(steps) if steps else None, "step_s": list(steps),
            "kv_bytes_peak": {"device": kv, "host": 0}, "bytes_d2h": None, "bytes_h2d": None, "tokens_recomputed": 0,
            "peak_cuda_bytes": torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None}


class _StaticForward:
    """The model's forward for a ``StaticCache`` of ``length`` positions: the attention mask is
    padded to that length (zeros past the tokens written so far), so every decode step has the
    same input shapes and a compiled forward (CUDA graphs) is traced once. Called by
    :func:`greedy_steps` as it calls a model."""

    def __init__(self, model, length: int, compiled: bool):
        self.length = length
        self.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=False) if compiled else model.forward

    def __call__(self, *, input_ids, attention_mask, position_ids, **kw):
        mask = attention_mask.new_zeros(attention_mask.shape[0], self.length)
        mask[:, :attention_mask.shape[1]] = attention_mask
        # position_ids arrive as a column slice of a growing tensor (a new stride each step): a fresh
        # contiguous copy keeps the compiled graph's guards (and its CUDA graph) the same every step
        position_ids = position_ids.clone(memory_format=torch.contiguous_format)
        return self.forward(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, **kw)


def static_compile_reason(device: torch.device) -> str | None:
    """Why ``hf_static`` runs eager on ``device`` (None: it compiles)."""
    if device.type == "cuda":
        return None
    return (f"{device.type}: not compiled (torch.compile's CPU backend builds C++ with a compiler a fresh machine may "
            "lack, and mode='reduce-overhead' is CUDA graphs); eager StaticCache forward")


@torch.no_grad()  # not inference_mode: compiled CUDA graphs write the cache's (static) tensors in place
def static_generate(model, ids: torch.Tensor, new_tokens: int, prefilled: Prefilled | None = None,
                    compiled: bool | None = None, warmup: int | None = None) -> dict:
    """Greedy decode with transformers' ``StaticCache(max_cache_len=prompt + new_tokens)`` after the
    unmodified prompt pass (``prefilled``: its K, V written into the static tensors; else the prompt
    runs here into the static cache); per-step times. ``compiled`` (default: on CUDA) compiles the
    forward (mode ``reduce-overhead``). ``warmup`` untimed decode steps (default: STATIC_WARMUP_STEPS
    when compiled, else none) run first, then the cache is set back to the prompt in place (the
    positions they wrote are rewritten before any step reads them)."""
    from transformers import StaticCache

    dev = next(model.parameters()).device
    ids = ids.to(dev)
    mask = torch.ones_like(ids)
    B, T = ids.shape
    reason = static_compile_reason(dev)
    if compiled is None:
        compiled = reason is None
    elif compiled and dev.type != "cuda":
        raise ValueError(f"compiled=True is invalid on {dev.type}: allowed is a CUDA device (mode='reduce-overhead' is CUDA graphs)")
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    cache = StaticCache(config=model.config, max_cache_len=T + new_tokens)
    if prefilled is not None:
        for l, (k, v) in enumerate(prefilled.kv):
            cache.update(k, v, l)  # copied in place into the preallocated tensors
        last, prefill_s = prefilled.logits, prefilled.seconds
    else:
        _sync(dev)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), cache=cache, use_cache=True,
                    logits_to_keep=1)
        last = out.logits[:, -1]
        _sync(dev)
        prefill_s = time.perf_counter() - t0
    fwd = _StaticForward(model, T + new_tokens, compiled)
    warmup = min(STATIC_WARMUP_STEPS if warmup is None and compiled else warmup or 0, new_tokens - 1)
    warm_s = None
    if warmup > 0:
        t0 = time.perf_counter()
        greedy_steps(fwd, last.argmax(-1), mask, cache, warmup + 1)
        for layer in cache.layers:  # back to the prompt: in place (CUDA graphs hold these tensors' addresses)
            layer.cumulative_length.fill_(T)
        _sync(dev)
        warm_s = time.perf_counter() - t0
    tokens, steps, _ = greedy_steps(fwd, last.argmax(-1), mask, cache, new_tokens)
    return {**_cache_record(tokens, steps, prefill_s, cache, dev), "compiled": compiled, "warmup_s": warm_s, "warmup_steps": warmup,
            **({} if compiled else {"compile_reason": reason or "compiled=False asked for"})}


def run_point(model, system: str, ids: torch.Tensor, new_tokens: int, *, policy: str | Policy = "dense", sparsity: float | None = None,
              budget: int | None = None, prefill: str = "dense", int8: bool = False, plan: Plan | None = None,
              flexgen_fraction: float = 0.5, device_budget: int | None = None, host_budget: int | None = None,
              prefilled: Prefilled | None = None, static: bool = False, compiled: bool = False,
              linear: str = "auto") -> dict:
    """Measure one system on ``ids``; returns a flat record (status ok / oom / skipped / failed).
    ``static``: the engine's fixed-shape decode step (captured as a CUDA graph on a GPU);
    ``compiled``: that step compiled by ``torch.compile`` (:class:`~alisa.runtime.engine.Compiled`);
    ``linear``: the GEMM form of the engine's decode step (:mod:`alisa.runtime.linear`)."""
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}: allowed are {', '.join(SYSTEMS)}")
    dev = next(model.parameters()).device
    rec = {"system": system, "case": "cuda: device and host tiers across the real link" if dev.type == "cuda"
           else "cpu: both tiers in RAM, transfers are real copies", "prefill_shared": prefilled is not None}
    try:
        if system in ("stock", "hf_offloaded"):
            if system == "hf_offloaded" and dev.type != "cuda":
                return {**rec, "status": "skipped", "reason": "transformers' offloaded cache moves KV between a GPU and the CPU; no GPU here"}
            out = stock_generate(model, ids, new_tokens, prefilled, offloaded=system == "hf_offloaded")
            out.pop("tokens")
            return {**rec, "status": "ok", "policy": "dense", **out}
        if system == "hf_static":
            out = static_generate(model, ids, new_tokens, prefilled)
            out.pop("tokens")
            return {**rec, "status": "ok", "policy": "dense", **out}
        if system == "flexgen":
            pol, pl = make_policy("dense"), Plan(alpha=flexgen_fraction, p1=0, local_on_device=False)
        else:
            pol = policy if isinstance(policy, Policy) else make_policy(policy, sparsity=sparsity, budget=budget)
            pl = plan or Plan()
        use_shared = prefilled if shares_dense_prefill(pol, prefill) else None
        eng = Engine(model, pol, prefill=prefill, plan=pl, int8=int8, device_budget=device_budget, host_budget=host_budget,
                     static=static, compiled=compiled, linear=linear)
        g = eng.generate(ids, None, new_tokens, prefilled=use_shared)
        s = g.summary()
        return {**rec, "status": "ok", "prefill_shared": use_shared is not None, **pol.key, "prefill": prefill, "int8": int8,
                "plan": asdict(pl), "prefetch": eng.prefetch, **s}
    except (BudgetExceeded, torch.OutOfMemoryError, MemoryError) as e:
        return {**rec, "status": "oom", "error": f"{type(e).__name__}: {e}"}
