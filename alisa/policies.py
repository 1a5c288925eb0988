"""KV selection policies: dense, local, strided, sinks (StreamingLLM), h2o, swa (ALISA).

The normative semantics are ``docs/semantics.md`` §2. Each policy is one small class; the
same object drives the accuracy path (one forward, every query masked causally) and
the decode path (a cache that really drops what the policy can no longer pick), so the
two compute the same function.

Everything works in *slot space*: a layer holds ``C`` slots whose real positions are
``pos`` (int64, ``-1`` = empty or padding). Slots are kept in increasing position
order (appends add larger positions; compaction keeps the order), which the top-k
tie-break relies on. A query at position ``t`` (``-1`` = a padding query) may attend
slots with ``0 <= pos <= t``; ``n = t + 1``.

References: ALISA (Zhao et al., ISCA 2024, arXiv 2403.17312); H2O (Zhang et al.,
NeurIPS 2023); StreamingLLM (Xiao et al., ICLR 2024).
"""

from __future__ import annotations

import abc
import inspect
import math
import re
import types
import typing
from fractions import Fraction
from typing import Any, ClassVar

import torch

# --- registry: built-ins, @register, and plug-ins found through entry points -----------------
ENTRY_POINT_GROUP = "alisa.policies"  # a package's [project.entry-points."alisa.policies"] NAME = "module:Class"
PREFILL_MODES = ("sparse", "dense")  # how a prompt is attended: under the policy, or densely (then the policy takes over)
NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")  # a policy name appears in file names, Hydra lists and model_args

REGISTRY: dict[str, type["Policy"]] = {}  # built-ins and classes registered in this process with @register
_PLUGINS: dict[str, type["Policy"]] = {}  # plug-ins imported from their entry points (on first use)
_ENTRY_POINTS: dict[str, list] | None = None  # name -> entry points of the group; None: not scanned yet


def register(cls: type["Policy"]) -> type["Policy"]:
    """Class decorator: make a policy available by its ``name`` in this process.

    Other processes (``lm_eval``, Hydra jobs) find a policy through its package's entry point
    instead (README, "Bring your own policy"). ValueError if the class breaks the contract
    (:func:`contract_problem`) or the name is taken by another class.
    """
    problem = contract_problem(cls)
    if problem:
        raise ValueError(f"cannot register {_qualname(cls)} as a policy: {problem}")
    old = REGISTRY.get(cls.name)
    if old is not None and _qualname(old) != _qualname(cls):  # the same class again (a reloaded module) is fine
        raise ValueError(f"cannot register {_qualname(cls)} as policy {cls.name!r}: the name is taken by {_qualname(old)}")
    REGISTRY[cls.name] = cls
    return cls


def _qualname(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}:{getattr(obj, '__qualname__', type(obj).__name__)}"


def contract_problem(obj, name: str | None = None) -> str | None:
    """What keeps ``obj`` from being a policy class (one phrase), or None.

    Checked without building it: a :class:`Policy` subclass whose ``name`` is valid (and equals
    ``name``, an entry point's, when given), with ``select`` implemented, ``new_state`` when it
    is ``stateful``, ``observe`` only when it is, and a constructor that takes ``sparsity=`` and
    ``budget=`` and gives every hyperparameter a default.
    """
    if not (isinstance(obj, type) and issubclass(obj, Policy)):
        what = f"the class {_qualname(obj)}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        return f"it is {what}, not a subclass of alisa.policies.Policy"
    if not isinstance(obj.name, str) or not NAME_RE.match(obj.name):
        return f"its name {obj.name!r} is invalid: allowed is a letter, then letters, digits or '_'"
    if name is not None and obj.name != name:
        return f"its class attribute name is {obj.name!r}, but the entry point is named {name!r}: allowed is the same name"
    if inspect.isabstract(obj):
        return f"it does not implement {', '.join(sorted(obj.__abstractmethods__))}"
    if obj.stateful and obj.new_state is Policy.new_state:
        return "it is stateful but does not implement new_state() (the PolicyState its select and observe read)"
    if not obj.stateful and obj.observe is not Policy.observe:
        return "it implements observe() but is not stateful (observe is called only when stateful = True)"
    try:
        params = list(inspect.signature(obj.__init__).parameters.values())[1:]
    except (TypeError, ValueError):
        return None
    names = {p.name for p in params}
    takes_more = any(p.kind is p.VAR_KEYWORD for p in params)
    for needed in ("sparsity", "budget"):
        if needed not in names and not takes_more:
            return f"its constructor does not take {needed}=: allowed is __init__(self, sparsity=None, budget=None, <hyperparameter>=<default>, ...)"
    for p in params:
        if p.kind is p.POSITIONAL_ONLY:
            return f"its constructor parameter {p.name!r} is positional-only: allowed are keyword parameters"
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) or p.name in ("sparsity", "budget"):
            continue
        if p.default is p.empty:
            return f"its hyperparameter {p.name!r} has no default: allowed are hyperparameters with defaults"
        if p.name in RESERVED:
            return f"its hyperparameter {p.name!r} has a reserved name: allowed are names other than {', '.join(RESERVED)}"
    return None


