"""LIBERO adapter (robosuite 1.4 on MuJoCo) in worker processes, openpi's evaluation conventions.

- Suites libero_spatial / object / goal / 10 / 90; env i runs task `task_ids[i % len(task_ids)]`.
- An episode starts from one of the task's shipped init states: number (episode seed) % 50, or the
  config's fixed init_state_id; then `num_noop_steps` steps of a do-nothing action (gripper open)
  let the objects settle (not counted in the episode, not seen by the policy).
- Images: agentview and wrist camera, flipped on both axes (LIBERO renders them upside down).
- State (8): eef position (3), eef orientation as axis-angle (3), gripper joint positions (2).
- Action (7): delta eef pose (6) + gripper (-1 open, +1 close), all in [-1, 1].
- Reward 1.0 at the first success step, else 0; success from the task's BDDL goal predicates.
- Episode limit per suite (openpi): 220 / 280 / 300 / 520 / 400 steps.
- Rendering: MUJOCO_GL=egl or osmesa, chosen by config.render_backend, set before MuJoCo loads.
"""
from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .base import EnvSpec, PoolBackend, VLAEnv
from .config import LiberoConfig
from .workers import SubprocEnvPool

NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)
STATE_NAMES = ("eef_pos_x", "eef_pos_y", "eef_pos_z", "eef_axangle_x", "eef_axangle_y", "eef_axangle_z",
               "gripper_qpos_0", "gripper_qpos_1")


def quat_to_axis_angle(quat_xyzw: np.ndarray) -> np.ndarray:
    """robosuite quaternion (x, y, z, w) -> axis * angle, as openpi's LIBERO example computes it."""
    quat = np.asarray(quat_xyzw, dtype=np.float64).copy()
    quat[3] = min(max(quat[3], -1.0), 1.0)
    den = math.sqrt(max(1.0 - quat[3] * quat[3], 0.0))
    if math.isclose(den, 0.0):
        return np.zeros(3, dtype=np.float32)
    return (quat[:3] * 2.0 * math.acos(quat[3]) / den).astype(np.float32)


def set_render_backend(backend: str) -> None:
    """Must run before mujoco/robosuite are imported in this process."""
    os.environ["MUJOCO_GL"] = backend
    os.environ["PYOPENGL_PLATFORM"] = backend


class LiberoNotInstalledError(RuntimeError):
    """LIBERO's config.yaml is missing (importing libero would then ask a question on stdin)."""


def check_libero_config() -> None:
    config_dir = os.environ.get("LIBERO_CONFIG_PATH", os.path.expanduser("~/.libero"))
    if not os.path.exists(os.path.join(config_dir, "config.yaml")):
        raise LiberoNotInstalledError(
            f"{config_dir}/config.yaml is missing: importing libero would prompt on stdin. Run "
            "install.sh (install/20-simulators.sh writes it) or set LIBERO_CONFIG_PATH.")


def suite_tasks(suite: str) -> list[tuple[str, str]]:
    """(task name, language instruction) of every task of a suite, in LIBERO's order."""
    check_libero_config()
    from libero.libero import benchmark

    bench = benchmark.get_benchmark_dict()[suite]()
    return [(bench.get_task(i).name, bench.get_task(i).language) for i in range(bench.n_tasks)]


