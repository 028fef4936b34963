#!/usr/bin/env bash
# The GPU check for a lent machine (one GPU, no network; torch 2.11 / transformers 5.17 there, PITFALLS §I).
#   bash bench/gpu_check.sh --prepare    # HERE: download the pinned pure-Python/cp312 wheels it lacks into .whl/gpu
#   bash bench/gpu_check.sh              # THERE (one call, <= 10 min): install them into .whl/site, pytest -m gpu,
#                                        # the MFU bench; carry .whl/gpu with the call (run tool: carry [".whl/gpu"])
# The wheels: fire + termcolor (our CLI), datasets and the deps the machine lacks (dill, multiprocess, xxhash,
# fsspec's http extra: aiohttp and its small deps), versions = this repo's .venv. qwen-vl-utils is not needed by
# the GPU tests (it pulls PyAV, ~40 MB). Total < 60 MiB (checked below).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl/gpu
PINS=(fire==0.7.1 termcolor==3.3.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0
      aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 frozenlist==1.8.0 multidict==7.2.1 propcache==0.5.4
      yarl==1.25.1)
PY=${PYTHON:-python}

if [[ ${1:-} == --prepare ]]; then
  PIP=${PIP:-.venv/bin/pip}
  mkdir -p "$WHEELS"
  "$PIP" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --platform any -d "$WHEELS" "${PINS[@]}"
  size=$(du -sm "$WHEELS" | cut -f1)
  echo "gpu_check --prepare: $(ls "$WHEELS" | wc -l) wheels, ${size} MiB in $WHEELS"
  (( size < 60 )) || { echo "over 60 MiB" >&2; exit 1; }
  exit 0
fi

# Run mode: install next to (not over) the machine's torch/transformers, then the checks.
SITE=.whl/site
rm -rf "$SITE"
"$PY" -m pip install --quiet --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl
export PYTHONPATH="$PWD/$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" -c "import torch, transformers, fire, datasets; print('torch', torch.__version__, '| transformers',
transformers.__version__, '| cuda', torch.cuda.is_available())"
[[ ${GPU_CHECK_IMPORTS_ONLY:-} ]] && exit 0
timeout 420 "$PY" -m pytest -q -m gpu tests/test_gpu.py -s -p no:cacheprovider
timeout 150 "$PY" bench/gpu_mfu.py --tokens 8192 --samples 8 --steps 6
