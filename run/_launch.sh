# Shared launcher bits, sourced by run/<stage>_<size>.sh: NGPU, NNODES and the rendezvous come from the environment.
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 bash run/grpo_32b.sh     # multi-node (32B GRPO uses 4 nodes upstream)
#   sbatch run/grpo_32b.sbatch                                      # the same under SLURM (run/_slurm.sh sets these)
#   SIMULATE=1 NNODES=4 bash run/grpo_32b.sh                        # will it fit? the run's step on 32 fake ranks
NGPU=${NGPU:-8}
NNODES=${NNODES:-1}
if [[ -n ${SIMULATE:-} ]]; then  # SIMULATE=1: one plain process runs the step at full shape on NGPU x NNODES fake ranks
  LAUNCH=("${PYTHON:-python}")   # (common/simulate.py: per-rank memory by phase, verdict, memory_plan.json; no GPU)
  set -- "$@" --simulate_world $((NGPU * NNODES))
elif [[ $NNODES == 1 ]]; then
  LAUNCH=(torchrun --standalone --nproc_per_node "$NGPU")
else  # c10d: MASTER_ADDR's node hosts the rendezvous; torchrun ignores --node_rank here and orders nodes by hostname
  LAUNCH=(torchrun --nnodes "$NNODES" --node_rank "${NODE_RANK:?set NODE_RANK}" --nproc_per_node "$NGPU"
          --rdzv_backend c10d --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}")
fi
if [[ -n ${DRY_RUN:-} ]]; then   # DRY_RUN=1: print the command instead of running it (tests check every flag)
  LAUNCH=(echo "${LAUNCH[@]}")
fi
