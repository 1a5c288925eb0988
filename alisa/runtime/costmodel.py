"""Cost model of a decode run and the greedy search for a three-phase plan (docs/semantics.md §1).

Predicted time of a run = Σ over decode steps j of Tc_j (weights + attention over the
device-resident KV) + Tm_j (bytes moved between tiers / measured copy bandwidth) +
Tr_j (recomputing deleted tokens: their inputs moved + the K, V projections). The rates
come from a :class:`Profile` measured on this machine (``python -m alisa.profile``).

The search is greedy, as in the paper: Phase II starts at the first step whose Phase-I
device KV would exceed the device budget, with the smallest ``alpha`` (on a grid) that
keeps every later step within it; then Phase III (``beta``, ``p2``) is added only where it
lowers the predicted time and fits the host budget, and never where recomputation cannot
save bytes (the stored input is at least as large as the KV it replaces, e.g. under GQA).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..policies import Policy
from .recompute import input_bytes_per_token, kv_bytes_per_token, recompute_flops_per_token
from .tiered import Plan

ALPHAS = [i / 20 for i in range(21)]
BETAS = [0.0, 0.25, 0.5, 0.75, 1.0]


@dataclass
class Profile:
    """What ``python -m alisa.profile`` measured (rates in bytes/s and FLOP/s)."""

    device: str
    hardware: dict
    model: str
    dtype: str
    step_base_s: float  # one decode step of the model at batch 1 with a tiny context (weights pass + overhead)
    step_per_seq_s: float  # extra per sequence in the batch (tiny context)
    attn_read_bw: float  # bytes/s reading KV in attention
    copy_bw: float  # bytes/s between the device and host tiers (gather + copy, as the runtime moves tokens)
    recompute_flops: float  # FLOP/s of the K, V projections on the device
    device_capacity: int  # bytes
    host_capacity: int  # bytes
    case: str = ""  # "cuda link" or "cpu: both tiers in RAM"
    extra: dict = field(default_factory=dict)
    # Measured rates the cost model stores but does not use (it predicts with copy_bw, the path the
    # runtime takes); optional, so that profiles written before they existed still read.
    hbm_copy_bw: float | None = None  # bytes/s copied device to device, one large contiguous tensor (cpu: RAM to RAM)
    h2d_pinned_bw: float | None = None  # bytes/s pinned host -> device, non_blocking on its own stream (cuda only)
    d2h_pinned_bw: float | None = None  # bytes/s device -> pinned host, likewise (cuda only)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Profile":
        names = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Workload:
    batch: int
    prompt: int
    new_tokens: int


def held_tokens(policy: Policy, n: int) -> float:
    """Tokens a sequence's cache holds at length n (per layer), as the policy evicts: the policy says."""
    return policy.expected_held(n)


def selected_tokens(policy: Policy, n: int) -> float:
    return policy.expected_selected(n)


@dataclass
class StepCost:
    compute_s: float
    transfer_s: float
    recompute_s: float
    device_bytes: float
    host_bytes: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.transfer_s + self.recompute_s


def residency(policy: Policy, wl: Workload, plan: Plan, step: int) -> tuple[float, float, float, float, float]:
    """Tokens per sequence and layer after decode step ``step`` (0-based) under ``plan``: held,
    selected by the next query, the local window (kept on the device), on the host, deleted."""
    n = wl.prompt + step + 1  # tokens per sequence after this step; the next query is at t = n
    held, sel = held_tokens(policy, n), selected_tokens(policy, n)
    k_loc = min(held, policy.recent_count(n + 1)) if plan.local_on_device else 0.0  # as TieredStore.schedule rounds
    phase = plan.phase(step)
    host = math.floor(plan.alpha * max(0.0, held - k_loc)) if phase >= 2 else 0.0
    gone = math.floor(plan.beta * host) if phase == 3 else 0.0
    return held, sel, k_loc, host, gone


def device_floor(config, dtype: str, policy: Policy, wl: Workload, local_on_device: bool = True) -> int:
    """The least device KV (bytes, all layers and sequences) that any plan can run in: every
    token but the local window on the host from the first step (alpha = 1), at the fullest step
    (with ``local_on_device=False``, FlexGen-style: the token each step writes)."""
    kvb = kv_bytes_per_token(config, dtype) * config.num_hidden_layers * wl.batch
    plan = Plan(alpha=1.0, p1=0, local_on_device=local_on_device)
    steps = range(max(1, wl.new_tokens - 1))
    return int(max(max(1.0, held - host) for held, _, _, host, _ in (residency(policy, wl, plan, j) for j in steps)) * kvb)


