"""Token-granular KV in two memory tiers, with offload, deletion + recomputation and INT8.

A :class:`TieredStore` is the runtime's KV of one layer. Its *logical* slots are what the
policy sees (real position ``pos``, the policy's per-slot state, kept in position order as
in :class:`~alisa.kvstore.SlotStore`); each slot's data lives in one place (``tier``):

* ``DEVICE``: K, V in the device :class:`Pool` (where attention runs: cuda, else cpu);
* ``HOST``: K, V in the host pool (CPU memory); fetched to the device when selected;
* ``GONE``: K, V deleted; only the token's attention input ``x`` is kept (host x pool)
  and K, V are recomputed on the device when the token is selected (docs/semantics.md §4).

``loc`` / ``xloc`` give the slot's column in its pool. Pools allocate columns for the
whole batch at once (amortised) and compact when full; every byte that crosses tiers is a
real copy (``index``-gathers, then a copy across the :class:`Link`) and is counted from the
tensors moved. On CUDA the host pools are pinned and copies run on their own streams, ordered
by events; a layer's selected host keys are fetched while the layer before it computes
(:meth:`TieredStore.prefetch`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..attention import attend_with_feedback
from ..policies import Policy, PolicyState
from .quant import dequantize, quantize_tensors

DEVICE, HOST, GONE = 0, 1, 2
# a static step's device-side counters (TieredStore._moved): tokens fetched, recomputed; rows whose
# selection did not fit the fetch slots (an error); tokens offloaded, deleted; rows whose moves were late
FETCHED, RECOMPUTED, LOST, OFFLOADED, DELETED, LATE = range(6)


@dataclass(frozen=True)
class Plan:
    """Three-phase schedule (docs/semantics.md §1, Algorithm 2), in decode steps.

    Phase I before ``p1``: all KV on the device. Phase II from ``p1``: the fraction
    ``alpha`` of the non-local KV lives on the host (the local window, the policy's k most
    recent tokens, stays on the device); selected host tokens are fetched each step.
    Phase III from ``p2``: the fraction ``beta`` of host-resident tokens has its KV deleted
    and recomputed from the stored attention input when selected. ``None``: never.
    """

    alpha: float = 0.0
    beta: float = 0.0
    p1: int | None = None
    p2: int | None = None
    local_on_device: bool = True  # False: alpha applies to all held KV (FlexGen-style static offload)

    def __post_init__(self):
        for name in ("alpha", "beta"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"plan {name}={v!r} is invalid: allowed is a fraction in [0, 1]")
        for name in ("p1", "p2"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"plan {name}={v!r} is invalid: allowed is a decode step >= 0 or None")
        if self.p2 is not None and (self.p1 is None or self.p2 < self.p1):
            raise ValueError(f"plan p2={self.p2} needs Phase II first: allowed is p1 <= p2 (p1={self.p1})")

    def phase(self, step: int) -> int:
        if self.p2 is not None and step >= self.p2 and self.beta > 0:
            return 3
        if self.p1 is not None and step >= self.p1 and self.alpha > 0:
            return 2
        return 1

    @property
    def records_inputs(self) -> bool:
        return self.p2 is not None and self.beta > 0

    @property
    def device_only(self) -> bool:
        """Every step is Phase I: nothing is ever offloaded or deleted."""
        return not ((self.p1 is not None and self.alpha > 0) or self.records_inputs)


@dataclass
class Traffic:
    """What crossed tiers (bytes of the tensors actually copied) and what was recomputed."""

    d2h_bytes: int = 0
    h2d_bytes: int = 0
    tokens_offloaded: int = 0
    tokens_fetched: int = 0
    tokens_deleted: int = 0
    tokens_recomputed: int = 0
    prefetch_hits: int = 0  # layer steps whose host keys were fetched ahead, exactly the ones selected
    prefetch_misses: int = 0  # layer steps whose fetch ahead was not what the step selected (fetched again)
    moves_late: int = 0  # static step: row layer-steps whose tier moves exceeded its move slots (done a step later)
    seconds: dict[str, float] = field(default_factory=lambda: {"transfer": 0.0, "recompute": 0.0})

    def add(self, other: "Traffic") -> None:
        for k in ("d2h_bytes", "h2d_bytes", "tokens_offloaded", "tokens_fetched", "tokens_deleted", "tokens_recomputed",
                  "prefetch_hits", "prefetch_misses", "moves_late"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k, v in other.seconds.items():
            self.seconds[k] = self.seconds.get(k, 0.0) + v


class Link:
    """How token data crosses between the host tier and the device, for every layer of a cache.

    On CUDA the host pools are pinned (``pinned``); a fetch is a CPU gather into pinned staging
    (:meth:`Pool.read_raw`) and one ``non_blocking`` copy on the ``h2d`` stream, which the
    compute stream waits for only where it uses the data (an event, :meth:`ready`); an offload
    is a device gather, then a copy into pinned memory on the ``d2h`` stream after the compute
    stream's work so far. The seconds a copy took are the link's busy time (CUDA events, read
    when the run settles), not the wall time around it. Elsewhere both tiers are in RAM: the
    gather is the copy, timed on the host.
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.h2d = torch.cuda.Stream(self.device) if self.cuda else None
        self.d2h = torch.cuda.Stream(self.device) if self.cuda else None
        self._timed: list[tuple] = []  # (start event, end event, traffic) of copies not yet settled

    @property
    def pinned(self) -> bool:
        return self.cuda

    def fetch(self, host: dict[str, torch.Tensor], traffic: "Traffic", t0: float) -> tuple[dict[str, torch.Tensor], object]:
        """Start copying host tensors (gathered since ``t0``) to the device; returns the device
        tensors and a token for :meth:`ready`."""
        if not self.cuda:
            out = {k: v.to(self.device) for k, v in host.items()}
            traffic.seconds["transfer"] += _now() - t0
            return out, None
        compute = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.h2d):
            start.record(self.h2d)
            out = {k: v.to(self.device, non_blocking=True) for k, v in host.items()}
            end.record(self.h2d)
        for v in out.values():
            v.record_stream(compute)  # allocated on h2d, used on the compute stream
        self._timed.append((start, end, traffic))
        traffic.seconds["gather"] = traffic.seconds.get("gather", 0.0) + (_now() - t0)
        return out, (end, host)  # the pinned staging stays referenced until the copy is used

    def ready(self, moved: dict[str, torch.Tensor], token) -> dict[str, torch.Tensor]:
        """The fetched tensors, once the compute stream may read them."""
        if token is not None:
            torch.cuda.current_stream(self.device).wait_event(token[0])
        return moved

    def offload(self, dev: dict[str, torch.Tensor], traffic: "Traffic") -> dict[str, torch.Tensor]:
        """Copies of device tensors in (pinned) host memory, complete when returned."""
        if not self.cuda:
            return {k: v.to("cpu") for k, v in dev.items()}
        compute = torch.cuda.current_stream(self.device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.d2h.wait_stream(compute)
        with torch.cuda.stream(self.d2h):
            start.record(self.d2h)
            out = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True) for k, v in dev.items()}
            end.record(self.d2h)
        for v in dev.values():
            v.record_stream(self.d2h)
        end.synchronize()  # the host pool is written on the CPU next
        traffic.seconds["transfer"] += start.elapsed_time(end) / 1e3
        return out

    def settle(self) -> None:
        """Add the busy time of the finished fetches to their traffic."""
        for start, end, traffic in self._timed:
            end.synchronize()
            traffic.seconds["transfer"] += start.elapsed_time(end) / 1e3
        self._timed.clear()


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