# Keys beside a policy's hyperparameters in lm-eval's model_args (alisa.lm_eval_model): not hyperparameter names.
RESERVED = ("policy", "pretrained", "prefill", "dtype", "device", "tokenizer", "batch_size")


class PolicyState:
    """Per-layer state of a stateful policy.

    ``slot`` tensors carry the slot axis last and follow the slots: every store appends,
    compacts and reorders them through :meth:`append`, :meth:`gather` and :meth:`reorder`
    (one implementation for the core cache and the runtime). ``other`` tensors have batch
    first only. Appends are amortised: a slot tensor is a view of a buffer with spare
    columns, so a step writes one zero column in place instead of copying the state.
    """

    GROWTH = 1.5

    def __init__(self, slot: dict[str, torch.Tensor] | None = None, other: dict[str, torch.Tensor] | None = None):
        self.slot = slot or {}
        self.other = other or {}
        # a fixed-shape decode (the runtime's static step): sized for every query to come, past every
        # prompt; a policy then keeps no host counter or flag that changes per step (a compiled step
        # would be traced again for each value)
        self.fixed = False
        self._spare: dict[str, torch.Tensor] = {}  # the buffers behind ``slot``
        self.n_max: int | None = None  # a host bound on q_pos + 1 of the queries to come (Policy.prepare)

    def _room(self, name: str, m: int, grow: int | None = None) -> torch.Tensor:
        """The buffer behind slot tensor ``name`` with room for ``m`` more slots (re-allocated to
        ``grow`` columns, default 1.5x, when it has not: new, too small, or replaced by a compaction
        or the policy)."""
        cur, buf = self.slot[name], self._spare.get(name)
        u = cur.shape[-1]
        if (buf is None or buf.data_ptr() != cur.data_ptr() or buf.shape[:-1] != cur.shape[:-1]
                or buf.shape[-1] < u + m or buf.dtype != cur.dtype):
            buf = cur.new_zeros(*cur.shape[:-1], grow or int((u + m) * self.GROWTH) + 16)  # spare columns stay zero
            buf[..., :u] = cur
            self._spare[name] = buf
            self.slot[name] = buf[..., :u]
        return buf

    def reserve(self, m: int) -> None:
        """Make room for ``m`` more slots now (e.g. the tokens still to decode), so that no append
        of those re-allocates the state."""
        for name, cur in self.slot.items():
            self._room(name, m, cur.shape[-1] + m)

    def append(self, m: int) -> None:
        """Add ``m`` slots (zero state) at the end: a longer view of the buffer, whose spare
        columns are zero (allocated so; nothing but this view ever reaches them)."""
        for name, cur in self.slot.items():
            self.slot[name] = self._room(name, m)[..., :cur.shape[-1] + m]

    def gather(self, idx: torch.Tensor) -> None:
        """Keep the slots ``idx`` (B, m), in that order (compaction)."""
        B, m = idx.shape
        for name, s in self.slot.items():
            self.slot[name] = s.gather(-1, idx.view(B, *([1] * (s.dim() - 2)), m).expand(*s.shape[:-1], m))

    def reorder(self, index: torch.Tensor) -> None:
        """Reorder or repeat the batch (beam search, ``num_return_sequences``)."""
        self.slot = {k: v[index] for k, v in self.slot.items()}
        self.other = {k: v[index] for k, v in self.other.items()}

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in [*self.slot.values(), *self.other.values()])


