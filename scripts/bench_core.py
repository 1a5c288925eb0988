"""Side-by-side wall times of the core paths on the embedded SmolLM2 (CPU or whatever device is given).

    python scripts/bench_core.py [--prompt 512] [--steps 64] [--batch 4] [--device cpu]

Prints, measured in one run: one forward over the prompt (accuracy-path simulation,
use_cache=False) for stock transformers, alisa dense and swa@0.8; then `steps` greedy
decode steps at `batch` after a sparse prefill of the prompt, stock cache vs alisa dense
vs swa@0.8, with the tokens each cache holds per layer at the end. Ratios are to stock.
"""

import argparse
import time

import torch

import alisa


def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best, out


def decode_steps(model, ids, steps):
    out = model(ids, use_cache=True)
    cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(nxt, cache=cache, use_cache=True)
        cache, nxt = out.cache, out.logits[:, -1:].argmax(-1)
    return time.perf_counter() - t, cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()
    model, tok = alisa.load_model("smollm2-135m", device=a.device)
    text = open(alisa.policies.__file__).read() * 4
    ids = tok(text, return_tensors="pt").input_ids[:, :a.prompt].to(a.device)
    print(f"SmolLM2-135M fp32 on {a.device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    with torch.no_grad():
        model(ids[:, :32], use_cache=False)  # warm-up
        base, _ = timed(lambda: model(ids, use_cache=False), 2)
        print(f"forward over {a.prompt} tokens (simulation):   stock {base:6.2f} s")
        for name, kw in [("dense", {}), ("swa", dict(sparsity=0.8))]:
            with alisa.apply(model, name, **kw):
                t, _ = timed(lambda: model(ids, use_cache=False), 2)
            print(f"  alisa {name:5s} {str(kw):18s} {t:6.2f} s  ({t / base:.2f}x stock)")
        batch = ids.expand(a.batch, -1).contiguous()
        base, cache = decode_steps(model, batch, a.steps)
        print(f"{a.steps} decode steps, batch {a.batch}, after a {a.prompt}-token prompt: stock {base:6.2f} s "
              f"({1000 * base / a.steps:.1f} ms/step), cache holds {cache.get_seq_length()} tokens/layer")
        for name, kw in [("dense", {}), ("swa", dict(sparsity=0.8))]:
            with alisa.apply(model, name, **kw):
                t, cache = decode_steps(model, batch, a.steps)
            held = cache.tokens_held()
            kv = sum(b["kv"] for b in cache.bytes_allocated())
            print(f"  alisa {name:5s} {str(kw):18s} {t:6.2f} s ({1000 * t / a.steps:.1f} ms/step, {t / base:.2f}x stock); "
                  f"tokens held/layer mean {sum(held) / len(held):.1f} (min {min(held):.0f}, max {max(held):.0f}); KV allocated {kv / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
