"""The ALISA runtime: tiered KV engine, scheduling, cost model.

>>> from alisa.runtime import Engine, Plan
>>> g = Engine(model, "swa", sparsity=0.8, plan=Plan(alpha=0.5, p1=8)).generate(input_ids, None, 32)

Attributes load lazily: importing a light submodule (``alisa.runtime.costmodel``, to check a
profile file) does not import the engine and with it transformers' model stack.
"""

import importlib

_EXPORTS = {"BudgetExceeded": "engine", "Engine": "engine", "Generation": "engine", "dense_prefill": "engine",
            "Plan": "tiered"}
__all__ = list(_EXPORTS)
SYSTEMS = ("stock", "hf_static", "hf_offloaded", "flexgen", "engine")  # what a throughput point times (.throughput)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'alisa.runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
