#!/usr/bin/env bash
# Installs everything pirl needs on a fresh machine, non-interactively; safe to run again.
# Each concern is one part, install/NN-*.sh, sourced in order with $ROOT, $PYTHON, $PIP set.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1
PYTHON="${PYTHON:-python3}"
PIP="$PYTHON -m pip"
# Every pip call honours the pins (torch==2.13.0 above all), also in build environments.
export PIP_CONSTRAINT="$ROOT/install/constraints.txt"
for part in "$ROOT"/install/[0-9][0-9]-*.sh; do
  echo "== install: $(basename "$part")"
  # shellcheck disable=SC1090
  source "$part"
done
echo "== install: done"
