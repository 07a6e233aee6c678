#!/usr/bin/env bash
# Launch a fusellm stage (or `run`: every stage) on several GPUs / nodes. Usage:
#   scripts/launch_train.sh RECIPE [STAGE] [key=value ...]          # one node, all GPUs (torchrun)
#   scripts/launch_train.sh RECIPE run                              # the whole recipe
#   LAUNCHER=accelerate scripts/launch_train.sh RECIPE train        # accelerate launch
#   LAUNCHER=deepspeed  scripts/launch_train.sh RECIPE train        # the deepspeed launcher
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=host0 scripts/launch_train.sh RECIPE train   # multi-node
# extract/align/fuse split their shards across the processes; train is data-parallel
# (DeepSpeed ZeRO if the recipe sets train.deepspeed); corpus, merge and evolve run on
# rank 0 while the others wait.
set -euo pipefail
RECIPE=${1:?recipe}; shift
STAGE=${1:-train}; [[ $# -gt 0 ]] && shift
NPROC=${NPROC:-$(python -c "import torch; print(max(torch.cuda.device_count(), 1))")}
NNODES=${NNODES:-1}; NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}; MASTER_PORT=${MASTER_PORT:-29500}
case "${LAUNCHER:-torchrun}" in
  torchrun)
    exec torchrun --nproc_per_node "$NPROC" --nnodes "$NNODES" --node_rank "$NODE_RANK" \
      --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" -m fusellm.cli "$STAGE" "$RECIPE" "$@" ;;
  accelerate)
    exec accelerate launch --num_processes $((NPROC * NNODES)) --num_machines "$NNODES" \
      --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" \
      -m fusellm.cli "$STAGE" "$RECIPE" "$@" ;;
  deepspeed)
    exec deepspeed --num_gpus "$NPROC" --num_nodes "$NNODES" --master_addr "$MASTER_ADDR" \
      --master_port "$MASTER_PORT" --no_local_rank --module fusellm.cli "$STAGE" "$RECIPE" "$@" ;;
  *) echo "unknown LAUNCHER=${LAUNCHER}" >&2; exit 2 ;;
esac