def _take(t: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """t (B, H, cap, D) gathered at per-row columns cols (B, m) -> (B, H, m, D) (a copy)."""
    B, H, _, D = t.shape
    return t.gather(2, cols[:, None, :, None].expand(B, H, cols.shape[1], D))


def _put(t: torch.Tensor, cols: torch.Tensor, v: torch.Tensor) -> None:
    """t (B, H, cap, D) at per-row columns cols (B, m) <- v (B, H, m, D), in place.

    An indexed assignment (``index_put_``), not ``scatter_``: compiled, inductor writes a graph
    input's ``index_put_`` in place, but turns a ``scatter_`` into a copy of the whole pool and a
    copy back (three times the pool's bytes per step; over the link for a mapped host pool)."""
    rows = torch.arange(t.shape[0], device=t.device)[:, None].expand_as(cols)
    t[rows, :, cols] = v.transpose(1, 2)  # advanced indices around a slice: (B, m, H, D)


def _mapped(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A tensor on CUDA ``device`` whose memory is ``t``'s (contiguous, pinned host memory: with
    unified virtual addressing it is mapped into the device's address space, so kernels read and
    write it over the link directly). Raises ValueError when it cannot be made."""
    if not (t.is_contiguous() and t.is_pinned()):
        raise ValueError("a host pool read by a static decode step must be contiguous pinned memory")

    class _Interface:  # the CUDA array interface, over the bytes (no numpy dtype for bfloat16 or bool needed)
        __cuda_array_interface__ = {"shape": (t.numel() * t.element_size(),), "typestr": "|u1",
                                    "data": (t.data_ptr(), False), "version": 3, "strides": None}

    try:
        with torch.cuda.device(device):
            out = torch.as_tensor(_Interface(), device=device)
    except Exception as e:  # noqa: BLE001 - one line for the caller's record
        raise ValueError(f"host memory is not addressable from {device}: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    out = out.view(t.dtype).view(t.shape)
    out._host = t  # keep the host allocation alive as long as the alias
    return out


def rows_of(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the True entries of each row, in order: (B, m) and their validity (B, m)."""
    count = mask.sum(1)
    m = int(count.max()) if mask.numel() else 0
    idx = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :m]
    return idx, torch.arange(m, device=mask.device) < count[:, None]


