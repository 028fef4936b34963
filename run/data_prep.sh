#!/usr/bin/env bash
# Build the recipe's data (RECIPE §1-2) into data/. GPU machines; pass counts use vLLM across all local GPUs.
#   bash run/data_prep.sh                 # everything
#   STAGE=eval bash run/data_prep.sh      # one stage: eval | text | image | sft
# Pass counts come from the 3B base model for every model size (as upstream), 16 samples at T=1, kept if 1..7.
# They are an evaluation: evaluate.py samples and grades, data_prep.py filter counts (inference grader, RECIPE §2.1).
set -euo pipefail
cd "$(dirname "$0")/.."
NGPU=${NGPU:-8}
STAGE=${STAGE:-all}
PASS_MODEL=${PASS_MODEL:-3b}
run() { echo "+ $*"; [[ -n ${DRY_RUN:-} ]] || "$@"; }   # DRY_RUN=1 only prints the commands

if [[ $STAGE == all || $STAGE == eval ]]; then
  run python data_prep.py eval --out data/eval                                # UCSC-VLAA/MedVLThinker-Eval, 8,220 rows
fi
if [[ $STAGE == all || $STAGE == text ]]; then
  run python data_prep.py text --source UCSC-VLAA/MedVLThinker-m23k-tokenized --tokenizer "$PASS_MODEL" --out data/m23k
  run torchrun --standalone --nproc_per_node "$NGPU" evaluate.py --data data/m23k --model "$PASS_MODEL" --engine vllm \
      --runs 1 --samples 16 --temperature 1.0 --max_new_tokens 4096 --batch_size 512 --report_page false \
      --out data/passrate_m23k_3b
  run python data_prep.py filter --data data/m23k --passrate data/passrate_m23k_3b --min_pass 1 --max_pass 7 \
      --order easy_to_hard --out data/m23k_3b_e2h                             # ~16.5k rows
fi
if [[ $STAGE == all || $STAGE == image ]]; then
  run python data_prep.py pmc_vqa --source UCSC-VLAA/MedVLThinker-pmc_vqa --tokenizer "$PASS_MODEL" --out data/pmc_vqa
  run torchrun --standalone --nproc_per_node "$NGPU" evaluate.py --data data/pmc_vqa --model "$PASS_MODEL" --engine vllm \
      --runs 1 --samples 16 --temperature 1.0 --max_new_tokens 4096 --batch_size 512 --report_page false \
      --out data/passrate_pmc_vqa_3b
  run python data_prep.py filter --data data/pmc_vqa --passrate data/passrate_pmc_vqa_3b --min_pass 1 --max_pass 7 \
      --order easy_to_hard --out data/pmc_vqa_3b_e2h                          # ~115.5k rows
fi
if [[ $STAGE == all || $STAGE == sft ]]; then
  # SFT(PMC) traces: the released GPT-4o CoT set (rows with a trace only)
  run python data_prep.py sft --data UCSC-VLAA/MedVLThinker-pmc_vqa-gpt_4o_reasoning-tokenized --out data/pmc_vqa_sft
  run python data_prep.py decontaminate --train data/m23k --eval_data data/eval   # report only
fi
