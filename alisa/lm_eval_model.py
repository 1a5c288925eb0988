"""lm-evaluation-harness model ``alisa``: HFLM with a KV policy applied.

    lm_eval --model alisa --model_args pretrained=smollm2-135m,policy=swa,sparsity=0.8 \
        --tasks piqa_local --include_path tasks --limit 50

Log-likelihood and rolling log-likelihood requests run the accuracy path (one forward,
``use_cache=False``: each position scored exactly as under token-by-token decoding);
``generate_until`` runs ``model.generate`` through the evicting decode cache. All request
handling (batching, few-shot contexts, caching of logits) is lm-eval's own HFLM.
"""

from __future__ import annotations

import contextlib
import logging

import lm_eval.models  # noqa: F401  (stock placeholders first: get_model only auto-loads them into an empty registry)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .integration import apply
from .models import load_model
from .policies import make_policy

log = logging.getLogger(__name__)


@register_model("alisa")
class AlisaLM(HFLM):
    """HFLM whose model runs under ``alisa.apply(model, policy, prefill)`` for its whole life.

    Parameters
    ----------
    pretrained : str or PreTrainedModel
        ``smollm2-135m`` (embedded), a local folder, a hub id, or a loaded model
        (then pass ``tokenizer=``).
    policy, sparsity, budget, prefill
        As :func:`alisa.make_policy` and :func:`alisa.apply`.
    """

    def __init__(self, pretrained="smollm2-135m", policy: str = "dense", sparsity: float | None = None,
                 budget: int | None = None, prefill: str = "sparse", dtype=None, device: str | None = None,
                 tokenizer=None, batch_size=1, **kwargs):
        self.kv_policy = make_policy(policy, sparsity=sparsity, budget=budget)  # validate before loading anything
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            # lm-eval's CLI passes device='cuda:0' unless told otherwise; like its HFLM, fall back to the CPU.
            if device is not None:
                log.warning("device=%r is not available here; using the CPU", device)
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if isinstance(pretrained, str):
            model, tok = load_model(pretrained, dtype=dtype, device=device)
            if tok is None:
                raise ValueError(f"pretrained={pretrained!r} has no tokenizer (random weights): it cannot be scored")
        else:
            model, tok = pretrained, tokenizer
        super().__init__(pretrained=model, tokenizer=tok, batch_size=batch_size, **kwargs)
        self._stack = contextlib.ExitStack()
        self.run = self._stack.enter_context(apply(model, self.kv_policy, prefill=prefill))

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inps, use_cache=False).logits

    def kept_fraction(self) -> dict:
        """Measured fraction of causal keys attended, per layer and overall, since creation."""
        return self.run.kept_fraction()

    def close(self) -> None:
        """Restore the model (remove the policy)."""
        self._stack.close()