class Pool:
    """Columns of token data in one tier: named buffers (B, H, cap, D), per-row live flags.

    With ``int8`` a K/V pair is stored as uint8 plus a float scale and zero per
    (row, head, token) (see :mod:`alisa.runtime.quant`) and de-quantized when read.
    """

    GROWTH = 1.5

    def __init__(self, device: torch.device | str, int8: bool = False, reserve: int = 0, pinned: bool = False):
        self.device = torch.device(device)
        self.int8 = int8
        self.pinned = pinned  # page-locked host memory (a CUDA device copies it asynchronously)
        self.reserve = reserve  # columns to leave free at the first allocation (e.g. the tokens still to decode)
        self.buf: dict[str, torch.Tensor] = {}
        self.live: torch.Tensor | None = None
        self.used = 0
        self.fixed: int | None = None  # columns per row once fixed (a static decode step, :meth:`fix`)
        self._mapped: tuple | None = None  # (buffers, live) as a CUDA device addresses them (pinned, fixed)

    @property
    def capacity(self) -> int:
        return 0 if self.live is None else self.live.shape[1]

    def _encode(self, data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.int8:
            return data
        out = {}
        for name, x in data.items():
            out[name + ".q"], out[name + ".s"], out[name + ".z"] = quantize_tensors(x)
        return out

    def decode(self, raw: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        if not self.int8:
            return raw
        names = {k.rsplit(".", 1)[0] for k in raw}
        return {n: dequantize(raw[n + ".q"], raw[n + ".s"], raw[n + ".z"], dtype) for n in names}

    def write(self, data: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Store m tokens per row (data (B, H, m, D), valid (B, m)); returns their columns
        (B, m; -1 where invalid) and, if the pool compacted first, the old->new column map."""
        return self.write_raw(self._encode(data), valid)

    def write_raw(self, enc: dict[str, torch.Tensor], valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`write` for data already in this pool's encoding (e.g. moved from another pool)."""
        enc = {k: v.to(self.device) for k, v in enc.items()}
        B, m = valid.shape
        remap = None
        if not self.buf:
            self._allocate(enc, B, 0)
        if self.used + m > self.capacity:
            remap = self.compact(extra=m)
        u = self.used
        for k, v in enc.items():
            self.buf[k][:, :, u:u + m] = v
        self.live[:, u:u + m] = valid.to(self.device)
        self.used += m
        cols = torch.arange(u, u + m, device=valid.device).expand(B, m)
        return torch.where(valid, cols, -1), remap

    def fix(self, cap: int) -> torch.Tensor | None:
        """From now on hold at most ``cap`` columns per row and never move or resize (a static
        decode step reads these buffers): compact the live columns to the front of exactly ``cap``
        columns now (returns the old->new column map, :meth:`compact`), or allocate ``cap`` at the
        first write (returns None). Writes then go to free columns (:meth:`write_free`)."""
        self.fixed = cap
        if not self.buf:
            return None
        remap = self.compact(extra=cap - int(self.live[:, :self.used].sum(1).max()), exact=True)
        self.live = self.live.pin_memory() if self.pinned else self.live
        self.used = cap  # every column may be written from now on
        return remap

    def _on(self, device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(buffers, live) as a kernel on ``device`` addresses them: the pool's own, or for a fixed
        pinned pool used from a CUDA device, their mapped aliases (:func:`_mapped`: the device
        reads and writes host memory over the link, no copy and no host step, so a CUDA graph
        can replay it)."""
        if self.fixed is None or self.device.type == torch.device(device).type:
            return self.buf, self.live
        if self._mapped is None:
            self._mapped = ({k: _mapped(v, device) for k, v in self.buf.items()}, _mapped(self.live, device))
        return self._mapped

    def write_free(self, enc: dict[str, torch.Tensor], valid: torch.Tensor, spare: bool = False) -> torch.Tensor:
        """Store m tokens per row (in this pool's encoding, (B, H, m, D); valid (B, m)) in each
        row's first m free columns of a :meth:`fix`-ed pool: no host index, no compaction, the same
        ops whatever the data (a CUDA graph may replay it; done where the data is). The caller
        guarantees each row has room for its valid tokens (they come first in the row, as from
        :func:`rows_of`), and for one token a free column in every row; ``spare``: every row has m
        free columns, so invalid tokens land on free columns too (written as they are, no read of
        what is there). Returns the columns (B, m; -1 where invalid)."""
        B, m = valid.shape
        self.ensure(enc, B)
        bufs, live = self._on(next(iter(enc.values())).device)
        valid = valid.to(live.device)
        if m == 1:  # one token: the first free column (every row has one), written whatever its validity
            cols = (~live).to(torch.uint8).argmax(1, keepdim=True)
            for k, v in enc.items():
                _put(bufs[k], cols, v)
            live.scatter_(1, cols, valid)
            return torch.where(valid, cols, -1)
        cols = torch.sort(live.to(torch.int8), dim=1, stable=True).indices[:, :m]
        # without spare columns a row's invalid tokens (after its valid ones) may land on live columns: they write back what is there
        for k, v in enc.items():
            b = bufs[k]
            _put(b, cols, v if spare else torch.where(valid[:, None, :, None], v, _take(b, cols)))
        live.scatter_(1, cols, valid if spare else valid | live.gather(1, cols))
        return torch.where(valid, cols, -1)

    def read_on(self, cols: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`read_raw` by a gather on ``cols``' device (a fixed pinned pool: from its mapped
        aliases), as stored: a static decode step's fetch, (B, H, m, D) per buffer."""
        return {k: _take(v, cols) for k, v in self._on(cols.device)[0].items()}

    def ensure(self, like: dict[str, torch.Tensor], batch: int) -> None:
        """A :meth:`fix`-ed pool's buffers, like ``like``'s (in this pool's encoding), if it has none yet."""
        if not self.buf:
            self._allocate(like, batch, self.fixed)
            self.used = self.fixed

    def _allocate(self, enc: dict[str, torch.Tensor], batch: int, cap: int) -> None:
        """The first buffers, like ``enc``'s, with ``cap`` free columns."""
        self.buf = {k: self._zeros(v, cap) for k, v in enc.items()}
        self.live = torch.zeros(batch, cap, dtype=torch.bool, device=self.device, pin_memory=self.pinned)

    def _zeros(self, like: torch.Tensor, cap: int) -> torch.Tensor:
        """A zeroed buffer (B, H, cap, D) like ``like``; zero, not empty: attention multiplies
        unwritten columns by 0."""
        return torch.zeros(*like.shape[:2], cap, like.shape[3], dtype=like.dtype, device=self.device, pin_memory=self.pinned)

    def read_raw(self, cols: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gather per-row columns (B, m; every entry a valid column) into new tensors (pinned
        for a pinned pool), as stored."""
        c = cols.to(self.device)
        if not self.pinned:
            return {k: _take(v, c) for k, v in self.buf.items()}
        out = {}
        for k, v in self.buf.items():
            B, H, _, D = v.shape
            out[k] = torch.gather(v, 2, c[:, None, :, None].expand(B, H, c.shape[1], D),
                                  out=torch.empty(B, H, c.shape[1], D, dtype=v.dtype, pin_memory=True))
        return out

    def read(self, cols: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """:meth:`read_raw`, de-quantized to ``dtype``."""
        return self.decode(self.read_raw(cols), dtype)

    def full(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """Contiguous buffers whose column c is the pool's column c: the buffers themselves, or
        the used columns de-quantized (a temporary) when int8."""
        if not self.int8:
            return self.buf
        return self.decode({k: v[:, :, :self.used] for k, v in self.buf.items()}, dtype)

    def free(self, cols: torch.Tensor, valid: torch.Tensor) -> None:
        """Mark columns ``cols`` (B, m) free where ``valid``; masks only, no read-back (a fixed
        pool: on ``cols``' device, :meth:`_on`)."""
        if self.live is not None and cols.numel():
            live = self._on(cols.device)[1]
            cap = self.capacity
            c = torch.where(valid, cols, cap).to(live.device)
            gone = torch.zeros(live.shape[0], cap + 1, dtype=torch.bool, device=live.device).scatter_(1, c, True)
            live &= ~gone[:, :cap]  # in place

    def compact(self, extra: int = 0, exact: bool = False) -> torch.Tensor:
        """Move live columns to the front and resize (``exact``: to exactly ``extra`` more columns,
        no slack: the reference route attends every column); returns old->new column (B, used_old),
        -1 if dead."""
        u = self.used
        live = self.live[:, :u]
        idx, valid = rows_of(live)
        keep = idx.shape[1]
        cap, need = self.capacity, keep + extra
        if exact:
            cap = need
        elif cap == 0:
            cap = need + self.reserve
        elif need > cap or cap > 2 * need + 16:
            cap = int(need * self.GROWTH) + 16
        new = {}
        for k, v in self.buf.items():
            b = self._zeros(v, cap)
            b[:, :, :keep] = _take(v, idx)
            new[k] = b
        self.buf = new
        self.live = torch.zeros(live.shape[0], cap, dtype=torch.bool, device=self.device)
        self.live[:, :keep] = valid
        self.used = keep
        remap = torch.full((live.shape[0], u + 1), -1, dtype=torch.long, device=self.device)
        remap.scatter_(1, torch.where(valid, idx, u), torch.arange(keep, device=self.device).expand_as(idx).clone())
        return remap[:, :u]

    def sparse(self) -> bool:
        """Fewer than half the used columns of the fullest row are live: worth compacting."""
        return self.used > 64 and 2 * int(self.live[:, :self.used].sum(1).max()) < self.used

    def bytes_allocated(self) -> int:
        return _nbytes(self.buf.values())

    def bytes_per_column(self) -> int:
        """Bytes of one row's column (one token), every buffer."""
        return sum(v.shape[1] * v.shape[3] * v.element_size() for v in self.buf.values())

    def bytes_live(self) -> int:
        if not self.buf:
            return 0
        return int(self.live.sum()) * self.bytes_per_column()  # columns past ``used`` are never live


class TieredStore:
    """The runtime KV of one layer; see the module docstring."""

    def __init__(self, policy: Policy, device, host, int8: bool, dtype: torch.dtype, reserve: int = 0,
                 link: Link | None = None):
        self.policy = policy
        self.dtype = dtype
        self.link = link or Link(device)
        self.dev = Pool(device, int8, reserve)
        self.host = Pool(host, int8, pinned=self.link.pinned)
        self.xs = Pool(host, pinned=self.link.pinned)  # attention inputs of tokens that may be recomputed (never quantized)
        self.n_max: int | None = None  # a bound on the positions + 1 of every query to come (from adopt)
        self._ahead = None  # (t, selected host slots, fetch) started by prefetch for the query at t
        self._evictions = 0
        # per logical slot: position, tier, column in its pool, column in the input pool; they
        # follow the slots through the same helper as the policy's state (amortised appends)
        self.slots = PolicyState()
        self.state: PolicyState | None = None
        self.traffic = Traffic()
        self._gone = False  # whether any token was ever deleted (skips the recompute part otherwise)
        self._at: torch.Tensor | None = None  # static: the logical slot the next token takes (make_static)
        self.fetch_slots = 0  # static: host (or deleted) keys one step can fetch (recompute) per row
        self.move_slots = 0  # static: tokens one step's schedule can offload per row
        self._moved: torch.Tensor | None = None  # static: the device-side counters (FETCHED ... LATE)
        self.late: torch.Tensor | None = None

    pos = property(lambda self: self.slots.slot.get("pos"), lambda self, v: self.slots.slot.__setitem__("pos", v))
    tier = property(lambda self: self.slots.slot.get("tier"), lambda self, v: self.slots.slot.__setitem__("tier", v))
    loc = property(lambda self: self.slots.slot.get("loc"), lambda self, v: self.slots.slot.__setitem__("loc", v))
    xloc = property(lambda self: self.slots.slot.get("xloc"), lambda self, v: self.slots.slot.__setitem__("xloc", v))

    # --- logical slots ------------------------------------------------------------------
    @property
    def used(self) -> int:
        return 0 if self.pos is None else self.pos.shape[1]

    def adopt(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, state: PolicyState | None,
              x: torch.Tensor | None = None, x_pos: torch.Tensor | None = None, n_max: int | None = None) -> None:
        """Start from a prompt's slots: k, v (B, H, C, D) at positions ``pos`` (B, C; -1: not
        kept) with the policy's ``state``; they become device-resident logical slots (copied into
        the device pool). ``x`` (B, T, hidden) at positions ``x_pos`` (B, T) are the prompt's
        attention inputs, kept for slots that may be recomputed. ``n_max``: a bound on the
        positions + 1 of the queries to come (sizes the policy's state for all of them now)."""
        self.state, self.n_max = state, n_max
        if state is not None:  # the whole generation's state, sized now: no re-allocation in a decode step
            if n_max is not None:
                self.policy.prepare(state, n_max)
            state.reserve(self.dev.reserve)
        self.pos = pos.clone()
        live = pos >= 0
        self.tier = torch.zeros_like(pos, dtype=torch.int8)
        self.loc, _ = self.dev.write({"k": k, "v": v}, live)
        self.xloc = torch.full_like(pos, -1)
        if x is not None:
            # column of each position in the chunk: scatter, then read at the slots' positions
            colmap = torch.full((pos.shape[0], int(x_pos.max()) + 2), -1, dtype=torch.long, device=pos.device)
            colmap.scatter_(1, torch.where(x_pos >= 0, x_pos, colmap.shape[1] - 1),
                            torch.arange(x_pos.shape[1], device=pos.device).expand_as(x_pos).clone())
            cols = colmap.gather(1, pos.clamp(min=0))
            xv = x.gather(1, cols.clamp(min=0)[..., None].expand(*cols.shape, x.shape[-1]))
            self._write_x(xv, live)
        self.slots.reserve(self.dev.reserve)

    @property
    def static(self) -> bool:
        return self._at is not None

    def make_static(self, new_tokens: int, plan: Plan | None = None) -> None:
        """Fix every shape of the decode step for ``new_tokens`` more tokens (the step a CUDA graph
        can capture and replay): compact the slots once and give them room for all of them now
        (empty slots: position -1, zero policy state), and fix each pool's columns (:meth:`Pool.fix`):
        the device pool at what it holds plus ``new_tokens``, the host KV pool at what ``plan`` can
        put off the device (below), the host input pool at one column per slot.
        From then on :meth:`append` writes at device-side indices and free columns, :meth:`evict`
        never compacts, and host tokens are fetched into ``F`` fixed slots per row (F bounds what
        one query selects off the device: :meth:`Policy.max_selected`, or ``max_selected_old`` when
        the plan keeps the recent window on the device), masked where unused: every step issues the
        same ops on the same buffers as long as the plan's phase does not change. In a phase that
        was already in effect the step before, the tiers move in fixed widths too
        (:meth:`schedule_static`: at most ``move_slots`` tokens offloaded per row); the first move
        of a phase, which is large, is :meth:`schedule`'s, outside the fixed step. With INT8 the
        pools hold codes, scales and zeros alike (the whole device pool is de-quantized each step,
        as the eager step de-quantizes its used columns).

        What ``plan`` can put off the device bounds the host pool and ``F``: :meth:`schedule` keeps
        the host and deleted tokens of a row at floor(alpha * non-local tokens) <= floor(alpha * n_max);
        the host pool has ``move_slots`` spare columns on top (a fixed-width offload writes there)."""
        self._compact(self.pos >= 0)
        self.loc = _remap(self.loc, self.tier == DEVICE, self.dev.fix(self._most(DEVICE) + new_tokens))
        C = self.used
        if self.state is not None:
            self.state.fixed = True  # sized at adoption for every query to come (Policy.prepare with n_max)
        for slots in (self.slots, self.state):
            if slots is not None:
                slots.append(new_tokens)
        for name in ("pos", "loc", "xloc"):
            self.slots.slot[name][:, C:] = -1
        total = C + new_tokens
        off = total if plan is None or self.n_max is None else min(total, math.floor(plan.alpha * self.n_max))
        self.move_slots = min(self.MOVE_SLOTS, off) if plan is not None and not plan.device_only else 0
        self.loc = _remap(self.loc, self.tier == HOST, self.host.fix(max(off, self._most(HOST)) + self.move_slots))
        self.xloc = _remap(self.xloc, self.xloc >= 0, self.xs.fix(total))
        if self.xs.buf:  # the prompt's inputs are held: on CUDA the step writes and reads their mapped alias, made
            self.xs._on(self.pos.device)  # here (a compiled step cannot trace making it; a capture should not run it)
        self._at = torch.full((1,), C, dtype=torch.long, device=self.pos.device)
        if self.n_max is not None:  # with the recent window on the device only older selected keys are off it
            sel = self.policy.max_selected_old if plan is not None and plan.local_on_device else self.policy.max_selected
            off = min(off, sel(self.n_max))
        self.fetch_slots = off
        self._moved = torch.zeros(LATE + 1, dtype=torch.long, device=self.pos.device)
        self.late = torch.zeros((), dtype=torch.long, device=self.pos.device)  # rows the last schedule_static left to schedule
        if plan is not None and plan.phase(0) > 1:  # the prompt's schedule (decode step 0) began a phase
            self._enter(plan.phase(0))

    def _most(self, tier: int) -> int:
        """The most live tokens any row holds in ``tier`` (a read-back)."""
        return int(((self.pos >= 0) & (self.tier == tier)).sum(1).max())

    def static_key(self) -> tuple[bool, bool]:
        """What the static step does besides attending the device pool: (fetch host keys,
        recompute deleted ones). A captured step is replayed only while this stays the same."""
        return self.host.used > 0, self._gone

    def _write_x(self, xv: torch.Tensor, valid: torch.Tensor) -> None:
        """xv (B, m, hidden) for new logical slots (the last m) -> host x pool (a real copy)."""
        data = {"x": xv[:, None]}
        cols, remap = self.xs.write(data, valid)
        self.traffic.d2h_bytes += _nbytes(data.values())
        self.xloc = _remap(self.xloc, self.xloc >= 0, remap)
        self.xloc[:, -valid.shape[1]:] = cols

    def append(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, x: torch.Tensor | None) -> None:
        """One decode token per row: k, v (B, H, 1, D), pos (B, 1), x (B, 1, hidden) or None."""
        valid = pos >= 0
        if getattr(self.policy, "needs_qk", False):  # quest: page bounds of the new keys [issue 12 hook]
            self.policy.observe_keys(self.state, k, pos)
        if self.static:  # the slot was made ready and the pools have a free column per row
            self.pos.index_copy_(1, self._at, pos)
            self.loc.index_copy_(1, self._at, self.dev.write_free(self.dev._encode({"k": k, "v": v}), valid))
            if x is not None:
                self.xloc.index_copy_(1, self._at, self.xs.write_free({"x": x[:, None]}, valid))
            self._at += 1
            return
        cols, remap = self.dev.write({"k": k, "v": v}, valid)
        self.loc = _remap(self.loc, self.tier == DEVICE, remap)
        for slots in (self.slots, self.state):
            if slots is not None:
                slots.append(1)  # zeros: tier DEVICE, empty policy state
        self.pos[:, -1:] = pos
        self.loc[:, -1:] = cols
        self.xloc[:, -1:] = -1
        if x is not None:
            self._write_x(x, valid)

    COMPACT_EVERY = 16  # evictions between two looks at whether to compact (a look reads counts back)

    def evict(self, retain: torch.Tensor) -> None:
        """Forget every slot not in ``retain``: free its columns and mark it empty (masks, no
        read-back, nothing moves); at the first eviction and every ``COMPACT_EVERY``-th after,
        compact the pools and the logical slots that are mostly free."""
        gone = (self.pos >= 0) & ~retain
        self._ahead = None  # slots and columns may move
        self.dev.free(self.loc, gone & (self.tier == DEVICE))
        self.host.free(self.loc, gone & (self.tier == HOST))
        self.xs.free(self.xloc, gone & (self.xloc >= 0))
        self.pos.masked_fill_(gone, -1)  # in place: the slot buffers keep their spare capacity
        if self.static:  # fixed pools, no compaction (and no Python counter: a compiled step would guard on it)
            return
        self._evictions += 1
        if self._evictions % self.COMPACT_EVERY == 1:
            self._compact_pools()
            live = self.pos >= 0
            if 2 * int(live.sum(1).max()) < self.used:
                self._compact(live)

    def _compact_pools(self) -> None:
        """Give memory back once a pool is mostly freed columns (after evictions or offloads);
        a static step's pools are fixed (their freed columns are reused instead)."""
        if self.static:
            return
        if self.dev.sparse():
            self.loc = _remap(self.loc, self.tier == DEVICE, self.dev.compact())
        if self.host.sparse():
            self.loc = _remap(self.loc, self.tier == HOST, self.host.compact())
        if self.xs.sparse():
            self.xloc = _remap(self.xloc, self.xloc >= 0, self.xs.compact())

    def _compact(self, live: torch.Tensor) -> None:
        idx, valid = rows_of(live)
        for slots in (self.slots, self.state):
            if slots is not None:
                slots.gather(idx)
        for name in ("pos", "loc", "xloc"):
            self.slots.slot[name] = torch.where(valid, self.slots.slot[name], -1)

    # --- the decode step ----------------------------------------------------------------
    def attend(self, query: torch.Tensor, t: torch.Tensor, scale: float, recompute, stats=None, layer: int = 0,
               n_max: int | None = None) -> torch.Tensor:
        """One query per row (B, H_q, 1, D) at positions t (B,): select with the policy, fetch
        the selected host tokens, recompute the selected deleted ones, then attend over all of
        them with one softmax and feed the row back (:func:`~alisa.attention.attend_with_feedback`,
        the same step as the core cache's). With nothing off the device that is one call.
        Returns (B, 1, H_q, D_v)."""
        policy, pos, q_pos = self.policy, self.pos, t[:, None]
        dev = self.dev.full(query.dtype)
        if self.host.used == 0 and not self._gone:  # every key is in the device pool
            out, keep = attend_with_feedback(policy, self.state, pos, q_pos, query, dev["k"], dev["v"], scale,
                                             loc=self.loc, n_max=n_max)
            if stats is not None:
                stats.add(layer, keep, q_pos)
            return out.transpose(1, 2)
        keep = attend_with_feedback(policy, self.state, pos, q_pos, query, select_only=True, n_max=n_max)[1]  # (B, 1, C)
        sel = keep[:, 0]
        if stats is not None:
            stats.add(layer, keep, q_pos)
        U = dev["k"].shape[2]  # device columns; the fetched and recomputed keys become extra columns U + j
        loc = torch.where(self.tier == DEVICE, self.loc, -1)
        xk, xv = [], []
        ahead, self._ahead = self._ahead, None
        if self.static:
            fetch, recomputes = self.static_key()
            parts = (self._fetched_static(sel & (self.tier == HOST), query.dtype) if fetch else None,
                     self._recomputed_static(sel & (self.tier == GONE), recompute) if recomputes else None)
        else:
            parts = (self._fetched(sel & (self.tier == HOST), t, ahead, query.dtype),
                     self._recomputed(sel & (self.tier == GONE), recompute, query.device))
        for part in parts:
            if part is None:
                continue
            idx, valid, k, v = part
            new = U + sum(x.shape[2] for x in xk) + torch.arange(idx.shape[1], device=loc.device)
            loc.scatter_(1, idx, torch.where(valid, new, loc.gather(1, idx)))
            xk.append(k)
            xv.append(v)
        out = attend_with_feedback(policy, self.state, pos, q_pos, query, dev["k"], dev["v"], scale, loc=loc,
                                   xkeys=torch.cat(xk, 2) if xk else None, xvals=torch.cat(xv, 2) if xv else None,
                                   keep=keep, n_max=n_max)[0]
        return out.transpose(1, 2)

    def _fetched(self, want: torch.Tensor, t: torch.Tensor, ahead, dtype: torch.dtype):
        """The selected host slots ``want`` (B, C) on the device: (slots (B, m), their validity,
        K, V), from the fetch started ahead when it is exactly these; None if there are none."""
        fetched = self._fetched_ahead(ahead, t, want)
        if fetched is None and bool(want.any()):
            fetched = self._fetch(want)
        if fetched is None:
            return None
        idx, valid, moved, token = fetched
        kv = self.host.decode(self.link.ready(moved, token), dtype)
        return idx, valid, kv["k"], kv["v"]

    def _recomputed(self, want: torch.Tensor, recompute, device):
        """K, V of the selected deleted slots ``want`` (B, C), recomputed on the device from their
        stored inputs: (slots (B, m), their validity, K, V); None if there are none."""
        if not bool(want.any()):
            return None
        idx, valid = rows_of(want)
        t0 = _now()
        cols = torch.where(valid, self.xloc.gather(1, idx), 0)
        x = self.link.ready(*self.link.fetch(self.xs.read_raw(cols), self.traffic, t0))["x"]
        self.traffic.h2d_bytes += _nbytes([x])
        t1 = _now(device)
        k, v = recompute(x[:, 0], self.pos.gather(1, idx))
        self.traffic.tokens_recomputed += int(valid.sum())
        self.traffic.seconds["recompute"] += _now(device) - t1
        return idx, valid, k, v

    def _first(self, want: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`rows_of` at a fixed ``width`` (no read-back): each row's first wanted slots
        (B, width) and their validity."""
        idx = torch.sort((~want).to(torch.int8), dim=1, stable=True).indices[:, :width]
        return idx, want.gather(1, idx)

    def _fetch_first(self, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_first` for the fetch slots; a row selecting more off the device is an error (counted)."""
        self._moved[LOST] += (want.sum(1) > self.fetch_slots).sum()
        return self._first(want, self.fetch_slots)

    def _fetched_static(self, want: torch.Tensor, dtype: torch.dtype):
        """:meth:`_fetched` in fixed shapes: the host slots ``want`` gathered by the device into
        ``fetch_slots`` columns per row (unused ones read column 0 and are masked)."""
        idx, valid = self._fetch_first(want)
        kv = self.host.decode(self.host.read_on(torch.where(valid, self.loc.gather(1, idx), 0)), dtype)
        self._moved[FETCHED] += valid.sum()
        return idx, valid, kv["k"], kv["v"]

    def _recomputed_static(self, want: torch.Tensor, recompute):
        """:meth:`_recomputed` in fixed shapes: ``fetch_slots`` inputs per row read and recomputed."""
        idx, valid = self._fetch_first(want)
        x = self.xs.read_on(torch.where(valid, self.xloc.gather(1, idx), 0))["x"]
        k, v = recompute(x[:, 0], self.pos.gather(1, idx).clamp(min=0))
        self._moved[RECOMPUTED] += valid.sum()
        return idx, valid, k, v

    def static_step_traffic(self, moved: bool) -> None:
        """Count one replayed (or run) static decode step's transfers: every step moves the same
        tensors (the fixed fetch slots, the new token's input and, when its tiers ``moved``
        (:meth:`schedule_static`), the fixed offload slots), so the bytes are known from their
        shapes; the tokens among them that were real are counted on the device (:meth:`settle_static`)."""
        B, F = self.pos.shape[0], self.fetch_slots
        fetch, recompute = self.static_key()
        if fetch:
            self.traffic.h2d_bytes += B * F * self.host.bytes_per_column()
        if recompute:
            self.traffic.h2d_bytes += B * F * self.xs.bytes_per_column()
        if self.xs.used:  # the new token's input
            self.traffic.d2h_bytes += B * self.xs.bytes_per_column()
        if moved and self.move_slots:
            self.traffic.d2h_bytes += B * self.move_slots * self.host.bytes_per_column()

    def settle_static(self) -> None:
        """Add what the static steps moved (device-side counts) to the traffic."""
        if self._moved is not None:
            n = self._moved.tolist()
            if n[LOST]:
                raise RuntimeError(f"a static decode step selected more off-device keys than its {self.fetch_slots} fetch "
                                   f"slots ({n[LOST]} row-steps; {self.policy!r}.max_selected(_old) is not a bound): its tokens are wrong")
            t = self.traffic
            t.tokens_fetched += n[FETCHED]
            t.tokens_recomputed += n[RECOMPUTED]
            t.tokens_offloaded += n[OFFLOADED]
            t.tokens_deleted += n[DELETED]
            t.moves_late += n[LATE]
            self._moved.zero_()

    def _fetch(self, want: torch.Tensor):
        """Start moving the host slots ``want`` (B, C) to the device: (slots (B, m), their
        validity, the moved tensors as stored, the link's token)."""
        t0 = _now()
        idx, valid = rows_of(want)
        cols = torch.where(valid, self.loc.gather(1, idx), 0)
        moved, token = self.link.fetch(self.host.read_raw(cols), self.traffic, t0)
        self.traffic.h2d_bytes += _nbytes(moved.values())
        self.traffic.tokens_fetched += int(valid.sum())
        return idx, valid, moved, token

    def prefetch(self, t: torch.Tensor) -> None:
        """Start fetching the host keys the query at positions ``t`` (B,) will select, before
        that query (and its key) exist: a policy that ``selects_ahead`` knows them from the slots
        before t and its state. The engine calls this for layer l + 1 after layer l's step, so the
        copy overlaps the compute in between. :meth:`attend` uses the fetch only if it is exactly
        the host keys it selects; otherwise it fetches again (a miss costs bytes, not exactness)."""
        self._ahead = None
        if self.host.used == 0 or not self.policy.selects_ahead:
            return
        keep = attend_with_feedback(self.policy, self.state, self.pos, t[:, None], None, select_only=True,
                                    n_max=self.n_max)[1]
        want = keep[:, 0] & (self.tier == HOST)
        self._ahead = (t.clone(), want, self._fetch(want) if bool(want.any()) else None)  # t may be updated in place

    def _fetched_ahead(self, ahead, t: torch.Tensor, want: torch.Tensor):
        """The fetch :meth:`prefetch` started, if it was for the query at ``t`` and the host
        slots ``want`` (slots appended since hold no host keys); None otherwise (counted a miss)."""
        if ahead is None:
            return None
        t_ahead, want_ahead, fetched = ahead
        c = want_ahead.shape[1]
        if torch.equal(t_ahead, t) and torch.equal(want_ahead, want[:, :c]) and not bool(want[:, c:].any()):
            self.traffic.prefetch_hits += 1
            return fetched
        self.traffic.prefetch_misses += 1
        return None

    # --- scheduling ---------------------------------------------------------------------
    MOVE_SLOTS = 2  # a static step's offloads per row: a step adds one non-local token and mostly evicts at most one
    # (bursts are finished outside the step: schedule_static)

    def schedule(self, plan: Plan, step: int, t_next: torch.Tensor) -> None:
        """Bring the tiers to what ``plan`` asks before decode step ``step`` (next positions t_next)."""
        phase = plan.phase(step)
        if phase == 1:
            return
        self._ahead = None  # tiers and columns move
        if self.static:
            self._enter(phase)
        move = self._to_offload(plan, t_next)
        if bool(move.any()):
            self._offload(move)
        if phase == 3:
            drop = self._to_delete(plan)
            if bool(drop.any()):
                self._delete(drop)

    def schedule_static(self, plan: Plan, phase: int, t_next: torch.Tensor) -> None:
        """:meth:`schedule` in fixed shapes, for a ``phase`` already in effect the step before (its
        large first move done): each row offloads its first ``move_slots`` tokens to move, written
        by the device into spare host columns (on CUDA through the pinned pool's mapped alias), then
        deletes what Phase III asks; no read-back. A row with more to move (evictions come in bursts)
        moves nothing more and deletes nothing here: ``late`` says how many, and :meth:`schedule`
        then finishes those rows outside the fixed step, so the tiers end as the eager step's."""
        if self.move_slots:
            move = self._to_offload(plan, t_next)
            idx, valid = self._first(move, self.move_slots)
            held = self.host._on(self.pos.device)[1].sum(1, keepdim=True)
            fits = valid & (torch.arange(idx.shape[1], device=idx.device) < self.host.fixed - self.move_slots - held)
            late = move.sum(1) > fits.sum(1)
            cols = torch.where(fits, self.loc.gather(1, idx), 0)
            self._on_host(idx, fits, cols, self.host.write_free(self.dev.read_on(cols), fits, spare=True))
            self._moved[OFFLOADED] += fits.sum()
        else:
            late = torch.zeros(self.pos.shape[0], dtype=torch.bool, device=self.pos.device)
        if phase == 3:
            self._delete(self._to_delete(plan) & ~late[:, None])
        self.late.copy_(late.sum())
        self._moved[LATE] += self.late

    def _enter(self, phase: int) -> None:
        """Static: what the fixed steps of ``phase`` read exists from now on (the host pool; in
        Phase III, recomputation), whatever the schedule moves."""
        if self.host.fixed:
            self.host.ensure(self.dev.buf, self.pos.shape[0])
            self.host._on(self.pos.device)  # on CUDA its mapped alias is made here, not inside a capture
        self._gone |= phase == 3

    def _to_offload(self, plan: Plan, t_next: torch.Tensor) -> torch.Tensor:
        """The slots (B, C) Phase II moves to the host now: each row's oldest device tokens outside
        the recent window (all held ones if not ``plan.local_on_device``) until floor(alpha *
        those tokens) are off the device."""
        live = self.pos >= 0
        if plan.local_on_device:
            k_loc = self.policy.recent_count(t_next + 1)[:, None]
            nonlocal_ = live & (self.pos < t_next[:, None] - k_loc + 1)
        else:
            nonlocal_ = live
        n_off = (live & (self.tier != DEVICE)).sum(1)
        need = (torch.floor(plan.alpha * nonlocal_.sum(1).double()).long() - n_off).clamp(min=0)
        cand = nonlocal_ & (self.tier == DEVICE)
        return cand & (cand.long().cumsum(1) <= need[:, None])

    def _to_delete(self, plan: Plan) -> torch.Tensor:
        """The host slots (B, C) Phase III deletes now: each row's oldest ones with a stored input
        until floor(beta * (host + deleted)) are deleted."""
        live = self.pos >= 0
        host = live & (self.tier == HOST)
        n_gone = (live & (self.tier == GONE)).sum(1)
        need = (torch.floor(plan.beta * (host.sum(1) + n_gone).double()).long() - n_gone).clamp(min=0)
        return host & (self.xloc >= 0) & (host.long().cumsum(1) <= need[:, None])

    def _delete(self, drop: torch.Tensor) -> None:
        """Delete the host slots ``drop`` (B, C): their K, V are recomputed when selected."""
        self.host.free(self.loc, drop)
        self.tier.masked_fill_(drop, GONE)  # in place: a captured step reads these buffers
        self.loc.masked_fill_(drop, -1)
        self._gone = True
        if self.static:
            self._moved[DELETED] += drop.sum()
        else:
            self._compact_pools()
            self.traffic.tokens_deleted += int(drop.sum())

    def _offload(self, move: torch.Tensor) -> None:
        t0 = _now()
        idx, valid = rows_of(move)
        cols = torch.where(valid, self.loc.gather(1, idx), 0)
        raw = self.link.offload(self.dev.read_raw(cols), self.traffic)
        self.traffic.d2h_bytes += _nbytes(raw.values())
        if self.static:  # the host pool was sized for what the plan can offload (make_static)
            hvalid = valid.to(self.host.device)
            held = 0 if self.host.live is None else self.host.live.sum(1)
            if bool((held + hvalid.sum(1) > self.host.fixed - self.move_slots).any()):
                raise RuntimeError(f"the static host pool ({self.host.fixed} columns per row) cannot hold what the plan "
                                   "offloads: make_static's bound is wrong")
            new_cols = self.host.write_free(raw, hvalid).to(self.loc.device)
        else:
            new_cols, remap = self.host.write_raw(raw, valid)  # both pools share one encoding
            self.loc = _remap(self.loc, self.tier == HOST, remap)
        self._on_host(idx, valid, cols, new_cols)
        self._compact_pools()
        self.traffic.tokens_offloaded += int(valid.sum())
        if not self.link.cuda:  # on CUDA the link timed the copy
            self.traffic.seconds["transfer"] += _now() - t0

    def _on_host(self, idx: torch.Tensor, valid: torch.Tensor, cols: torch.Tensor, new_cols: torch.Tensor) -> None:
        """Slots ``idx`` (B, m; where ``valid``) moved from device columns ``cols`` to host columns
        ``new_cols``: free the device columns, point the slots at the host (in place: a captured
        step reads these buffers)."""
        self.dev.free(cols, valid)
        self.loc.scatter_(1, idx, torch.where(valid, new_cols, self.loc.gather(1, idx)))
        self.tier.scatter_(1, idx, torch.where(valid, HOST, self.tier.gather(1, idx)))

    # --- measurement --------------------------------------------------------------------
    def counts(self) -> dict[str, float]:
        """Mean tokens per row in each tier."""
        live = self.pos >= 0
        return {name: float((live & (self.tier == t)).sum(1).double().mean()) for name, t in
                (("device", DEVICE), ("host", HOST), ("recompute", GONE))}

    def kv_bytes(self) -> dict[str, int]:
        """Bytes held per tier (live token columns) and allocated."""
        state = 0 if self.state is None else self.state.nbytes()
        return {"device": self.dev.bytes_live(), "host": self.host.bytes_live(), "inputs": self.xs.bytes_live(),
                "device_allocated": self.dev.bytes_allocated(), "host_allocated": self.host.bytes_allocated() + self.xs.bytes_allocated(),
                "policy_state": state}


def _remap(cols: torch.Tensor, mine: torch.Tensor, remap: torch.Tensor | None) -> torch.Tensor:
    """Columns of a pool's slots (where ``mine`` and >= 0) after that pool compacted."""
    if remap is None or remap.shape[1] == 0 or cols.numel() == 0:
        return cols
    mine = mine & (cols >= 0)
    return torch.where(mine, remap.gather(1, cols.clamp(0, remap.shape[1] - 1).to(remap.device)).to(cols.device), cols)


def _now(device: torch.device | None = None) -> float:
    import time

    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
