"""Recompute K, V of tokens from their stored attention inputs (docs/semantics.md §4).

``x`` is the hidden state that enters a layer's attention module (after the layer's input
norm where the layer has one): then ``K = RoPE(W_k·x + b_k)``, ``V = W_v·x + b_v``, with the
same operations, in the same order, as the attention forward of transformers 5.24:

* llama, mistral, qwen2: ``k = k_proj(x)``, ``v = v_proj(x)`` (qwen2: with bias), viewed
  ``(B, T, H_kv, D)`` and transposed to ``(B, H_kv, T, D)``; ``cos, sin =
  rotary_emb(x, positions)`` (the model's own rotary module: rope scaling and its attention
  factor included); ``k = k·cos + rotate_half(k)·sin``.
* gpt_neox: ``qkv = query_key_value(x)`` viewed ``(B, T, H, 3·D)``, transposed, chunked in
  three along the last dim (per head: q | k | v); RoPE on the first ``rotary_ndims =
  int(D · partial_rotary_factor)`` channels of k only, the rest passes through. The fused
  projection is run whole (q is discarded): slicing the interleaved k, v rows out of the
  weight would copy it on every call.
* opt: ``k = k_proj(x)``, ``v = v_proj(x)`` with bias, no RoPE (learned positions are added
  to the embeddings before the first layer, so ``positions`` is ignored); OPT scales q only.

Results are shaped as the attention module passes them to ``cache.update``.
"""

from __future__ import annotations

import torch

ROPE_FAMILIES = ("llama", "mistral", "qwen2")
FAMILIES = (*ROPE_FAMILIES, "opt", "gpt_neox")


def _family(config) -> str:
    fam = getattr(config, "model_type", None)
    if fam not in FAMILIES:
        raise ValueError(f"KV recomputation does not support model_type={fam!r}: supported are {', '.join(FAMILIES)}")
    return fam


def _dims(config) -> tuple[int, int, int]:
    """hidden size, number of KV heads, head dim."""
    fam = _family(config)
    hidden, heads = config.hidden_size, config.num_attention_heads
    if fam in ROPE_FAMILIES:
        return hidden, getattr(config, "num_key_value_heads", None) or heads, getattr(config, "head_dim", None) or hidden // heads
    return hidden, heads, hidden // heads  # opt, gpt_neox: multi-head, head dim = hidden / heads


def _itemsize(dtype) -> int:
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"dtype must be a torch.dtype or its name, got {dtype!r}")
    return torch.empty((), dtype=dtype).element_size()


# --- byte and FLOP accounting ---------------------------------------------------------
def input_bytes_per_token(config, dtype) -> int:
    """Bytes of one token's attention input in one layer: ``hidden · itemsize``."""
    return _dims(config)[0] * _itemsize(dtype)


def kv_bytes_per_token(config, dtype) -> int:
    """Bytes of one token's K and V in one layer: ``2 · H_kv · D · itemsize``."""
    _, h, d = _dims(config)
    return 2 * h * d * _itemsize(dtype)


def recompute_saves_memory(config) -> bool:
    """True when storing the input instead of K, V saves memory: ``hidden < 2 · H_kv · D``."""
    hidden, h, d = _dims(config)
    return hidden < 2 * h * d


def recompute_flops_per_token(config) -> int:
    """FLOPs :func:`kv_from_inputs` spends on one token in one layer (Linear: 2·in·out).

    ``2 · hidden · 2·H_kv·D`` (k and v projections); gpt_neox runs its fused q|k|v
    projection whole: ``2 · hidden · 3·hidden``. RoPE and biases are not counted.
    """
    hidden, h, d = _dims(config)
    out = 3 * hidden if _family(config) == "gpt_neox" else 2 * h * d
    return 2 * hidden * out


# --- model structure ------------------------------------------------------------------
def attention_modules(model) -> dict[int, torch.nn.Module]:
    """The attention module of every layer, keyed by its ``layer_idx``."""
    _family(model.config)
    mods = {m.layer_idx: m for m in model.modules()
            if getattr(m, "layer_idx", None) is not None and any(hasattr(m, p) for p in ("k_proj", "query_key_value"))}
    if sorted(mods) != list(range(model.config.num_hidden_layers)):
        raise ValueError(f"found attention modules for layers {sorted(mods)} in {type(model).__name__}, "
                         f"expected 0..{model.config.num_hidden_layers - 1}")
    return mods


