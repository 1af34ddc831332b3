#!/usr/bin/env bash
# One command for a lent GPU: model latency vs the FLOP floor (eager and CUDA graphs), PPO minibatch steps,
# the policy server's throughput and latency, ManiSkill GPU-sim throughput with the tiny policy in the
# loop. Each part has its own time limit; a failing part is one line in the log and the others still
# run. Results: OUT_DIR/gpu.{json,md}, OUT_DIR/serve_gpu{,_eager}.{json,md}, OUT_DIR/gpu_envs.{json,md}.
#
#   bench/gpu.sh                    # on the GPU machine; writes bench/results/
#   bench/gpu.sh --dry-run /tmp/g   # on a CPU: tiny configs, a few steps; checks the plumbing (< 2 min)
#
# Through a development session's device tool (one call, ~9 min; that machine lacks websockets, hydra-core,
# omegaconf and antlr4-python3-runtime, which `pirl serve` needs: carry their cp312 wheels in .whl/):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site; bash bench/gpu.sh /tmp/r > $OUT/gpu_sh.log 2>&1; tar czf $OUT/r.tgz -C /tmp r
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=()
if [[ "${1:-}" == "--dry-run" ]]; then DRY=(--dry-run); shift; fi
OUT_DIR="${1:-$ROOT/bench/results}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTHON="${PYTHON:-python3}"
MODEL_LIMIT="${MODEL_LIMIT:-270}" SERVE_LIMIT="${SERVE_LIMIT:-150}" ENVS_LIMIT="${ENVS_LIMIT:-60}"

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
status=0
if [[ ${#DRY[@]} -eq 0 ]]; then
  echo "== GPU tests: CUDA graph capture and replay (limit 60s)"
  (cd "$ROOT" && timeout 60 "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_graphs.py) || { echo "GPU tests: exit $?"; status=1; }
fi
echo "== model latency and PPO steps (limit ${MODEL_LIMIT}s)"
timeout "$MODEL_LIMIT" "$PYTHON" "$ROOT/bench/gpu.py" "${DRY[@]}" --out "$OUT_DIR/gpu" || { echo "bench/gpu.py: exit $?"; status=1; }
echo "== policy server, CUDA graphs on and off (limit ${SERVE_LIMIT}s)"
if [[ ${#DRY[@]} -gt 0 ]]; then SERVE=(--device cpu --duration 1 --warmup 0.5) CLIENTS="1 2" EAGER_CLIENTS="1 2"
else SERVE=(--device cuda --duration 5 --warmup 2) CLIENTS="1 16 64" EAGER_CLIENTS="1 16"; fi
timeout "$SERVE_LIMIT" bash -c '"$0" "$1/bench/serve.py" "${@:5}" --clients $3 --out "$2/serve_gpu" &&
  "$0" "$1/bench/serve.py" "${@:5}" --clients $4 --server-args cuda_graphs=false --out "$2/serve_gpu_eager"' \
  "$PYTHON" "$ROOT" "$OUT_DIR" "$CLIENTS" "$EAGER_CLIENTS" "${SERVE[@]}" || { echo "bench/serve.py: exit $?"; status=1; }
echo "== ManiSkill GPU sim (limit ${ENVS_LIMIT}s)"
timeout "$ENVS_LIMIT" "$PYTHON" "$ROOT/bench/gpu_envs.py" "${DRY[@]}" --out "$OUT_DIR/gpu_envs" || { echo "bench/gpu_envs.py: exit $?"; status=1; }
exit $status
