#!/usr/bin/env bash
# A multi-node Ray cluster by hand.
#   on the head node:     launch/ray_cluster.sh head
#   on each worker node:  launch/ray_cluster.sh worker HEAD_IP
#   then, on the head:    pirl train experiment=... cluster=gpu_disaggregated cluster.ray_address=auto
# Placement groups spread learners and rollout workers over the nodes (cluster.mode).
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
PORT=${RAY_PORT:-6379}
case "${1:-}" in
  head)   ray start --head --port="$PORT" --disable-usage-stats ;;
  worker) [ -n "${2:-}" ] || { echo "usage: $0 worker HEAD_IP" >&2; exit 2; }
          ray start --address="$2:$PORT" --disable-usage-stats ;;
  stop)   ray stop ;;
  *) echo "usage: $0 head | worker HEAD_IP | stop" >&2; exit 2 ;;
esac
