# Distributed training stack: Ray (workers, placement), DeepSpeed (learners), logging and video deps.
# Sourced by ../install.sh under `set -euo pipefail` with $ROOT, $PYTHON and $PIP set and
# PIP_CONSTRAINT=install/constraints.txt (ray==2.60.0, deepspeed==0.19.8, torch==2.13.0).
# Non-interactive and safe to run again: pip skips what is satisfied, the warm-up skips a cached build.

# DeepSpeed JIT-compiles C++ at first use: it needs a compiler (present on the usual images).
if ! command -v g++ >/dev/null 2>&1; then
  echo "== 30-distributed: installing g++ (needed by DeepSpeed's JIT extensions)"
  apt-get update -qq
  apt-get install -y -qq g++
fi

# Ray, and DeepSpeed's run-time dependencies, before DeepSpeed itself: the DeepSpeed build below
# runs without build isolation, so what its setup.py imports must already be installed.
$PIP install ray==2.60.0 hjson msgpack ninja psutil py-cpuinfo pydantic packaging wheel

# DeepSpeed from source, no prebuilt ops (DS_BUILD_OPS=0): ops are JIT-built on first use.
# --no-build-isolation so its setup.py sees the pinned CPU torch instead of fetching another one.
DS_BUILD_OPS=0 $PIP install --no-build-isolation deepspeed==0.19.8

$PIP install accelerate wandb websockets matplotlib imageio imageio-ffmpeg

# Ray imports pyarrow whenever it is installed (other parts pull it in); pyarrow 26 refuses numpy<2.
# The constraints file pins pyarrow<26: bring an already-installed newer one back in line.
if $PYTHON -m pip show pyarrow >/dev/null 2>&1; then
  $PIP install "pyarrow<26"
fi

# Warm DeepSpeed's JIT shared-memory comm extension once (50-110 s on 2 cores) so that no test pays
# for it. It lands in $TORCH_EXTENSIONS_DIR or ~/.cache/torch_extensions; skipped when already built.
OMP_NUM_THREADS=1 $PYTHON - <<'PY'
import glob
import os
import time

from deepspeed.accelerator import get_accelerator

try:  # private torch helper; without it, load() below is still a no-op rebuild check when cached
    from torch.utils.cpp_extension import _get_build_directory
except ImportError:
    _get_build_directory = lambda name, verbose: ""  # noqa: E731

builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
if builder is None:
    print("== 30-distributed: this accelerator has no shared-memory comm op; nothing to warm")
else:
    name = builder.absolute_name() if hasattr(builder, "absolute_name") else builder.name
    build_dir = _get_build_directory(builder.name, verbose=False)
    if build_dir and glob.glob(os.path.join(build_dir, "*.so")):
        print(f"== 30-distributed: DeepSpeed comm extension already built in {build_dir}")
    else:
        t0 = time.time()
        builder.load(verbose=False)
        print(f"== 30-distributed: built DeepSpeed comm extension {name} in {time.time() - t0:.0f} s")
PY