class Policy(abc.ABC):
    """Base class: the budget arithmetic of docs/semantics.md §2 and the interface both paths use.

    Parameters
    ----------
    sparsity : float, optional
        KV sparsity in [0, 1); the kept ratio is ``r = 1 - sparsity``.
    budget : int, optional
        Fixed number of tokens (>= 1) instead of a ratio.
    """

    name: ClassVar[str] = ""
    stateful: ClassVar[bool] = False
    kernel: ClassVar[int | None] = None  # the compiled route's kind (alisa._fast), None: reference route only
    kernel_params: tuple[int, ...] = ()  # integer hyperparameters the compiled route reads (alisa._fast.attend's hyper)
    attends_all_at_prefill: ClassVar[bool] = False  # the prompt attends fully whatever ``prefill`` says
    takes_budget: ClassVar[bool] = True  # False: no sparsity or budget (one grid point, where baselines run)
    # The keys of the query at t can be selected before that query and its key exist (from the
    # slots before t and the state): the runtime then fetches a layer's host keys ahead. A wrong
    # guess costs bytes, never exactness (the step checks and fetches what is missing).
    selects_ahead: ClassVar[bool] = True

    def __init__(self, sparsity: float | None = None, budget: int | None = None):
        if (sparsity is None) == (budget is None) and self.name != "dense":
            raise ValueError(f"policy {self.name!r} needs exactly one of sparsity= or budget= (got sparsity={sparsity!r}, budget={budget!r})")
        if sparsity is not None:
            if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) or not 0 <= sparsity < 1:
                raise ValueError(f"sparsity={sparsity!r} is invalid: allowed is a number in [0, 1)")
        if budget is not None:
            if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
                raise ValueError(f"budget={budget!r} is invalid: allowed is an integer >= 1 (tokens)")
        self.sparsity = None if sparsity is None else float(sparsity)
        self.budget = budget
        # r = p/q exactly, from the decimal the user wrote (0.8 -> 1/5, not 0.19999...).
        r = Fraction(1) - Fraction(str(self.sparsity or 0.0))
        self._p, self._q = r.numerator, r.denominator

    def __repr__(self) -> str:
        arg = f"budget={self.budget}" if self.budget is not None else f"sparsity={self.sparsity}"
        return f"{type(self).__name__}({arg})"

    @property
    def params(self) -> dict:
        """Hyperparameters beyond the budget (constructor keywords), e.g. ``{"n_sinks": 4}``."""
        return {}

    @property
    def key(self) -> dict:
        """Plain description, for results files (hyperparameters only where not the default)."""
        sig = inspect.signature(type(self).__init__).parameters
        extra = {k: v for k, v in self.params.items() if sig[k].default != v}
        return {"policy": self.name, "sparsity": self.sparsity, "budget": self.budget, **extra}

    # --- counts (round is round-half-up), on ints or int64 tensors ----------------
    def full_count(self, n):
        """K = max(1, round(r·n)), or min(n, B) with a budget."""
        if isinstance(n, int):
            return min(n, self.budget) if self.budget is not None else max(1, (2 * self._p * n + self._q) // (2 * self._q))
        if self.budget is not None:
            return torch.clamp(n, max=self.budget)
        return torch.clamp((2 * self._p * n + self._q) // (2 * self._q), min=1)

    def half_count(self, n):
        """k = max(1, round(r·n/2)), or max(1, round(B/2)) with a budget."""
        if self.budget is not None:
            k = max(1, (self.budget + 1) // 2)
            return k if isinstance(n, int) else torch.full_like(n, k)
        if isinstance(n, int):
            return max(1, (self._p * n + self._q) // (2 * self._q))
        return torch.clamp((self._p * n + self._q) // (2 * self._q), min=1)

    # --- what the policy is (asked by the runtime, its cost model and the runners) --------
    def expected_held(self, n: int) -> float:
        """Tokens per sequence and layer the decode cache holds at length ``n`` (cost model)."""
        return float(min(n, self.full_count(n)))

    def expected_selected(self, n: int) -> float:
        """Keys the query at length ``n`` attends."""
        return float(min(n, self.full_count(n)))

    def max_selected(self, n: int) -> int:
        """A bound on the keys any query at a position < ``n`` selects (the runtime's fixed fetch
        slots in a static decode step); by default every key."""
        return n

    def max_selected_old(self, n: int) -> int:
        """A bound on the keys outside the recent window (:meth:`recent_count`) that any query at a
        position < ``n`` selects: what the runtime may fetch when the window stays on the device."""
        return self.max_selected(n)

    def recent_count(self, n):
        """Size of the recent (local) window at length ``n``: the runtime keeps it on the device."""
        return self.half_count(n)

    def shares_dense_prefill(self, prefill: str) -> bool:
        """Whether the prompt can come from one dense pass shared with other policies: the
        prompt attends fully and no state is seeded from its rows."""
        return not self.stateful and (prefill == "dense" or self.attends_all_at_prefill)

    # --- interface ------------------------------------------------------------------
    def new_state(self, batch: int, device: torch.device) -> PolicyState | None:
        return None

    def prepare(self, state: PolicyState | None, n_max: int) -> None:
        """Size fixed state for queries at positions < ``n_max`` (a bound known on the host,
        so the step itself needs no device-to-host read); the bound is kept on the state."""
        if state is not None:
            state.n_max = n_max

    @abc.abstractmethod
    def select(self, pos: torch.Tensor, t: torch.Tensor, state: PolicyState | None) -> torch.Tensor:
        """Keys attended by the query at ``t``.

        Stateless policies broadcast: ``pos`` (..., C) against ``t`` (..., 1), e.g.
        ``pos[:, None, :]`` with ``t[:, :, None]`` selects for a whole chunk at once.
        Stateful ones take ``pos`` (B, C) and ``t`` (B,).
        """

    @property
    def needs_rows(self) -> bool:
        """Whether :meth:`observe` uses the attention rows (callers may skip computing them otherwise)."""
        return self.stateful

    def observe(self, state: PolicyState | None, pos: torch.Tensor, t: torch.Tensor, keep: torch.Tensor, row: torch.Tensor) -> None:
        """Feed back the attention row the query used: ``row`` (B, C), summed over heads, zero for padding queries."""

    def retain(self, pos: torch.Tensor, t_next: torch.Tensor, state: PolicyState | None) -> torch.Tensor:
        """Slots any future query (positions >= ``t_next``, (B,)) may still select: the decode cache keeps only these."""
        return pos >= 0

    @property
    def evicts(self) -> bool:
        """Whether :meth:`retain` may ever drop a held slot; if not, the caches do not ask (the
        eviction of nothing costs a dozen ops per layer and step)."""
        return type(self).retain is not Policy.retain


def causal(pos: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (pos >= 0) & (pos <= t)


@register
class Dense(Policy):
    """Every key 0..t."""

    name = "dense"
    attends_all_at_prefill = True
    takes_budget = False

    def __init__(self, sparsity: float | None = None, budget: int | None = None):
        if budget is not None or (sparsity not in (None, 0, 0.0)):
            raise ValueError(f"policy 'dense' takes no budget and only sparsity=0 (got sparsity={sparsity!r}, budget={budget!r})")
        super().__init__(sparsity=0.0)

    def select(self, pos, t, state):
        return causal(pos, t)

    def expected_held(self, n):
        return float(n)


@register
class Local(Policy):
    """The K = max(1, round(r·n)) most recent keys, t included."""

    name = "local"

    def select(self, pos, t, state):
        return causal(pos, t) & (pos > t - self.full_count(t + 1))

    def max_selected(self, n):
        return int(self.expected_selected(n))  # exact: the K most recent

    def retain(self, pos, t_next, state):
        # The window's left edge never moves back (K grows by at most 1 per step).
        t = t_next[:, None]
        return (pos >= 0) & (pos > t - self.full_count(t + 1))


@register
class Strided(Policy):
    """k most recent keys plus every j with (t − j) mod s = 0, s = max(1, ceil((n − k)/k)).

    The strided set moves with t, so an old key leaves and comes back: the decode
    cache must keep every key (compute is sparse, memory is not).
    """

    name = "strided"

    def select(self, pos, t, state):
        n = t + 1
        k = self.half_count(n)
        s = torch.clamp((n + k - 1) // k - 1, min=1)  # ceil((n-k)/k) = ceil(n/k) - 1
        return causal(pos, t) & ((pos > t - k) | ((t - pos) % s == 0))

    def expected_held(self, n):
        return float(n)  # its set moves with t: nothing can be evicted


@register
class Sinks(Policy):
    """StreamingLLM: the first ``n_sinks`` (4) keys plus the K − n_sinks most recent (K as for
    local, at least n_sinks + 1)."""

    name = "sinks"

    def __init__(self, sparsity=None, budget=None, n_sinks: int = 4):
        super().__init__(sparsity=sparsity, budget=budget)
        if isinstance(n_sinks, bool) or not isinstance(n_sinks, int) or n_sinks < 0:
            raise ValueError(f"n_sinks={n_sinks!r} is invalid: allowed is an integer >= 0")
        self.n_sinks = n_sinks

    @property
    def params(self):
        return {"n_sinks": self.n_sinks}

    def expected_held(self, n):
        return float(min(n, max(self.full_count(n), self.n_sinks + 1)))

    expected_selected = expected_held

    def max_selected(self, n):
        return int(self.expected_selected(n))  # exact: the sinks plus the recent ones

    def _recent(self, t):
        return torch.clamp(self.full_count(t + 1), min=self.n_sinks + 1) - self.n_sinks

    def select(self, pos, t, state):
        return causal(pos, t) & ((pos < self.n_sinks) | (pos > t - self._recent(t)))

    def retain(self, pos, t_next, state):
        t = t_next[:, None]
        return (pos >= 0) & ((pos < self.n_sinks) | (pos > t - self._recent(t)))


def topk_mask(score: torch.Tensor, cand: torch.Tensor, k, k_max: int | None = None) -> torch.Tensor:
    """Per row, the ``k`` (B,) (or an int) candidates with the highest score; ties to the more recent slot.

    score (B, C) float, cand (B, C) bool, slots in position order. O(C), no sort: the k-th
    largest candidate score is the threshold (``torch.topk`` of ``k_max``, a bound on every k
    known on the host, e.g. from :meth:`Policy.prepare`; without it k is read back); every
    candidate above it is kept, and of those equal to it the most recent ones that fill k.
    """
    kk = torch.as_tensor(k, device=score.device).expand(score.shape[:-1])
    if k_max is None:
        k_max = int(kk.max()) if kk.numel() else 0
    K = min(score.shape[-1], k_max)
    if K <= 0:
        return torch.zeros_like(cand)
    x = torch.where(cand, score, float("-inf"))
    thr = torch.topk(x, K, dim=-1).values.gather(-1, (kk.clamp(1, K) - 1)[..., None])  # the k-th largest
    above = cand & (x > thr)
    tie = cand & (x == thr)
    need = kk[..., None] - above.sum(-1, keepdim=True)  # ties to take, the most recent first
    return above | (tie & (tie.flip(-1).cumsum(-1).flip(-1) <= need))


class TwoPart(Policy):
    """Shared by h2o and swa: L = the k most recent keys, plus k more chosen by a score.

    A subclass says only what differs: its :meth:`score`, which keys are :meth:`eligible`,
    how :meth:`observe` feeds a row into its state, and which keys it still needs.
    When 2k >= n the row is dense (docs/semantics.md §2). That can happen again after a sparse row
    only while n <= ``dense_horizon``; until then the decode cache keeps every key.
    """

    stateful = True

    def __init__(self, sparsity=None, budget=None):
        super().__init__(sparsity=sparsity, budget=budget)
        if self.budget is not None:
            self.dense_horizon = 2 * max(1, (self.budget + 1) // 2)
        elif self._p == self._q:
            self.dense_horizon = math.inf  # sparsity 0: every row is dense
        else:
            # 2k <= r·n + 1, so a dense row needs n <= 1 / (1 - r).
            ms = torch.arange(1, self._q // (self._q - self._p) + 1)
            dense = 2 * self.half_count(ms) >= ms
            self.dense_horizon = int(ms[dense].max()) if bool(dense.any()) else 0

    @property
    def needs_rows(self) -> bool:
        return self.dense_horizon != math.inf  # sparsity 0: every row is dense, the score is never read

    @property
    def evicts(self) -> bool:
        return self.needs_rows  # sparsity 0 keeps every key (retain)

    def expected_held(self, n):
        return float(n) if n <= self.dense_horizon else super().expected_held(n)

    def max_selected(self, n):
        return min(n, max(2 * self.half_count(n), self.dense_horizon))  # k recent + k scored, or a dense row

    def max_selected_old(self, n):
        return min(n, max(self.half_count(n), self.dense_horizon))  # the k scored (recent_count is the k recent)

    @abc.abstractmethod
    def score(self, state: PolicyState) -> torch.Tensor:
        """(B, C) score of each slot; the top-k eligible non-recent slots are selected."""

    @abc.abstractmethod
    def eligible(self, state: PolicyState) -> torch.Tensor:
        """(B, C) bool: slots the score may pick."""

    def _rows(self, pos, t):
        """Causal keys, the recent set L, k, and whether the row is dense. t: (B,).

        With one sequence on the CPU, k and the dense test are Python numbers: far fewer
        tensor ops per query (on a GPU that would read t back every step).
        """
        if t.numel() == 1 and t.device.type == "cpu":
            ti = int(t)
            k = self.half_count(ti + 1)
            c = (pos >= 0) & (pos <= ti)
            return c, c & (pos > ti - k), k, 2 * k >= ti + 1
        tt = t[:, None]
        n = tt + 1
        k = self.half_count(n)
        c = causal(pos, tt)
        return c, c & (pos > tt - k), k[:, 0], (2 * k >= n)

    def select(self, pos, t, state):
        c, recent, k, dense = self._rows(pos, t)
        if dense is True:
            return c
        k_max = None if state.n_max is None else self.half_count(max(state.n_max, 1))
        top = topk_mask(self.score(state), c & ~recent & self.eligible(state), k, k_max)
        return recent | top if dense is False else torch.where(dense, c, recent | top)

    def retain(self, pos, t_next, state):
        if not self.needs_rows:  # sparsity 0: every row is dense, every key stays
            return pos >= 0
        keep = (pos >= 0) & self._still_needed(pos, t_next, state)
        return keep | ((pos >= 0) & (t_next[:, None] + 1 <= self.dense_horizon))


@register
class H2O(TwoPart):
    """Heavy-hitter oracle, causal: L plus the top-k by attention accumulated over all past
    queries, among keys never evicted; a key attended by neither is evicted for good."""

    name = "h2o"
    kernel = 0  # alisa._fast.H2O

    def new_state(self, batch, device):
        return PolicyState(slot={
            "acc": torch.zeros(batch, 0, dtype=torch.float64, device=device),
            "evicted": torch.zeros(batch, 0, dtype=torch.bool, device=device),
        })

    def score(self, state):
        return state.slot["acc"]

    def eligible(self, state):
        return ~state.slot["evicted"]

    def kernel_state(self, state, pos):
        """(score, eligibility source, ring, ring index) for the compiled route (None: unused);
        ``pos`` (B, C): the slots of the step."""
        return state.slot["acc"], state.slot["evicted"], None, None

    def observe(self, state, pos, t, keep, row):
        if not self.needs_rows:
            return
        state.slot["acc"] += row
        state.slot["evicted"] |= causal(pos, t[:, None]) & ~keep

    def _still_needed(self, pos, t_next, state):
        return ~state.slot["evicted"]


@register
class SWA(TwoPart):
    """ALISA Sparse Window Attention: L plus the top-k by S_j = Σ_{q=t−k}^{t−1} A_q[j]
    among keys outside L with S_j > 0.

    State: the rows of the score window in a ring indexed by ``q mod R``, their running
    sum ``S`` (float64) and the count of non-zero entries ``nz`` per key (exact, so the
    ``S_j > 0`` test never suffers from cancellation).
    """

    name = "swa"
    kernel = 1  # alisa._fast.SWA

    def expected_held(self, n):
        # the local window plus the support of the score window's rows: about 1.4x the
        # budget on real text (measured: 287 of 1024 at r = 0.2, NOTES.md)
        return float(n) if n <= self.dense_horizon else float(min(n, 1.4 * self.full_count(n)))

    def new_state(self, batch, device):
        return PolicyState(
            slot={
                "S": torch.zeros(batch, 0, dtype=torch.float64, device=device),
                "nz": torch.zeros(batch, 0, dtype=torch.int32, device=device),
                "ring": torch.zeros(batch, 1, 0, dtype=torch.float32, device=device),
            },
            other={"ring_q": torch.full((batch, 1), -1, dtype=torch.long, device=device)},
        )

    def score(self, state):
        return state.slot["S"]

    def eligible(self, state):
        return state.slot["nz"] > 0

    def kernel_state(self, state, pos):
        return state.slot["S"], state.slot["nz"], state.slot["ring"], state.other["ring_q"]

    def prepare(self, state, n_max):
        super().prepare(state, n_max)
        if self.needs_rows and state is not None:
            self._grow_ring(state, self.half_count(max(n_max, 1)) + 1)

    def _grow_ring(self, state, need: int):
        ring, ring_q = state.slot["ring"], state.other["ring_q"]
        R = ring.shape[1]
        if need <= R:
            return
        R2 = max(need, R + max(16, R // 8))  # k grows by one every ~2/r tokens: a small margin, not 2x memory
        B, _, C = ring.shape
        # Re-home row q from q mod R to q mod R2; empty rows go to a spare row R2, dropped after.
        dest = torch.where(ring_q >= 0, ring_q % R2, R2)
        new = ring.new_zeros(B, R2 + 1, C).scatter_(1, dest[:, :, None].expand(B, R, C), ring)
        new_q = ring_q.new_full((B, R2 + 1), -1).scatter_(1, dest, ring_q)
        state.slot["ring"], state.other["ring_q"] = new[:, :R2], new_q[:, :R2]

    def observe(self, state, pos, t, keep, row):
        if not self.needs_rows:
            return
        row = row.to(state.slot["ring"].dtype)  # S adds exactly what the ring will later subtract
        if t.numel() == 1 and t.device.type == "cpu":
            return self._observe_one(state, int(t), row)
        real = t >= 0
        # The window of query t is [t - k_t, t - 1]; the next query's is [t + 1 - k_{t+1}, t].
        left_now = t - self.half_count(t + 1)
        left_next = t + 1 - self.half_count(t + 2)
        if state.n_max is None and t.device.type == "cpu":  # else prepare sized the ring: no read-back
            self._grow_ring(state, int(self.half_count(t.max() + 1)) + 1)
        ring, ring_q, S, nz = state.slot["ring"], state.other["ring_q"], state.slot["S"], state.slot["nz"]
        B, R, C = ring.shape
        ar = torch.arange(B, device=ring.device)
        # Row t enters the window.
        S += row
        nz += (row > 0).to(nz.dtype)
        slot_t = torch.where(real, t % R, 0)
        ring[ar, slot_t] = torch.where(real[:, None], row, ring[ar, slot_t])
        ring_q[ar, slot_t] = torch.where(real, t, ring_q[ar, slot_t])
        # Row left_now leaves it when the left edge moves (it moves by at most one).
        slot_l = left_now.clamp(min=0) % R
        leaving = real & (left_next > left_now) & (ring_q[ar, slot_l] == left_now)
        old = ring[ar, slot_l] * leaving[:, None]
        S -= old
        nz -= (old > 0).to(nz.dtype)
        ring_q[ar, slot_l] = torch.where(leaving, -1, ring_q[ar, slot_l])

    def _observe_one(self, state, t: int, row):
        """observe() for a single sequence, with Python arithmetic (same function)."""
        if t < 0:
            return
        left_now, left_next = t - self.half_count(t + 1), t + 1 - self.half_count(t + 2)
        self._grow_ring(state, self.half_count(t + 1) + 1)
        ring, ring_q, S, nz = state.slot["ring"], state.other["ring_q"], state.slot["S"], state.slot["nz"]
        R = ring.shape[1]
        S += row
        nz += (row > 0).to(nz.dtype)
        ring[:, t % R] = row
        ring_q[:, t % R] = t
        if left_next > left_now >= 0:
            sl = left_now % R
            leaving = ring_q[:, sl] == left_now
            old = ring[:, sl] * leaving[:, None]
            S -= old
            nz -= (old > 0).to(nz.dtype)
            ring_q[:, sl] = torch.where(leaving, -1, ring_q[:, sl])

    def _still_needed(self, pos, t_next, state):
        # docs/semantics.md §2, exact eviction: a key outside L whose window score is 0 is never chosen again.
        tt = t_next[:, None]
        return (pos > tt - self.half_count(tt + 1)) | (state.slot["nz"] > 0)


def _entry_points() -> dict[str, list]:
    """Entry points of the group ``alisa.policies`` by name, scanned once (not imported)."""
    global _ENTRY_POINTS
    if _ENTRY_POINTS is None:
        from importlib.metadata import entry_points

        found: dict[str, list] = {}
        try:
            eps = entry_points(group=ENTRY_POINT_GROUP)
        except Exception as e:  # noqa: BLE001 - unreadable metadata elsewhere on sys.path must not break the built-ins
            import warnings

            warnings.warn(f"alisa: could not scan the {ENTRY_POINT_GROUP} entry points: {type(e).__name__}: {e}", stacklevel=3)
            eps = []
        for ep in eps:
            if all(ep.value != other.value for other in found.get(ep.name, [])):  # one package found twice is one
                found.setdefault(ep.name, []).append(ep)
        _ENTRY_POINTS = found
    return _ENTRY_POINTS


def _origin(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"{ep.value}" + (f" from {dist.name} {dist.version}" if dist is not None else "")


def _load(name: str, eps: list) -> type["Policy"]:
    """Import the plug-in ``name``; one-line ValueError naming the entry point and why it cannot be used."""
    where = f"policy plug-in {name!r} (entry point {ENTRY_POINT_GROUP}: {name} = {_origin(eps[0])})"
    if len(eps) > 1:
        raise ValueError(f"policy plug-in {name!r} is defined by {len(eps)} entry points "
                         f"({'; '.join(_origin(ep) for ep in eps)}): allowed is one (uninstall the others)")
    try:
        obj = eps[0].load()
    except Exception as e:  # noqa: BLE001 - whatever the plug-in's import raises, the user gets one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{where} cannot be imported: {type(e).__name__}{': ' + first if first else ''}") from None
    problem = contract_problem(obj, name)
    if problem:
        raise ValueError(f"{where} is broken: {problem}")
    return obj


def policy_class(name: str) -> type["Policy"]:
    """The class of a policy name: a built-in, one registered with :func:`register`, or an installed
    plug-in (entry point group ``alisa.policies``, imported the first time it is asked for).

    ValueError (one line) for an unknown name, listing the allowed ones, or for a broken plug-in,
    naming its entry point and the cause. A broken plug-in breaks nothing but itself.
    """
    if isinstance(name, str):
        cls = REGISTRY.get(name) or _PLUGINS.get(name)
        if cls is not None:
            return cls
        eps = _entry_points().get(name)
        if eps:
            cls = _PLUGINS[name] = _load(name, eps)
            return cls
    raise ValueError(f"unknown policy {name!r}: allowed are {', '.join(available())}")


def available() -> list[str]:
    """Every policy name: built-ins, registered classes and installed plug-ins (listed, not imported)."""
    return sorted({*REGISTRY, *_PLUGINS, *_entry_points()})


def refresh_plugins() -> None:
    """Forget the plug-ins found so far: the next lookup scans the entry points again (after a
    package was installed into, or put on the ``sys.path`` of, a running process)."""
    import importlib

    global _ENTRY_POINTS
    importlib.invalidate_caches()  # importlib.metadata caches what each sys.path entry holds
    _ENTRY_POINTS = None
    _PLUGINS.clear()


def hyperparameters(policy: "str | type[Policy]") -> dict[str, inspect.Parameter]:
    """A policy's hyperparameters: its constructor's keyword parameters besides ``sparsity`` and ``budget``."""
    cls = policy_class(policy) if isinstance(policy, str) else policy
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p for p in params
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("sparsity", "budget")}


class HyperparameterError(ValueError):
    """A hyperparameter that a policy does not have, or a value its type does not allow."""

    def __init__(self, policy: str, key: str, value: Any, allowed: str, unknown: bool = False):
        self.policy, self.key, self.value, self.allowed, self.unknown = policy, key, value, allowed, unknown
        super().__init__(f"policy {policy!r} has no hyperparameter {key!r}: allowed are {allowed}" if unknown
                         else f"policy {policy!r}: {key}={value!r} is invalid: allowed is {allowed}")


def check_params(name: str, params: dict) -> dict:
    """``params`` checked against policy ``name``'s constructor: each must be one of its hyperparameters,
    of the type its annotation says (or its default's type); returned with ints made floats where a
    float is wanted. :class:`HyperparameterError` (a one-line ValueError) otherwise. The constructor
    checks ranges itself."""
    cls = policy_class(name)
    hp = hyperparameters(cls)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: fall back to the defaults' types
        hints = {}
    out = {}
    for key, value in params.items():
        if key not in hp:
            raise HyperparameterError(name, key, value, ", ".join(hp) or "none", unknown=True)
        default = hp[key].default
        tp = hints.get(key, type(default) if isinstance(default, (bool, int, float, str)) else Any)
        ok, value, allowed = _typed(tp, value)
        if not ok:
            raise HyperparameterError(name, key, value, f"{allowed} (default {default!r})")
        out[key] = value
    return out


def _typed(tp, value) -> tuple[bool, Any, str]:
    """(value fits ``tp``, the value (int -> float for a float), what ``tp`` allows in words)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        if value is None and type(None) in args:
            return True, None, ""
        words = []
        for a in args:
            if a is type(None):
                continue
            ok, v, w = _typed(a, value)
            if ok:
                return True, v, ""
            words.append(w)
        return False, value, " or ".join(words + (["null"] if type(None) in args else []))
    if origin is typing.Literal:
        return value in args, value, "one of " + ", ".join(map(repr, args))
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value, "an integer"
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value, "a number"
    if tp is str:
        return isinstance(value, str), value, "a string"
    return True, value, "any value"  # another annotation: the constructor checks it


def make_policy(name: str, sparsity: float | None = None, budget: int | None = None, **params) -> "Policy":
    """Build a policy by name (built-in, registered or plug-in), e.g. ``make_policy("swa", sparsity=0.8)``;
    ``params`` are its hyperparameters (``make_policy("sinks", sparsity=0.8, n_sinks=2)``), checked by
    :func:`check_params`."""
    cls = policy_class(name)
    return cls(sparsity=sparsity, budget=budget, **check_params(name, params))


from . import policies_more  # noqa: E402,F401  (tova, snapkv, quest register themselves; imported last: it imports this module)
