#!/usr/bin/env bash
# The recipe's RL(m23k) for Qwen2.5-VL-32B: 4 nodes x 8 GPUs, 128 prompts x 8 per step, 5 epochs -> step 645.
#   NNODES=4 NODE_RANK=$i MASTER_ADDR=node0 bash run/grpo_32b.sh     # on each of the 4 nodes
#   sbatch run/grpo_32b.sbatch                                      # the same under SLURM
set -euo pipefail
cd "$(dirname "$0")/.."
NNODES=${NNODES:-4}
source run/_launch.sh
"${LAUNCH[@]}" grpo.py --model 32b --data text --epochs 5 --train_batch 128 --mini_batch 64 --micro_batch 8 \
  --engine vllm --tp 4 --gpu_memory_utilization 0.6 --group_size 8 --temperature 1.0 --top_p 1.0 \
  --max_new_tokens 4096 --max_prompt_length 2048 \
  --lr 1e-6 --weight_decay 0.01 --beta1 0.9 --beta2 0.999 --grad_clip 1.0 \
  --clip_low 0.2 --clip_high 0.2 --clip_c 3.0 --kl_coef 0.01 --kl_type k3 --entropy_coef 0 --loss_agg token-mean \
  --importance_sampling_level token --rollout_correction none --max_rollout_mismatch 0.5 --dynamic_sampling false \
  --activation_checkpointing true --ref_offload true --dtype bf16 --shuffle true --data_seed 1 \
  --val_data data/eval --val_limit 400 --val_every 50 --val_before_train false --save_every 50 --keep_checkpoints 2 \
  --out outputs/grpo/32b-m23k "$@"
