#!/usr/bin/env bash
# Evaluate a checkpoint on fixed seeds (ODE sampling); results.json / results.md (+ videos) beside it.
#   launch/eval.sh runs/maniskill_pickcube_tiny/checkpoints/iter_000029 episodes=100 videos=2
set -euo pipefail
[ -n "${1:-}" ] || { echo "usage: $0 CHECKPOINT [overrides]" >&2; exit 2; }
ckpt=$1; shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec pirl eval checkpoint="$ckpt" "$@"
