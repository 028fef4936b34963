# Shared SLURM bits, sourced by run/*.sbatch: srun starts `bash run/<stage>_<size>.sh` once on each node, so each node
# runs one torchrun (run/_launch.sh) and the recipe's flags stay in the .sh file. The rendezvous is the first node.
# DRY_RUN=1 without SLURM: set SLURM_JOB_NUM_NODES and SLURM_JOB_NODELIST (a plain list: a,b,c,d) yourself; every
# node's command is then printed in turn (tests/test_run_scripts.py does this).
export NNODES=${SLURM_JOB_NUM_NODES:?not inside a SLURM job: submit with sbatch}
export NGPU=${SLURM_GPUS_ON_NODE:-8}
if command -v scontrol >/dev/null; then   # node[01-04] -> node01 node02 ... (not `| head -n1`: under pipefail
  mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")   # a SIGPIPE would end the job silently)
else  # no SLURM tools here (a dry run): only a plain comma-separated list can be read
  IFS=, read -ra HOSTS <<< "$SLURM_JOB_NODELIST"
fi
export MASTER_ADDR=${HOSTS[0]:?no first node in SLURM_JOB_NODELIST} MASTER_PORT=${MASTER_PORT:-29500}
PER_NODE='NODE_RANK=$SLURM_NODEID exec bash "$@"'   # run on each node by srun: SLURM_NODEID is 0..NNODES-1

slurm_run() {   # slurm_run run/sft_32b.sh [flags...]
  if [[ -n ${DRY_RUN:-} ]]; then
    for ((node = 0; node < NNODES; node++)); do SLURM_NODEID=$node bash -c "$PER_NODE" _ "$@"; done
  else  # srun no longer passes sbatch's CPU count to the step (SLURM >= 22.05): give the task the node's cores
    srun --nodes "$NNODES" --ntasks-per-node 1 --cpus-per-task "${SLURM_CPUS_ON_NODE:-1}" --kill-on-bad-exit=1 \
      bash -c "$PER_NODE" _ "$@"
  fi
}
