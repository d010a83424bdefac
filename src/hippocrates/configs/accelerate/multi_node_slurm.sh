#!/bin/bash
# Multi-node training on SLURM: one `accelerate launch` per node, each forking one worker per GPU;
# node 0 of the allocation hosts the rendezvous. Submit from the repo root (the shared file system
# must give every node the same repo, .venv, data and output_dir):
#   sbatch configs/accelerate/multi_node_slurm.sh sft recipes/hippo-mistral-7b.yaml
#   ACCEL_CONFIG=configs/accelerate/deepspeed_zero3.yaml sbatch configs/accelerate/multi_node_slurm.sh cpt recipes/hippo-mistral-7b.yaml
# Arguments are a `hippo` subcommand and its arguments (default: the whole 7B pipeline).
#SBATCH --job-name=hippocrates
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node, not one task per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
set -eo pipefail

[ $# -gt 0 ] || set -- pipeline recipes/hippo-mistral-7b.yaml
source .venv/bin/activate

export ACCEL_CONFIG=${ACCEL_CONFIG:-configs/accelerate/fsdp_lora.yaml}
export GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
export NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))     # total workers over all nodes
export MAIN_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_PORT=${MAIN_PORT:-29500}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1   # a dead rank ends the job instead of hanging it
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}   # compute nodes rarely have internet: pre-download models

echo "nodes=$SLURM_NNODES gpus/node=$GPUS_PER_NODE main=$MAIN_IP:$MAIN_PORT config=$ACCEL_CONFIG: hippo $*"

# Single quotes: SLURM_NODEID is expanded by each task on its own node (0 .. nodes-1).
srun --kill-on-bad-exit=1 bash -c '
  accelerate launch \
    --config_file "$ACCEL_CONFIG" \
    --num_machines "$SLURM_NNODES" \
    --num_processes "$NUM_PROCESSES" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "$MAIN_IP" \
    --main_process_port "$MAIN_PORT" \
    -m hippocrates.cli "$@"
' bash "$@"
