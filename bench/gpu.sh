#!/usr/bin/env bash
# One command for a lent GPU: model latency vs the FLOP floor, PPO minibatch steps, ManiSkill GPU-sim
# throughput with the tiny policy in the loop. Each part has its own time limit; a failing part is one
# line in the log and the others still run. Results: OUT_DIR/gpu.{json,md}, OUT_DIR/gpu_envs.{json,md}.
#
#   bench/gpu.sh                    # on the GPU machine; writes bench/results/
#   bench/gpu.sh --dry-run /tmp/g   # on a CPU: tiny configs, a few steps; checks the plumbing (< 2 min)
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); shift; fi
OUT_DIR="${1:-$ROOT/bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
MODEL_LIMIT="${MODEL_LIMIT:-330}" ENVS_LIMIT="${ENVS_LIMIT:-200}"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
echo "== model latency and PPO steps (limit ${MODEL_LIMIT}s)"
timeout "$MODEL_LIMIT" "$PYTHON" "$ROOT/bench/gpu.py" "${DRY[@]}" --out "$OUT_DIR/gpu" || { echo "bench/gpu.py: exit $?"; status=1; }
echo "== ManiSkill GPU sim (limit ${ENVS_LIMIT}s)"
timeout "$ENVS_LIMIT" "$PYTHON" "$ROOT/bench/gpu_envs.py" "${DRY[@]}" --out "$OUT_DIR/gpu_envs" || { echo "bench/gpu_envs.py: exit $?"; status=1; }
exit $status