class LiberoSingleEnv:
    """One LIBERO task in a worker process; unbatched numpy in and out."""

    def __init__(self, cfg: LiberoConfig, task_id: int):
        set_render_backend(cfg.render_backend)
        check_libero_config()
        from libero.libero import benchmark, get_libero_path
        from libero.libero.envs import OffScreenRenderEnv

        self.cfg = cfg
        bench = benchmark.get_benchmark_dict()[cfg.suite]()
        if not 0 <= task_id < bench.n_tasks:
            raise ValueError(f"{cfg.suite} has tasks 0..{bench.n_tasks - 1}, not {task_id}")
        self.task = bench.get_task(task_id)
        self.prompt = self.task.language
        self.init_states = np.asarray(bench.get_task_init_states(task_id))
        bddl = os.path.join(get_libero_path("bddl_files"), self.task.problem_folder, self.task.bddl_file)
        height, width = cfg.image_size
        camera_kwargs = dict(camera_heights=height, camera_widths=width)
        if not cfg.cameras:  # state only: robosuite renders nothing per step
            camera_kwargs.update(use_camera_obs=False)
        self.env = OffScreenRenderEnv(bddl_file_name=bddl, **camera_kwargs)
        self.limit = cfg.episode_limit
        self.steps = 0
        self.succeeded = False

    def spec(self) -> EnvSpec:
        height, width = self.cfg.image_size
        return EnvSpec(cameras={cam: (height, width) for cam in self.cfg.cameras}, state_dim=8,
                       state_names=STATE_NAMES, action_dim=7, max_episode_steps=self.limit,
                       control_mode="osc_pose_delta")

    def _obs(self, raw: dict) -> dict[str, Any]:
        images = {}
        for cam in self.cfg.cameras:
            img = raw[cam]  # robosuite's "<camera>_image" observation
            if self.cfg.flip_images:
                img = img[::-1, ::-1]
            images[cam] = np.ascontiguousarray(img, dtype=np.uint8)
        state = np.concatenate([raw["robot0_eef_pos"], quat_to_axis_angle(raw["robot0_eef_quat"]),
                                raw["robot0_gripper_qpos"]]).astype(np.float32)
        return {"images": images, "state": state, "prompt": self.prompt}

    def init_state_index(self, seed: int) -> int:
        if self.cfg.init_state_id is not None:
            return self.cfg.init_state_id % len(self.init_states)
        return int(seed) % len(self.init_states)

    def reset(self, seed: int, hard: bool = False):
        # LIBERO rebuilds the MuJoCo model on every reset (hard_reset=True), so `hard` changes nothing.
        self.env.seed(int(seed))
        self.env.reset()
        raw = self.env.set_init_state(self.init_states[self.init_state_index(seed)])
        for _ in range(self.cfg.num_noop_steps):
            raw, _, _, _ = self.env.step(NOOP_ACTION)
        self.steps = 0
        self.succeeded = False
        return self._obs(raw), {"success": bool(self.env.check_success()),
                                "init_state": self.init_state_index(seed)}

    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (7,):
            raise ValueError(f"LIBERO action shape {action.shape} != (7,)")
        raw, _, _, _ = self.env.step(action)
        self.steps += 1
        success = bool(self.env.check_success())
        reward = 1.0 if success and not self.succeeded else 0.0
        self.succeeded |= success
        terminated = success and self.cfg.terminate_on_success
        truncated = self.steps >= self.limit and not terminated
        return self._obs(raw), reward, terminated, truncated, {"success": success}

    def get_state(self) -> np.ndarray:
        return np.asarray(self.env.get_sim_state())

    def place_on(self, obj: str, support: str, height: float = 0.03) -> None:
        """Teleport free object `obj` (e.g. "akita_black_bowl_1") above body `support` ("plate_1"),
        at rest. For scripted resets and for checking success detection without a policy."""
        sim = self.env.sim
        target = np.array(sim.data.body_xpos[sim.model.body_name2id(f"{support}_main")])
        start, _ = sim.model.get_joint_qpos_addr(f"{obj}_joint0")
        vel_start, vel_end = sim.model.get_joint_qvel_addr(f"{obj}_joint0")
        sim.data.qpos[start:start + 3] = target + np.array([0.0, 0.0, height])
        sim.data.qvel[vel_start:vel_end] = 0.0
        sim.forward()

    def close(self) -> None:
        self.env.close()


class _LiberoFactory:
    def __init__(self, cfg: LiberoConfig, task_id: int):
        self.cfg, self.task_id = cfg, task_id

    def __call__(self) -> LiberoSingleEnv:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        return LiberoSingleEnv(self.cfg, self.task_id)


def env_task_ids(cfg: LiberoConfig, num_tasks: int | None = None) -> list[int]:
    ids = list(cfg.task_ids) if cfg.task_ids else list(range(num_tasks or 0))
    if not ids:
        raise ValueError("no LIBERO task selected")
    return [ids[i % len(ids)] for i in range(cfg.num_envs)]


def make_libero_env(cfg: LiberoConfig | dict) -> VLAEnv:
    """Build the batched LIBERO env (worker processes of `envs_per_process` envs)."""
    if isinstance(cfg, dict):
        cfg = LiberoConfig.from_dict(cfg)
    check_libero_config()  # fail fast here, not in every worker
    num_tasks = None
    if not cfg.task_ids:
        num_tasks = len(suite_tasks(cfg.suite))
    factories = [_LiberoFactory(cfg, t) for t in env_task_ids(cfg, num_tasks)]
    pool = SubprocEnvPool(factories, timeout_s=cfg.worker_timeout_s, envs_per_process=cfg.process_layout())
    return VLAEnv(PoolBackend(pool), cfg)
