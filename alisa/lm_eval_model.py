"""lm-evaluation-harness model ``alisa``: HFLM with a KV policy applied.

    lm_eval --model alisa --model_args pretrained=smollm2-135m,policy=swa,sparsity=0.8 \
        --tasks piqa_local --include_path tasks --limit 50

A policy's hyperparameters are model_args too (``policy=sinks,sparsity=0.8,n_sinks=2``), and
``policy=`` takes any installed plug-in's name (entry point group ``alisa.policies``).

Log-likelihood and rolling log-likelihood requests run the accuracy path (one forward,
``use_cache=False``: each position scored exactly as under token-by-token decoding);
``generate_until`` runs ``model.generate`` through the evicting decode cache. All request
handling (batching, few-shot contexts, caching of logits) is lm-eval's own HFLM.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import lm_eval.models  # noqa: F401  (stock placeholders first: get_model only auto-loads them into an empty registry)
import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from .integration import apply
from .policies import PREFILL_MODES
from .models import load_model
from .policies import hyperparameters, make_policy, policy_class

log = logging.getLogger(__name__)

# HFLM arguments that still mean something when alisa loads the model itself (the others -- revision,
# parallelize, peft, gguf_file, ... -- configure HFLM's own loading and would be ignored silently).
HFLM_ARGS = ("backend", "truncation", "logits_cache", "max_length", "softmax_dtype", "mixed_precision_dtype",
             "max_batch_size", "add_bos_token", "prefix_token_id", "think_end_token", "enable_thinking",
             "chat_template_args", "use_fast_tokenizer", "trust_remote_code")
OWN_ARGS = ("pretrained", "policy", "sparsity", "budget", "prefill", "dtype", "device", "tokenizer", "batch_size")


def _check_args(kwargs: dict, device, batch_size, policy_args: tuple = ()) -> None:
    """One ValueError naming the bad model_args value and what is allowed (before anything loads)."""
    unknown = sorted(k for k in kwargs if k not in HFLM_ARGS)
    if unknown:
        raise ValueError(f"unknown model_args key {unknown[0]!r}: allowed are {', '.join(OWN_ARGS + tuple(policy_args) + HFLM_ARGS)}")
    if device is not None and not (str(device) in ("cpu", "cuda") or str(device).startswith("cuda:") or str(device) == "mps"):
        raise ValueError(f"device={device!r} is invalid: allowed are cpu, cuda, cuda:N")
    if isinstance(batch_size, str) and not batch_size.startswith("auto"):
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise ValueError(f"batch_size={batch_size!r} is invalid: allowed is an integer >= 1 or auto") from None
    if isinstance(batch_size, (int, float)) and not isinstance(batch_size, bool) and batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is invalid: allowed is an integer >= 1 or auto")


@register_model("alisa")
class AlisaLM(HFLM):
    """HFLM whose model runs under ``alisa.apply(model, policy, prefill)`` for its whole life.

    Parameters
    ----------
    pretrained : str or PreTrainedModel
        ``smollm2-135m`` (embedded), a local folder, a hub id, or a loaded model
        (then pass ``tokenizer=``).
    policy, sparsity, budget, prefill
        As :func:`alisa.make_policy` and :func:`alisa.apply`: a built-in or plug-in policy name.
    **kwargs
        The policy's hyperparameters (by its constructor's keyword names), then HFLM's own arguments.
    """

    def __init__(self, pretrained="smollm2-135m", policy: str = "dense", sparsity: float | None = None,
                 budget: int | None = None, prefill: str = "sparse", dtype=None, device: str | None = None,
                 tokenizer=None, batch_size=1, **kwargs):
        names = tuple(hyperparameters(policy_class(policy)))  # an unknown policy or a broken plug-in: one line
        params = {k: kwargs.pop(k) for k in list(kwargs) if k in names}  # the policy's own, before HFLM's of that name
        _check_args(kwargs, device, batch_size, names)  # validate before loading anything
        self.kv_policy = make_policy(policy, sparsity=sparsity, budget=budget, **params)
        if prefill not in PREFILL_MODES:
            raise ValueError(f"prefill={prefill!r} is invalid: allowed are {', '.join(PREFILL_MODES)}")
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

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's constructor hook (``--model_args`` parsed). A key given in ``model_args`` wins over the same
        CLI setting (``--batch_size``, ``--device``); under the ``lm_eval`` command a bad value ends it with one
        line, ``error: --model_args: ...``, exit 2 (from Python it raises ValueError)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        try:
            return cls(**arg_dict, **extra)
        except (ValueError, TypeError) as e:
            from .lm_eval_plugin import cli_active

            if not cli_active():
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"error: --model_args: {first}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    show_progress = True  # lm-eval's per-request progress bars (alisa.eval turns them off on a quiet console)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return super().generate_until(requests, disable_tqdm=disable_tqdm or not self.show_progress)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        with torch.no_grad():
            return self.model(inps, use_cache=False).logits

    def kept_fraction(self) -> dict:
        """Measured fraction of causal keys attended, per layer and overall, since creation."""
        return self.run.kept_fraction()

    def close(self) -> None:
        """Restore the model (remove the policy)."""
        self._stack.close()
