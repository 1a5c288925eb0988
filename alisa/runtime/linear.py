"""The decode step's linear layers, in the GEMM form this machine runs fastest.

A decode step multiplies a handful of rows (one per sequence) by every weight matrix. PyTorch's
``F.linear`` computes that as ``x @ W.T``; on the CPU, MKL runs the same product written as
``(W @ x.T).T`` 1.2-2.4x faster for 2-16 rows (SmolLM2's 211 matrices: 16 rows 74 -> 62 ms,
4 rows 70 -> 28 ms, side by side on this workplace's 2 cores). Which form wins depends on the BLAS
and the machine, so :func:`choose` times both on the model's own weights, once per process and
shape, and the engine uses the winner for inputs of at most ``rows`` rows (the prompt's large
products keep ``F.linear``). ``plain`` is the reference route: the two forms differ only in the
order of the floating-point sums (tests compare them).

Only ``nn.Linear`` modules without an instance-level ``forward`` (e.g. accelerate's hooks) are
rerouted; the originals are restored on exit.
"""

from __future__ import annotations

import contextlib
import time

import torch
import torch.nn.functional as F
from torch import nn

ROUTES = ("auto", "plain", "mm")
MIN_WEIGHT_BYTES = 32 * 2 ** 20  # below this (the tiny test models) the choice is not worth a measurement: plain
_CHOSEN: dict[tuple, dict] = {}


def mm_linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` as ``(W @ x.T).T`` (contiguous, ``x``'s leading shape)."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(module.weight, x2.t()).t().contiguous()
    if module.bias is not None:
        y += module.bias
    return y.view(*x.shape[:-1], y.shape[-1])


def _linears(model) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear) and "forward" not in m.__dict__]


def choose(model, rows: int, reps: int = 5) -> dict:
    """Which form runs the model's linear layers faster at ``rows`` rows: ``{"route", "plain_s",
    "mm_s"}`` (seconds for one pass over every layer, best of ``reps``) or ``{"route", "why"}``.

    The two forms' passes alternate (after one warm-up pass each), so a machine that speeds up or
    slows down during the measurement biases neither: measured back to back instead, the choice
    flipped between runs of the same process on this workplace's CPU."""
    mods = _linears(model)
    p = next(model.parameters())
    size = sum(m.weight.numel() * m.weight.element_size() for m in mods)
    if p.device.type != "cpu":
        return {"route": "plain", "why": f"measured only on the CPU (model on {p.device.type})"}
    if size < MIN_WEIGHT_BYTES:
        return {"route": "plain", "why": f"linear weights {size} B < {MIN_WEIGHT_BYTES} B: not measured"}
    key = (id(model), rows, p.dtype, size)
    if key not in _CHOSEN:
        xs = {n: torch.randn(rows, n, dtype=p.dtype) for n in {m.in_features for m in mods}}
        forms = {"plain": lambda m, x: F.linear(x, m.weight, m.bias), "mm": mm_linear}
        best = {name: float("inf") for name in forms}
        with torch.inference_mode():
            for rep in range(reps + 1):  # pass 0 warms up
                for name, f in forms.items():
                    t0 = time.perf_counter()
                    for m in mods:
                        f(m, xs[m.in_features])
                    if rep:
                        best[name] = min(best[name], time.perf_counter() - t0)
        _CHOSEN[key] = {"route": "mm" if best["mm"] < best["plain"] else "plain", "plain_s": best["plain"], "mm_s": best["mm"]}
    return dict(_CHOSEN[key])


def check(route) -> str:
    if route not in ROUTES:
        raise ValueError(f"linear={route!r} is invalid: allowed are {', '.join(ROUTES)}")
    return route


@contextlib.contextmanager
def decode_linear(model, route: str, rows: int):
    """Run the model's linear layers on ``route`` for inputs of at most ``rows`` rows; yields the
    record of the choice (``route`` ``auto``: :func:`choose`)."""
    check(route)
    info = choose(model, rows) if route == "auto" else {"route": route}
    mods = _linears(model) if info["route"] == "mm" else []

    def forward(module):
        def fwd(x):
            if x.numel() <= rows * x.shape[-1]:
                return mm_linear(module, x)
            return F.linear(x, module.weight, module.bias)
        return fwd

    for m in mods:
        m.forward = forward(m)
    try:
        yield info
    finally:
        for m in mods:
            del m.forward
