"""Quickstart: greedy generation with the embedded SmolLM2 under ALISA's SWA at 80% KV sparsity.

    python -m alisa.quickstart [--policy swa] [--sparsity 0.8] [--max-new-tokens 48] [--prompt TEXT]

Prints the text dense and under the policy, the measured fraction of causal keys each
query actually attended, and the tokens the cache really holds per layer.
"""

from __future__ import annotations

import sys
import time

import torch

PROMPT = ("Once upon a time, in a small village at the foot of the mountains, there lived an old clockmaker "
          "named Tobias. Every morning he opened his shop at seven and")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130


def _main(argv: list[str] | None) -> int:
    from .config import OneLineArgumentParser, model_context

    ap = OneLineArgumentParser(prog="python -m alisa.quickstart", description=__doc__.splitlines()[0])
    ap.add_argument("--policy", default="swa")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("-v", "--verbose", action="store_true", help="third-party log lines and progress bars too")
    a = ap.parse_args(argv)
    if a.max_new_tokens < 1:
        return _error(f"--max-new-tokens={a.max_new_tokens} is invalid: allowed is an integer >= 1")
    if not a.prompt.strip():
        return _error(f"--prompt={a.prompt!r} is invalid: allowed is a text with at least one non-space character")
    from types import SimpleNamespace

    context = model_context(SimpleNamespace(name=a.model, hf_config=None))
    if context is not None and a.max_new_tokens >= context:
        return _error(f"--max-new-tokens={a.max_new_tokens} is invalid: allowed is less than {context}, the context of "
                      f"model {a.model!r} (prompt included)")
    from .policies import make_policy

    try:
        policy = make_policy(a.policy, sparsity=a.sparsity)  # before the model stack is imported: a typo is told at once
    except ValueError as e:
        return _error(str(e))
    from . import apply, load_model
    from .models import quiet_libraries

    if not a.verbose:
        quiet_libraries()

    try:
        model, tok = load_model(a.model)
    except ValueError as e:
        return _error(str(e))
    if tok is None:
        return _error(f"--model={a.model!r} has no tokenizer (random weights): allowed is a real model "
                      "(smollm2-135m, a local folder or a hub id)")
    inputs = tok(a.prompt, return_tensors="pt")
    n_prompt = inputs.input_ids.shape[1]
    limit = getattr(model.config, "max_position_embeddings", None)
    if n_prompt == 0:
        return _error(f"--prompt={a.prompt!r} is invalid: it gives no tokens; allowed is a text with at least one non-space character")
    if limit and n_prompt + a.max_new_tokens > limit:
        return _error(f"--prompt + --max-new-tokens={n_prompt} + {a.max_new_tokens} tokens is invalid: allowed are at "
                      f"most {limit} in all, the context of model {a.model!r}")
    gen = dict(max_new_tokens=a.max_new_tokens, do_sample=False)
    with torch.no_grad():
        t0 = time.perf_counter()
        dense = model.generate(**inputs, **gen)
        t1 = time.perf_counter()
        with apply(model, policy) as run:
            sparse = model.generate(**inputs, **gen)
        t2 = time.perf_counter()
    held = run.last_cache.tokens_held()
    total = sparse.shape[1] - 1  # tokens whose KV was produced (the last token's KV is never needed)
    print(f"model: {model.config.name_or_path}   prompt: {n_prompt} tokens   new: {a.max_new_tokens}")
    print(f"dense          ({t1 - t0:.1f} s): {tok.decode(dense[0, n_prompt:], skip_special_tokens=True)!r}")
    print(f"{policy!r} ({t2 - t1:.1f} s): {tok.decode(sparse[0, n_prompt:], skip_special_tokens=True)!r}")
    kept = run.kept_fraction()
    print(f"measured kept fraction of causal keys attended: {kept['overall']:.3f} (mean over {len(kept['per_layer'])} layers)")
    print(f"KV tokens held at the end: mean {sum(held) / len(held):.1f} per layer of {total} seen "
          f"(min {min(held):.0f}, max {max(held):.0f})")
    return 0


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
