"""INT8 KV compression as in ALISA: asymmetric min/max quantization per token group.

Each ``(batch, head, token)`` group of ``D`` channels gets its own scale and zero point,
so every token can move between memory tiers on its own (the store is token-granular):

    λ = (max − min) / 255,   zero = min,
    q = clamp(round((x − min) / λ), 0, 255)   (uint8),
    x̂ = q · λ + min                           (in the compute dtype, before use).

λ and min are kept in float32 (float64 for float64 inputs), shape ``(..., 1)``. A constant
group (max == min) has λ = 0, stores q = 0 and de-quantizes to min exactly.

Round-trip bound, per element: ``|x̂ − x| ≤ λ/2 + ε``, where ε is float rounding of the
float32 arithmetic (a few ulps of ``max(|min|, |max|)``: about 1e-6 · |x|), plus, when
de-quantizing into float16/bfloat16, the rounding of that final cast. Non-finite inputs
are not supported (λ becomes inf/nan).

Plain tensors and functions are the primary API, so that an engine can keep ``q``,
``scale`` and ``zero`` in preallocated buffers and gather slices of them
(``index_select`` on the token dimension works on all three alike).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LEVELS = 255


def param_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of λ and min for inputs of ``dtype``: float64 stays, all else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def quantize_tensors(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize over the last dimension.

    Parameters
    ----------
    x : torch.Tensor
        Floating tensor ``(..., D)``, e.g. keys ``(B, H, T, D)``.

    Returns
    -------
    q : torch.Tensor
        uint8, same shape as ``x``.
    scale, zero : torch.Tensor
        λ and min, shape ``(..., 1)``, float32 (float64 for float64 ``x``).
    """
    if not x.is_floating_point():
        raise ValueError(f"quantize needs a floating tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"quantize needs a non-empty last dimension, got shape {tuple(x.shape)}")
    xf = x.to(param_dtype(x.dtype))
    zero = xf.amin(dim=-1, keepdim=True)
    scale = (xf.amax(dim=-1, keepdim=True) - zero) / LEVELS
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # λ = 0: x − min = 0, so q = 0
    q = ((xf - zero) / safe).round_().clamp_(0, LEVELS).to(torch.uint8)
    return q, scale, zero


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q · λ + min`` computed in the parameters' dtype, then cast to ``dtype``.

    Parameters
    ----------
    q : torch.Tensor
        uint8 ``(..., D)``.
    scale, zero : torch.Tensor
        ``(..., 1)``, as returned by :func:`quantize_tensors` (or gathered slices of them).
    dtype : torch.dtype
        The compute dtype of the result.
    """
    return torch.addcmul(zero, q.to(scale.dtype), scale).to(dtype)


@dataclass
class QTensor:
    """An INT8-quantized tensor: ``q`` (uint8), ``scale`` λ and ``zero`` (min), ``(..., 1)``.

    ``dtype`` is the dtype of the original tensor, the default of :meth:`dequantize`.
    """

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def nbytes(self) -> int:
        """Real bytes of ``q``, ``scale`` and ``zero`` together."""
        return sum(t.element_size() * t.numel() for t in (self.q, self.scale, self.zero))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The de-quantized tensor in ``dtype`` (default: the original dtype)."""
        return dequantize(self.q, self.scale, self.zero, dtype or self.dtype)

    def index_select(self, dim: int, index: torch.Tensor) -> "QTensor":
        """Gather along ``dim`` (not the last one) in all three tensors."""
        if dim % self.q.dim() == self.q.dim() - 1:
            raise ValueError("QTensor.index_select: the last (channel) dimension is quantized as one group and cannot be indexed")
        return QTensor(self.q.index_select(dim, index), self.scale.index_select(dim, index), self.zero.index_select(dim, index), self.dtype)

    def to(self, device) -> "QTensor":
        """A copy on ``device`` (parameters keep their dtype)."""
        return QTensor(self.q.to(device), self.scale.to(device), self.zero.to(device), self.dtype)


def quantize(x: torch.Tensor) -> QTensor:
    """Quantize ``x`` (``(..., D)``) per group of its last dimension; see the module doc."""
    return QTensor(*quantize_tensors(x), dtype=x.dtype)


def bytes_per_group(d: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes one quantized group of ``d`` channels takes: ``d`` uint8 plus λ and min."""
    return d + 2 * torch.empty((), dtype=param_dtype(dtype)).element_size()
