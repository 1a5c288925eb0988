import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
from transformers.utils import logging as hf_logging

from alisa.testing import FAMILIES, padded_batch, tiny_model  # noqa: F401  (shared with python -m alisa.check_policy)

hf_logging.set_verbosity_error()


_MODELS = {}


@pytest.fixture(params=sorted(FAMILIES))
def family_model(request):
    if request.param not in _MODELS:
        _MODELS[request.param] = tiny_model(request.param)
    return _MODELS[request.param]


@pytest.fixture(scope="session")
def smollm2():
    import alisa

    return alisa.load_model("smollm2-135m")


@pytest.fixture(scope="session")
def data_root():
    """The prepared offline task data: $ALISA_DATA_DIR if prepared, else ~/.cache/alisa/data (prepared once here)."""
    from pathlib import Path

    from alisa import data as D

    env = os.environ.get("ALISA_DATA_DIR")
    if env and D.is_prepared(env):
        return Path(env)
    root = Path.home() / ".cache" / "alisa" / "data"
    if not D.is_prepared(root):
        D.prepare(root)
    return root
