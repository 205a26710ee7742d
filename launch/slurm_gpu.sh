#!/usr/bin/env bash
# Stage-1 training on SLURM GPU nodes: one process per node, all of a node's GPUs per process.
#
#   DATA_ROOT=/shared/nsd_prepared WORKDIR=/shared/runs/nsd sbatch --nodes=2 launch/slurm_gpu.sh
#
# jax.distributed.initialize() (the --multihost flag) reads the coordinator, process count and
# process id from SLURM's environment; where it cannot, pass --coordinator=HOST:PORT
# --num_processes=N --process_id=I instead (bash launch/local_multiprocess.sh rehearses the same job
# on one CPU machine). DATA_ROOT and WORKDIR must be on a filesystem all nodes share: each process
# reads its share of the records, orbax writes one checkpoint from all of them. Resubmitting the
# same job resumes from the newest checkpoint in WORKDIR, also with a different node count.
#SBATCH --job-name=nvl_jax_stage1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.out
set -euo pipefail

: "${DATA_ROOT:?prepared dataset folder on a shared filesystem}"
: "${WORKDIR:?run folder on a shared filesystem}"
CONFIG="${CONFIG:-configs/nsd.py}"
MESH_SHAPE="${MESH_SHAPE:-(-1,1,1)}"          # (data, fsdp, tensor)
EXTRA_FLAGS="${EXTRA_FLAGS:---config.model.compute_dtype=bfloat16}"
VENV="${VENV:-$HOME/venvs/nvl_jax}"           # a venv with `pip install -e . "jax[cuda12]"`

# Let XLA take most of each GPU; keep the NCCL and XLA logs quiet unless asked.
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"

# shellcheck disable=SC1091
source "${VENV}/bin/activate"
srun python -m nvl_jax.train --multihost --config="${CONFIG}" --workdir="${WORKDIR}" \
  --config.data.root="${DATA_ROOT}" "--config.mesh_shape=${MESH_SHAPE}" ${EXTRA_FLAGS}
