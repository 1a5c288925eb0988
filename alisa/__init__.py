"""alisa: KV-cache sparsity policies (ALISA's SWA and its baselines) for Hugging Face transformers 5.

>>> import alisa
>>> model, tok = alisa.load_model("smollm2-135m")
>>> with alisa.apply(model, alisa.make_policy("swa", sparsity=0.8)) as run:
...     out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=8)
>>> run.kept_fraction()["overall"]

Attributes load lazily, so light commands (``python -m alisa.data``, the lm-eval CLI
hook) do not import torch and transformers.
"""

import importlib

_EXPORTS = {
    "POLICIES": ("policies", "REGISTRY"),
    "Policy": ("policies", "Policy"),
    "make_policy": ("policies", "make_policy"),
    "apply": ("integration", "apply"),
    "AlisaCache": ("integration", "AlisaCache"),
    "COVERED_FAMILIES": ("integration", "COVERED_FAMILIES"),
    "load_model": ("models", "load_model"),
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name not in _EXPORTS:
        try:
            return importlib.import_module(f".{name}", __name__)  # a submodule, e.g. alisa.policies
        except ModuleNotFoundError:
            raise AttributeError(f"module 'alisa' has no attribute {name!r}") from None
    module, attr = _EXPORTS[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value
