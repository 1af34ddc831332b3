#!/usr/bin/env bash
# Serve a checkpoint to robots / simulators over openpi's websocket protocol (docs/serve.md).
#   launch/serve.sh runs/maniskill_pickcube_tiny/checkpoints/iter_000029 port=8000
#   PIRL_SERVE_API_KEY=secret launch/serve.sh CKPT host=0.0.0.0 inputs=libero
# Stops gracefully on SIGTERM / Ctrl-C (answers what is in flight). Health: curl http://HOST:PORT/healthz
set -euo pipefail
[ -n "${1:-}" ] || { echo "usage: $0 CHECKPOINT [overrides]" >&2; exit 2; }
ckpt=$1; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec pirl serve checkpoint="$ckpt" "$@"