def step_cost(profile: Profile, config, dtype: str, policy: Policy, wl: Workload, plan: Plan, step: int) -> StepCost:
    """Predicted cost of decode step ``step`` (0-based) under ``plan``."""
    L = config.num_hidden_layers
    kvb = kv_bytes_per_token(config, dtype) * L * wl.batch  # one token of every sequence, all layers
    xb = input_bytes_per_token(config, dtype) * L * wl.batch
    held, sel, k_loc, host, gone = residency(policy, wl, plan, step)
    phase = plan.phase(step)
    on_dev = held - host
    # Selected tokens outside the local window are spread over the non-local ones.
    frac_sel = max(0.0, sel - k_loc) / max(1.0, held - k_loc)
    fetched, recomputed = frac_sel * (host - gone), frac_sel * gone
    compute = profile.step_base_s + profile.step_per_seq_s * (wl.batch - 1) + on_dev * kvb / profile.attn_read_bw
    offload = (plan.alpha if phase >= 2 else 0.0) * kvb  # about one token per step leaves the local window
    transfer = (fetched * kvb + offload) / profile.copy_bw
    recompute = 0.0
    if recomputed:
        recompute = recomputed * xb / profile.copy_bw + recomputed * recompute_flops_per_token(config) * L * wl.batch / profile.recompute_flops
    inputs = held * xb if plan.records_inputs else 0.0
    return StepCost(compute, transfer, recompute, on_dev * kvb, (host - gone) * kvb + inputs)


@dataclass
class Prediction:
    plan: Plan
    total_s: float
    compute_s: float
    transfer_s: float
    recompute_s: float
    peak_device_bytes: float
    peak_host_bytes: float
    feasible: bool
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["plan"] = asdict(self.plan)
        return d


def predict(profile: Profile, config, dtype: str, policy: Policy, wl: Workload, plan: Plan,
            device_budget: float | None = None, host_budget: float | None = None) -> Prediction:
    steps = [step_cost(profile, config, dtype, policy, wl, plan, j) for j in range(max(0, wl.new_tokens - 1))]
    peak_d = max((s.device_bytes for s in steps), default=0.0)
    peak_h = max((s.host_bytes for s in steps), default=0.0)
    feasible = (device_budget is None or peak_d <= device_budget) and (host_budget is None or peak_h <= host_budget)
    return Prediction(plan, sum(s.total_s for s in steps), sum(s.compute_s for s in steps), sum(s.transfer_s for s in steps),
                      sum(s.recompute_s for s in steps), peak_d, peak_h, feasible)


def search(profile: Profile, config, dtype: str, policy: Policy, wl: Workload,
           device_budget: float | None = None, host_budget: float | None = None) -> Prediction:
    """Greedy plan search (module docstring); returns the chosen plan's prediction, with a note."""
    args = (profile, config, dtype, policy, wl)
    n_steps = max(0, wl.new_tokens - 1)
    phase1 = predict(*args, Plan(), device_budget, host_budget)
    if phase1.feasible:
        phase1.note = "Phase I fits the device budget: no offload"
        return phase1
    # p1: the first step whose Phase-I device KV exceeds the budget.
    p1 = next(j for j in range(n_steps) if step_cost(*args, Plan(), j).device_bytes > device_budget)
    best = None
    for alpha in ALPHAS[1:]:
        pred = predict(*args, Plan(alpha=alpha, p1=p1), device_budget, host_budget)
        if pred.feasible:
            best = pred
            break
    if best is None:
        best = predict(*args, Plan(alpha=1.0, p1=p1), device_budget, host_budget)
        best.note = "infeasible: even alpha=1 exceeds a budget (the local window must stay on the device)"
        return best
    best.note = f"Phase II from step {p1} with the smallest alpha that fits"
    x_b, kv_b = input_bytes_per_token(config, dtype), kv_bytes_per_token(config, dtype)
    if x_b >= kv_b:
        best.note += f"; recomputation not considered: the stored input ({x_b} B/token/layer) is not smaller than its KV ({kv_b} B)"
        return best
    for p2 in sorted({p1, *range(p1, n_steps, max(1, (n_steps - p1) // 4))}):
        for beta in BETAS[1:]:
            pred = predict(*args, Plan(alpha=best.plan.alpha, beta=beta, p1=p1, p2=p2), device_budget, host_budget)
            if pred.feasible and pred.total_s < best.total_s - 1e-12:
                pred.note = f"Phase II from step {p1}; Phase III from step {p2}: recomputing beats moving KV"
                best = pred
    if best.plan.p2 is None:
        best.note += "; Phase III would not lower the predicted time"
    return best
