#!/usr/bin/env bash
# One machine, all GPUs: starts a local Ray cluster inside `pirl train` (cluster.ray_address=null).
#   launch/single_node.sh experiment=libero_spatial_pi0 run.init_checkpoint=checkpoints/pi0_libero
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
exec pirl train cluster=gpu_collocated "$@"
