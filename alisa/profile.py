"""Measure this machine for the runtime's cost model: ``python -m alisa.profile [--model NAME]``.

Measures, for one model on the device tier (cuda when present, else cpu): a decode step's
time at batch 1 and 8 with a tiny context, the bandwidth of reading KV in attention, the
bandwidth of moving token columns between the tiers (the gather + copy the runtime does),
the FLOP rate of recomputing K, V, the capacities, and the raw rates: a large contiguous
copy in device memory (``hbm_copy_bw``; on cpu the RAM copy bandwidth) and pinned host <->
device copies (``h2d_pinned_bw``, ``d2h_pinned_bw``; CUDA only, else null with the reason in
``extra``). Saves
``results/profiles/<host>-<device>-<model>.json`` (atomically) and prints it.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from .results import REPO, hardware, write_json
from .runtime.costmodel import Profile


def _timeit(fn, device, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hbm_copy_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Bytes per second copied from one large contiguous tensor to another on ``device``
    (cuda: device memory to device memory; cpu: RAM to RAM). Each byte is read once and
    written once: the memory traffic is twice this figure."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    y = torch.empty_like(x)
    return nbytes / _timeit(lambda: y.copy_(x), device, repeat)


PINNED_NOT_CUDA = "no CUDA device: pinned host memory and a host-device link exist only with a GPU (on cpu both tiers are RAM)"


def pinned_bandwidth(device: torch.device, nbytes: int = 256 << 20, repeat: int = 5) -> tuple[float | None, float | None, str]:
    """(host -> device, device -> host) bytes per second between pinned host memory and ``device``:
    ``non_blocking=True`` copies of ``nbytes`` on a dedicated ``torch.cuda.Stream``, timed with CUDA
    events (the median of ``repeat`` after one untimed copy each way), and what was measured.
    Off CUDA: ``(None, None, why)``."""
    if device.type != "cuda":
        return None, None, PINNED_NOT_CUDA
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True).fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))  # dev was filled on the default stream

    def rate(dst: torch.Tensor, src: torch.Tensor) -> float:
        times = []
        for i in range(repeat + 1):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(stream):
                start.record(stream)
                dst.copy_(src, non_blocking=True)
                end.record(stream)
            end.synchronize()
            if i:  # the first copy of each direction is untimed
                times.append(start.elapsed_time(end) / 1e3)
        return nbytes / statistics.median(times)

    h2d, d2h = rate(dev, host), rate(host, dev)
    torch.cuda.current_stream(device).wait_stream(stream)
    return h2d, d2h, (f"cuda: {nbytes >> 20} MiB pinned host <-> device, non_blocking copies on a dedicated stream, "
                      "timed with CUDA events")


def measure(model, name: str, dtype: torch.dtype, device: torch.device) -> Profile:
    from .runtime.engine import Engine
    from .runtime.recompute import kv_from_inputs, recompute_flops_per_token

    cfg = model.config
    vocab = cfg.vocab_size

    def steps(batch: int) -> float:
        ids = torch.randint(10, vocab, (batch, 16), generator=torch.Generator().manual_seed(0))
        g = Engine(model, "dense").generate(ids, None, 6)
        return statistics.median(g.step_s)

    t1, t8 = steps(1), steps(8)
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    hkv = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    g = cfg.num_attention_heads // hkv
    C = 8192
    k = torch.randn(8, hkv, C, hd, dtype=dtype, device=device)
    v = torch.randn_like(k)
    q = torch.randn(8, hkv, g, hd, dtype=dtype, device=device)

    def attn():
        p = torch.softmax(torch.matmul(q, k.transpose(-1, -2)).float(), -1).to(dtype)
        return torch.matmul(p, v)

    read_bw = 2 * k.numel() * k.element_size() / _timeit(attn, device)
    # Moving token columns between tiers: gather half the columns, then copy across.
    host = torch.device("cpu")
    src = torch.randn(8, hkv, C, hd, dtype=dtype, device=host)
    if device.type == "cuda":
        src = src.pin_memory()
    cols = torch.randperm(C)[: C // 2].sort().values
    idx = cols.view(1, 1, -1, 1).expand(8, hkv, -1, hd).to(host)

    def move():
        return src.gather(2, idx).to(device, non_blocking=False)

    copy_bw = src.numel() // 2 * src.element_size() / _timeit(move, device)
    T = 1024
    x = torch.randn(1, T, cfg.hidden_size, dtype=dtype, device=device)
    pos = torch.arange(T, device=device)[None]
    rec_s = _timeit(lambda: kv_from_inputs(model, 0, x, pos), device)
    flops = recompute_flops_per_token(cfg) * T / rec_s
    hbm_bw = hbm_copy_bandwidth(device)
    h2d_bw, d2h_bw, pinned_what = pinned_bandwidth(device)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    dev_cap = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else ram
    return Profile(
        device=device.type, hardware=hardware(device.type), model=name, dtype=str(dtype).removeprefix("torch."),
        step_base_s=t1, step_per_seq_s=max(0.0, (t8 - t1) / 7), attn_read_bw=read_bw, copy_bw=copy_bw,
        recompute_flops=flops, device_capacity=int(dev_cap), host_capacity=int(ram),
        case="cuda: host tier across the real link; hbm_copy_bw is device memory to device memory" if device.type == "cuda"
        else "cpu: both tiers in RAM, moves are real copies; hbm_copy_bw is the RAM copy bandwidth (no device memory)",
        hbm_copy_bw=hbm_bw, h2d_pinned_bw=h2d_bw, d2h_pinned_bw=d2h_bw,
        extra={"step_s_batch1": t1, "step_s_batch8": t8, "recompute_s_per_1024_tokens_layer0": rec_s,
               "hbm_copy_bw": ("device memory to device memory" if device.type == "cuda" else "RAM to RAM (cpu: no device "
                               "memory)") + ", 256 MiB contiguous, bytes copied per second (the traffic is twice this)",
               "pinned_bw": pinned_what})


def profile_path(name: str, device: str, root: Path | None = None) -> Path:
    safe = name.replace("/", "_").replace(":", "_")
    return (root or REPO / "results" / "profiles") / f"{socket.gethostname()}-{device}-{safe}.json"


class ProfileError(ValueError):
    """A profile file that cannot be used (not JSON, fields missing or of the wrong type)."""


_NUMBERS = ("step_base_s", "step_per_seq_s", "attn_read_bw", "copy_bw", "recompute_flops", "device_capacity", "host_capacity")
_OPTIONAL = ("hbm_copy_bw", "h2d_pinned_bw", "d2h_pinned_bw")  # rates added later: may be absent or null


def read_profile(path: Path) -> Profile:
    """The profile in ``path``; ProfileError (one line naming the file) if it is not one."""
    path = Path(path)
    allowed = "allowed is a JSON file written by `python -m alisa.profile`"
    try:
        d = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else f"not JSON: {str(e).splitlines()[0]}"
        raise ProfileError(f"{str(path)!r} cannot be read ({why}): {allowed}") from None
    if not isinstance(d, dict):
        raise ProfileError(f"{str(path)!r} is not a profile (a JSON {type(d).__name__}): {allowed}")
    missing = [k for k in _NUMBERS + ("device", "model", "dtype") if k not in d]
    if missing:
        raise ProfileError(f"{str(path)!r} is not a profile (missing {', '.join(missing)}): {allowed}")
    for k in _NUMBERS + _OPTIONAL:
        v = d.get(k)
        if v is None and k in _OPTIONAL:  # measured since; absent from older profiles, or not measurable here
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0 or v == float("inf"):
            raise ProfileError(f"{str(path)!r} is not a profile ({k}={v!r} is not a number >= 0{' or null' if k in _OPTIONAL else ''}): {allowed}")
    try:
        return Profile.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ProfileError(f"{str(path)!r} is not a profile ({e}): {allowed}") from None


def load_profile(name: str, device: str, root: Path | None = None) -> Profile | None:
    p = profile_path(name, device, root)
    return read_profile(p) if p.exists() else None


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted; nothing was saved (rerun the same command)", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from .config import OneLineArgumentParser

    ap = OneLineArgumentParser(prog="python -m alisa.profile", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="smollm2-135m | random:<shape> | local folder")
    ap.add_argument("--dtype", default=None, help="float32 | float16 | bfloat16 (default: the model's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    ap.add_argument("--out", default=None, help="output JSON (default results/profiles/<host>-<device>-<model>.json)")
    a = ap.parse_args(argv)
    if a.device not in ("cpu", "cuda"):
        print(f"error: --device={a.device!r} is invalid: allowed are cpu, cuda", file=sys.stderr)
        return 2
    if a.device == "cuda" and not torch.cuda.is_available():
        print("error: --device='cuda' but no GPU is visible: allowed here is cpu", file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else profile_path(a.model, a.device)
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        if out.is_dir() or not probe.is_dir():
            raise IsADirectoryError(21, "a folder" if out.is_dir() else "not a folder")
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".write-probe-")  # creates nothing that stays
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        print(f"error: --out={str(out)!r} cannot be written ({e.strerror}: {str(probe)!r}): allowed is a writable "
              "file path", file=sys.stderr)
        return 2
    from .models import load_model

    try:
        model, _ = load_model(a.model, dtype=a.dtype, device=a.device)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        prof = measure(model, a.model, model.dtype, torch.device(a.device))
    except (RuntimeError, MemoryError) as e:  # out of memory and the like: nothing was saved
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(f"error: measuring --model={a.model!r} on {a.device} failed ({type(e).__name__}: {first}); nothing was "
              "saved", file=sys.stderr)
        return 1
    try:
        write_json(out, prof.to_dict())  # atomic: a failed write leaves no partial file
    except OSError as e:
        print(f"error: --out={str(out)!r} cannot be written ({e.strerror or e}): allowed is a writable file path",
              file=sys.stderr)
        return 1
    for k, v in prof.to_dict().items():
        if k != "hardware":
            print(f"{k:>16}: {v}")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
