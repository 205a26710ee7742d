#!/usr/bin/env bash
# Stage-1 training on a Cloud TPU pod slice: the same command on every worker, multi-host.
#
#   TPU_NAME=nvl-v4-32 ZONE=us-central2-b DATA_ROOT=/mnt/nsd_prepared WORKDIR=/mnt/runs/nsd \
#     bash launch/tpu_pod.sh
#
# Every worker must see DATA_ROOT and WORKDIR at the same path (a Filestore/NFS mount or a gcsfuse
# bucket): each host reads only its share of the trials, and orbax writes one checkpoint from all
# hosts. --multihost: jax.distributed.initialize() finds the coordinator and the worker ids from
# the TPU metadata (bash launch/local_multiprocess.sh rehearses the same job on one CPU machine).
# Rerunning the same command resumes from the newest checkpoint in WORKDIR, on any slice size.
set -euo pipefail

: "${TPU_NAME:?name of the TPU VM pod slice}"
: "${ZONE:?its zone, e.g. us-central2-b}"
: "${DATA_ROOT:?prepared dataset folder, the same path on every worker}"
: "${WORKDIR:?run folder for checkpoints, metrics and eval.json, shared by all workers}"
PROJECT="${PROJECT:-$(gcloud config get-value project)}"
CONFIG="${CONFIG:-configs/nsd.py}"
REPO_DIR="${REPO_DIR:-~/nvl_jax}"             # where the repository is checked out on the workers
MESH_SHAPE="${MESH_SHAPE:-(-1,1,1)}"          # (data, fsdp, tensor)
EXTRA_FLAGS="${EXTRA_FLAGS:-}"                # e.g. --config.model.compute_dtype=bfloat16

remote="cd ${REPO_DIR} && pip install -q -e . 'jax[tpu]' && \
python -m nvl_jax.train --multihost --config=${CONFIG} --workdir=${WORKDIR} \
  --config.data.root=${DATA_ROOT} '--config.mesh_shape=${MESH_SHAPE}' ${EXTRA_FLAGS}"

gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --project="${PROJECT}" --zone="${ZONE}" --worker=all \
  --command="${remote}"
