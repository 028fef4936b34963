#!/usr/bin/env bash
# The recipe's evaluation (RECIPE §7): greedy, 4096 new tokens, 3 runs, six benchmarks, vLLM data parallel.
#   bash run/eval.sh 7b                                   # a preset, hub id or folder (our exports included)
#   TP=4 NGPU=8 bash run/eval.sh 32b                      # 32B: dp 2 x tp 4, as upstream
set -euo pipefail
cd "$(dirname "$0")/.."
source run/_launch.sh
MODEL=${1:?usage: run/eval.sh MODEL [flags]}
shift
"${LAUNCH[@]}" evaluate.py --model "$MODEL" --data "${EVAL_DATA:-data/eval}" --engine vllm --tp "${TP:-1}" \
  --runs 3 --temperature 0 --max_new_tokens 4096 "$@"
