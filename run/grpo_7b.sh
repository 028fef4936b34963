#!/usr/bin/env bash
# The recipe's GRPO runs for Qwen2.5-VL-7B on 1 node x 8 GPUs (RECIPE §6), every setting spelled out.
#   bash run/grpo_7b.sh                 # RL(m23k): 256 prompts x 8, 5 epochs -> step 320 (released)
#   RUN=pmc bash run/grpo_7b.sh         # RL(PMC): 1 epoch -> step 451
#   RUN=sft_rl bash run/grpo_7b.sh      # SFT(m23k, epoch 3) + RL(PMC): 64 prompts/step, -> step 1805 (the script upstream points at epoch 5; the released run says epoch 3)
#   RUN=rl_rl bash run/grpo_7b.sh       # RL(m23k) + RL(PMC): 64 prompts/step -> step 1805
set -euo pipefail
cd "$(dirname "$0")/.."
source run/_launch.sh
SIZE=7b
RUN=${RUN:-m23k}
case $RUN in
  m23k)   ARGS=(--model $SIZE --data text --epochs 5 --train_batch 256 --mini_batch 128 --micro_batch 8) ;;
  pmc)    ARGS=(--model $SIZE --data image --epochs 1 --train_batch 256 --mini_batch 128 --micro_batch 8) ;;
  sft_rl) ARGS=(--model outputs/sft/$SIZE-text/epoch_3 --ref_model outputs/sft/$SIZE-text/epoch_3 --data image
                --epochs 1 --train_batch 64 --mini_batch 32 --micro_batch 4) ;;
  rl_rl)  ARGS=(--model outputs/grpo/$SIZE-m23k/final --ref_model outputs/grpo/$SIZE-m23k/final --data image
                --epochs 1 --train_batch 64 --mini_batch 32 --micro_batch 8) ;;
  *) echo "RUN must be m23k | pmc | sft_rl | rl_rl" >&2; exit 2 ;;
esac
"${LAUNCH[@]}" grpo.py "${ARGS[@]}" \
  --engine vllm --tp 2 --gpu_memory_utilization 0.6 --group_size 8 --temperature 1.0 --top_p 1.0 \
  --max_new_tokens 4096 --max_prompt_length 2048 \
  --lr 1e-6 --weight_decay 0.01 --beta1 0.9 --beta2 0.999 --grad_clip 1.0 \
  --clip_low 0.2 --clip_high 0.2 --clip_c 3.0 --kl_coef 0.01 --kl_type k3 --entropy_coef 0 --loss_agg token-mean \
  --importance_sampling_level token --rollout_correction none --max_rollout_mismatch 0.5 --dynamic_sampling false \
  --activation_checkpointing true --ref_offload true --dtype bf16 --shuffle true --data_seed 1 \
  --val_data data/eval --val_limit 400 --val_every 50 --save_every 50 \
  --out "outputs/grpo/$SIZE-$RUN" "$@"
