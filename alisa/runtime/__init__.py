"""The ALISA runtime: tiered KV engine, scheduling, cost model.

>>> from alisa.runtime import Engine, Plan
>>> g = Engine(model, "swa", sparsity=0.8, plan=Plan(alpha=0.5, p1=8)).generate(input_ids, None, 32)
"""

from .engine import BudgetExceeded, Engine, Generation, dense_prefill
from .tiered import Plan

__all__ = ["BudgetExceeded", "Engine", "Generation", "Plan", "dense_prefill"]
