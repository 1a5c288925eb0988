"""The one module that couples alisa to Hugging Face transformers 5.

``with alisa.apply(model, policy):`` switches the model's attention implementation to
``"alisa"`` (registered in transformers' ``AttentionInterface``) and hooks the base
model so that:

* a forward without a cache (``use_cache=False``) is the accuracy-path simulation:
  every query position is masked to exactly the keys it would have had under
  token-by-token decoding (docs/semantics.md §3, path 1);
* a forward with a cache (``use_cache=True``, continuing with ``cache=`` /
  ``past_key_values=``, or ``model.generate``) runs through :class:`AlisaCache`, which
  holds only what the policy may still need (docs/semantics.md §3, path 2).

On exit the hooks are removed and the attention implementation is restored.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention import KeptStats, policy_attention
from .kvstore import SlotStore
from .policies import PREFILL_MODES, Policy, make_policy

ATTN_NAME = "alisa"
COVERED_FAMILIES = ("llama", "mistral", "qwen2", "opt", "gpt_neox")


def chunk_positions(mask: torch.Tensor, n_real: torch.Tensor) -> torch.Tensor:
    """Real (padding-excluded) positions of a chunk: mask (B, Q) -> (B, Q), -1 for padding."""
    m = mask.bool()
    return torch.where(m, n_real[:, None] + m.long().cumsum(1) - 1, -1)


class AlisaLayer(CacheLayerMixin):
    is_sliding = False

    def __init__(self, policy: Policy):
        super().__init__()
        self.store = SlotStore(policy)

    def lazy_initialization(self, key_states, value_states):  # storage is created by the first append
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("AlisaLayer is updated through AlisaCache.update")

    def get_seq_length(self) -> int:
        return self.store.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.store.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reorder_cache(self, beam_idx):
        self.store.batch_select(beam_idx)


class AlisaCache(Cache):
    """A transformers ``Cache`` whose layers keep only the keys their policy may still need.

    Measured, not nominal: :meth:`tokens_held` and :meth:`bytes_allocated` read the
    live slots and the buffers actually allocated.
    """

    def __init__(self, policy: Policy, num_layers: int):
        super().__init__(layers=[AlisaLayer(policy) for _ in range(num_layers)])
        self.policy = policy
        self.n_real: torch.Tensor | None = None  # real tokens seen per sequence, (B,)
        self.chunk_pos: torch.Tensor | None = None

    def begin(self, mask: torch.Tensor) -> torch.Tensor:
        """Register the next chunk's padding mask (B, Q); returns its real positions."""
        if self.n_real is None:
            self.n_real = torch.zeros(mask.shape[0], dtype=torch.long, device=mask.device)
        self.chunk_pos = chunk_positions(mask, self.n_real)
        self.n_real += mask.bool().sum(1)  # in place: a replayed step reads the count where the last one left it
        return self.chunk_pos

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        store = self.layers[layer_idx].store
        store.append(key_states, value_states, self.chunk_pos)
        key, value, _ = store.kv()
        return key, value

    def store(self, layer_idx: int) -> SlotStore:
        return self.layers[layer_idx].store

    def attend(self, layer_idx: int, query: torch.Tensor, chunk: "_Chunk", scale: float,
               sliding_window: int | None, stats: KeptStats | None) -> torch.Tensor:
        """Attention of the chunk just appended (docs/semantics.md §3, path 2), then eviction of what no future query may select."""
        store = self.store(layer_idx)
        out = policy_attention(self.policy, store, query, chunk.q_pos, scale, dense=chunk.dense,
                               sliding_window=sliding_window, stats=stats, layer=layer_idx)
        if self.policy.evicts:
            store.evict(self.policy.retain(store.kv()[2], chunk.t_next, store.state))
        return out

    def tokens_held(self) -> list[float]:
        """Mean live tokens per sequence, per layer."""
        return [float(l.store.tokens_held().double().mean()) if l.store.keys is not None else 0.0 for l in self.layers]

    def bytes_allocated(self) -> list[dict[str, int]]:
        return [l.store.bytes_allocated() for l in self.layers]

    def _select(self, index):
        for l in self.layers:
            l.store.batch_select(index)
        if self.n_real is not None:
            self.n_real = self.n_real[index]

    def reorder_cache(self, beam_idx):
        self._select(beam_idx)

    def batch_select_indices(self, indices):
        self._select(indices)

    def batch_repeat_interleave(self, repeats: int):
        if self.n_real is not None:
            self._select(torch.arange(self.n_real.shape[0], device=self.n_real.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int):
        raise ValueError("AlisaCache cannot be cropped: evicted keys are gone (assisted/speculative decoding is not supported)")


@dataclass
class _Chunk:
    cache: AlisaCache | None
    q_pos: torch.Tensor  # (B, Q)
    t_next: torch.Tensor | None  # (B,) position of each sequence's next real token
    dense: bool


class Controller:
    """What one ``apply`` context knows: the policy, the current chunk, measured stats."""

    def __init__(self, policy: Policy, prefill: str):
        self.policy, self.prefill = policy, prefill
        self.stats = KeptStats()
        self.chunk: _Chunk | None = None
        self.last_cache: AlisaCache | None = None

    def kept_fraction(self) -> dict:
        """Mean fraction of causal keys actually attended, per layer and overall (measured)."""
        return {"per_layer": self.stats.per_layer(), "overall": self.stats.overall()}


_CONTROLLERS: "weakref.WeakKeyDictionary[torch.nn.Module, Controller]" = weakref.WeakKeyDictionary()


def _alisa_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
    ctl = _CONTROLLERS.get(module)
    if ctl is None or ctl.chunk is None:
        raise RuntimeError("attention implementation 'alisa' runs only inside `with alisa.apply(model, policy):`")
    chunk = ctl.chunk
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if chunk.cache is not None:
        out = chunk.cache.attend(module.layer_idx, query, chunk, scale, sliding_window, ctl.stats)
    else:  # no cache: the whole input is one chunk over a throw-away store
        store = SlotStore(ctl.policy)
        store.append(key, value, chunk.q_pos)
        out = policy_attention(ctl.policy, store, query, chunk.q_pos, scale, dense=chunk.dense,
                               sliding_window=sliding_window, stats=ctl.stats, layer=module.layer_idx)
    return out, None


AttentionInterface.register(ATTN_NAME, _alisa_attention)


def _cache_kwarg(base: torch.nn.Module) -> str:
    params = inspect.signature(base.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _attention_modules(model: PreTrainedModel) -> list[torch.nn.Module]:
    mods = [m for m in model.modules() if hasattr(m, "layer_idx") and any(hasattr(m, p) for p in ("q_proj", "query_key_value", "qkv_proj"))]
    if len(mods) != model.config.num_hidden_layers:
        raise ValueError(f"found {len(mods)} attention modules for {model.config.num_hidden_layers} layers in {type(model).__name__}")
    return mods


@contextlib.contextmanager
def apply(model: PreTrainedModel, policy: Policy | str = "dense", prefill: str = "sparse", *,
          cache_factory=None, **policy_kwargs):
    """Run ``model`` under a KV policy; restores the model exactly on exit.

    Parameters
    ----------
    model : PreTrainedModel
        A causal LM of a covered family (see ``COVERED_FAMILIES``).
    policy : Policy or str
        A policy, or a registered name built with ``policy_kwargs`` (sparsity= or budget=).
    prefill : {"sparse", "dense"}
        Whether the first chunk a cache sees (the prompt) is masked by the policy or
        attends fully (the policy then starts with the first generated token).

    Yields
    ------
    Controller
        ``.kept_fraction()`` gives the measured kept fraction; ``.last_cache`` the cache
        of the latest cached forward.
    """
    if isinstance(policy, str):
        policy = make_policy(policy, **policy_kwargs)
    elif policy_kwargs:
        raise ValueError(f"policy kwargs {sorted(policy_kwargs)} given with a built policy {policy!r}")
    if prefill not in PREFILL_MODES:
        raise ValueError(f"prefill={prefill!r} is invalid: allowed are {', '.join(PREFILL_MODES)}")
    family = getattr(model.config, "model_type", None)
    if family not in COVERED_FAMILIES:
        raise ValueError(f"model family {family!r} is not covered: covered are {', '.join(COVERED_FAMILIES)}")
    if model in _CONTROLLERS:
        raise RuntimeError("alisa.apply is already active on this model")

    ctl = Controller(policy, prefill)
    base = model.get_decoder()  # the module that receives the inputs and the cache (OPT: the decoder, not OPTModel)
    cache_kw = _cache_kwarg(base)
    sig = inspect.signature(base.forward)
    n_layers = model.config.num_hidden_layers
    attn_modules = _attention_modules(model)

    def pre_hook(mod, args, kwargs):
        kwargs = dict(sig.bind_partial(*args, **kwargs).arguments) | kwargs.get("kwargs", {})
        kwargs.pop("kwargs", None)
        x = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
        B, Q = x.shape[:2]
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise ValueError(f"alisa.apply needs a 2D padding attention_mask (got {mask.dim()}D)")
        chunk_mask = mask[:, -Q:] if mask is not None else torch.ones(B, Q, dtype=torch.bool, device=x.device)
        cache = kwargs.get(cache_kw, kwargs.get("past_key_values"))
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = model.config.use_cache
        if cache is not None and not isinstance(cache, AlisaCache):
            if cache.get_seq_length() > 0:
                raise ValueError(f"a {type(cache).__name__} that already holds tokens was passed; inside alisa.apply "
                                 "continue only with the cache a previous call returned")
            cache = None  # a fresh default cache (e.g. from generate): replace it with ours
        if isinstance(cache, AlisaCache) and cache.policy is not policy:
            raise ValueError(f"the cache passed was built under {cache.policy!r}, not this context's {policy!r}")
        if cache is None and use_cache:
            cache = (cache_factory or AlisaCache)(policy, n_layers)
        kwargs.pop("past_key_values", None)
        kwargs[cache_kw] = cache
        if cache is not None:
            dense = prefill == "dense" and cache.n_real is None  # the first chunk (not the length: a compiled step would guard on it)
            q_pos = cache.begin(chunk_mask)
            ctl.chunk = _Chunk(cache, q_pos, cache.n_real, dense)
            ctl.last_cache = cache
        else:
            q_pos = chunk_positions(chunk_mask, torch.zeros(B, dtype=torch.long, device=x.device))
            ctl.chunk = _Chunk(None, q_pos, None, prefill == "dense")
        return (), kwargs

    def post_hook(mod, args, kwargs, output):
        ctl.chunk = None

    saved_impl = model.config._attn_implementation
    handles = []
    try:
        for m in attn_modules:
            _CONTROLLERS[m] = ctl
        _CONTROLLERS[model] = ctl
        handles.append(base.register_forward_pre_hook(pre_hook, with_kwargs=True))
        handles.append(base.register_forward_hook(post_hook, with_kwargs=True, always_call=True))
        model.set_attn_implementation(ATTN_NAME)
        yield ctl
    finally:
        for h in handles:
            h.remove()
        model.set_attn_implementation(saved_impl)
        for m in [*attn_modules, model]:
            _CONTROLLERS.pop(m, None)
        ctl.chunk = None
