#!/usr/bin/env bash
# The recipe's SFT runs for Qwen2.5-VL-32B (RECIPE §5): full-parameter, assistant-only loss, global batch 16,
# lr 1e-5 cosine + 5 % warmup, AdamW (0.9, 0.95), wd 1e-4, bf16, 5 epochs with a save each (released: epoch_3).
#   bash run/sft_32b.sh                 # SFT(m23k): text traces
#   DATA=image bash run/sft_32b.sh      # SFT(PMC): GPT-4o CoT on PMC-VQA
#   sbatch run/sft_32b.sbatch           # either, on upstream's 2 nodes x 8 GPUs, under SLURM
# CPU offload (params, grads, AdamW in host memory) is on: at the worst case, 32768-token samples on 16 ranks need
# 94 GiB per rank without it and 65 GiB with it (SIMULATE=1 NNODES=2 bash run/sft_32b.sh; README "Will it fit").
# Extra flags are forwarded: bash run/sft_32b.sh --max_steps 10
set -euo pipefail
cd "$(dirname "$0")/.."
source run/_launch.sh
DATA=${DATA:-text}
"${LAUNCH[@]}" sft.py --model 32b --data "$DATA" \
  --lr 1e-5 --schedule cosine --warmup_ratio 0.05 --beta1 0.9 --beta2 0.95 --weight_decay 1e-4 --grad_clip 1.0 \
  --global_batch 16 --micro_batch 1 --loss_agg seq-mean-token-mean --epochs 5 --max_length 32768 --dtype bf16 \
  --activation_checkpointing true --cpu_offload true --out "outputs/sft/32b-$DATA" "$@"
