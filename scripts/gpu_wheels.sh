#!/usr/bin/env bash
# The wheels a lent GPU machine lacks, into .whl/ (in .gitignore) for the device tool to carry.
# That machine has Python 3.12, torch, numba and transformers 5.17 with huggingface_hub 1.33 and
# tokenizers 0.23; alisa needs transformers >= 5.24 (5.25 wants huggingface_hub >= 2.4: take 5.24),
# hydra-core and omegaconf; antlr4-python3-runtime 4.9.3 (omegaconf's pin) is an sdist only, so its
# wheel is built here. About 14 MB. Checked here in a venv holding only the device's packages:
# `scripts/bench_gpu.py --dry` runs with them. Then, on the device (carry: [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
#     && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 scripts/bench_gpu.py --out $OUT/bench_gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 hydra-core==1.3.2 omegaconf==2.3.0
python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -la .whl
