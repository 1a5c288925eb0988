"""alisa: KV-cache sparsity policies (ALISA's SWA and its baselines) for Hugging Face transformers 5.

>>> import alisa
>>> model, tok = alisa.load_model("smollm2-135m")
>>> with alisa.apply(model, alisa.make_policy("swa", sparsity=0.8)) as run:
...     out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=8)
>>> run.kept_fraction()["overall"]
"""

from .policies import REGISTRY as POLICIES, Policy, make_policy
from .integration import COVERED_FAMILIES, AlisaCache, apply
from .models import load_model

__all__ = ["POLICIES", "Policy", "make_policy", "apply", "AlisaCache", "COVERED_FAMILIES", "load_model"]