def _rotary(model) -> torch.nn.Module:
    rot = getattr(model.get_decoder(), "rotary_emb", None)
    if rot is None:
        raise ValueError(f"no rotary_emb module found on the decoder of {type(model).__name__}")
    return rot


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def _rope_k(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' ``apply_rotary_pos_emb`` for k only (partial rotary when cos is narrower)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rd = cos.shape[-1]
    if rd == k.shape[-1]:
        return (k * cos) + (_rotate_half(k) * sin)
    k_rot, k_pass = k[..., :rd], k[..., rd:]
    return torch.cat([(k_rot * cos) + (_rotate_half(k_rot) * sin), k_pass], dim=-1)


class _Structure:
    """Per-model lookups, cached on the model object (module lists do not change)."""

    def __init__(self, model):
        self.family = _family(model.config)
        self.attn = attention_modules(model)
        self.rotary = None if self.family == "opt" else _rotary(model)


def _structure(model) -> _Structure:
    s = model.__dict__.get("_alisa_recompute")
    if s is None:
        s = _Structure(model)
        model.__dict__["_alisa_recompute"] = s  # plain attribute: not a submodule, not in the state dict
    return s


@torch.no_grad()
def kv_from_inputs(model, layer_idx: int, x: torch.Tensor, positions: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Recompute one layer's K, V from its attention inputs.

    Parameters
    ----------
    model : PreTrainedModel
        A llama, mistral, qwen2, opt or gpt_neox causal LM.
    layer_idx : int
        The layer.
    x : torch.Tensor
        ``(B, T, hidden)``: the hidden states that entered the layer's attention module.
    positions : torch.Tensor or None
        ``(B, T)`` int64 rotary position ids of those tokens (padding excluded); ignored
        (may be None) for opt.

    Returns
    -------
    k, v : torch.Tensor
        ``(B, H_kv, T, D)``, as the attention module passes them to the cache.
    """
    s = _structure(model)
    attn = s.attn[layer_idx]
    if x.dim() != 3:
        raise ValueError(f"x must be (B, T, hidden), got shape {tuple(x.shape)}")
    B, T, _ = x.shape
    if s.family == "gpt_neox":
        qkv = attn.query_key_value(x).view(B, T, -1, 3 * attn.head_size).transpose(1, 2)
        _, k, v = qkv.chunk(3, dim=-1)
    else:
        d = attn.head_dim
        k = attn.k_proj(x).view(B, T, -1, d).transpose(1, 2)
        v = attn.v_proj(x).view(B, T, -1, d).transpose(1, 2)
        if s.family == "opt":
            return k, v
    if positions is None or positions.shape != (B, T):
        raise ValueError(f"positions must be (B, T) = {(B, T)} for {s.family}, got {None if positions is None else tuple(positions.shape)}")
    cos, sin = s.rotary(x, positions)
    return _rope_k(k, cos, sin), v


# --- capturing the inputs -------------------------------------------------------------
class InputRecorder:
    """Keeps the latest attention input of every layer while it is open.

    ``rec[l]`` (also ``rec.inputs[l]``) is the ``(B, T, hidden)`` tensor that last entered
    layer ``l``'s attention module (a reference, no copy); ``rec.positions[l]`` the
    ``position_ids`` keyword that came with it, or None where the family does not pass it.
    Use as a context manager, or call :meth:`close` to remove the hooks.
    """

    def __init__(self, model):
        self.inputs: dict[int, torch.Tensor] = {}
        self.positions: dict[int, torch.Tensor | None] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(l), with_kwargs=True)
                         for l, m in _structure(model).attn.items()]

    def _hook(self, layer_idx: int):
        def hook(module, args, kwargs):
            self.inputs[layer_idx] = args[0] if args else kwargs["hidden_states"]
            self.positions[layer_idx] = kwargs.get("position_ids")
        return hook

    def __getitem__(self, layer_idx: int) -> torch.Tensor:
        return self.inputs[layer_idx]

    def clear(self) -> None:
        """Drop the stored references."""
        self.inputs.clear()
        self.positions.clear()

    def close(self) -> None:
        """Remove the hooks (the stored references stay until :meth:`clear`)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "InputRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def capture_inputs(model) -> InputRecorder:
    """Hook every attention module of ``model``: ``with capture_inputs(model) as rec: ...``."""
    return InputRecorder(model)
