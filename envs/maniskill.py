"""ManiSkill3 adapter: CPU backend (worker processes of `envs_per_process` envs) and GPU backend
(one batched sim).

Both give the same VLAEnv API (envs.base). What an env returns:
  obs_mode "state": state = ManiSkill's privileged state, flattened from obs_mode="state_dict" with a
                    name per dim ("agent/qpos[0]", "extra/goal_pos[2]", ...); no images.
  obs_mode "rgb":   images = the config's cameras at config.image_size; state = the concatenation of
                    config.state_keys ("agent/qpos", "extra/tcp_pose", ...).
Rewards: "sparse", "dense", "normalized_dense" (ManiSkill's own), "shaped_diff" (πRL's differenced
stage reward), "dense_diff" (ManiSkill's normalized dense reward, differenced) or "shaped_dense_diff"
(both potentials, the dense one weighted 0.2): envs.rewards.differenced_reward, for both backends.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Any, Sequence

import numpy as np

from .base import EnvSpec, PoolBackend, VLAEnv
from .config import ManiSkillConfig
from .rewards import DifferencedPotential, DifferencedShapedReward, differenced_reward
from .workers import SubprocEnvPool, freeze_gc_after_imports


class AssetsMissingError(RuntimeError):
    """The task needs ManiSkill assets that are not on this machine (we never download or prompt)."""


def missing_assets(task: str) -> list[str]:
    """Asset ids the task needs that are not downloaded (same check gym.make does before prompting)."""
    from mani_skill.utils import assets
    from mani_skill.utils.registration import REGISTERED_ENVS

    if task not in REGISTERED_ENVS:
        raise ValueError(f"unknown ManiSkill task {task!r}")
    missing = []
    for asset_id in REGISTERED_ENVS[task].asset_download_ids or []:
        if asset_id in assets.DATA_GROUPS:
            ids = assets.expand_data_group_into_individual_data_source_ids(asset_id)
        else:
            ids = [asset_id]
        missing += [i for i in ids if not assets.is_data_source_downloaded(i)]
    return missing


def check_assets(task: str) -> None:
    missing = missing_assets(task)
    if missing:
        shown = ", ".join(missing[:5]) + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else "")
        raise AssetsMissingError(
            f"ManiSkill task {task} needs assets that are not downloaded: {shown}. pirl never "
            f"downloads them or waits for an answer; fetch them on a machine with network access, "
            f"e.g. `python -m mani_skill.utils.download_asset {missing[0]} -y`, and copy "
            f"{os.environ.get('MS_ASSET_DIR', '~/.maniskill/data')} here.")


def _ms_reward_mode(reward_mode: str) -> str:
    # The differenced stage reward is computed here from info; ManiSkill's cheapest mode suffices.
    # dense_diff (and shaped_dense_diff) difference ManiSkill's normalized dense reward, so they ask for it.
    return {"shaped_diff": "sparse", "dense_diff": "normalized_dense",
            "shaped_dense_diff": "normalized_dense"}.get(reward_mode, reward_mode)


def make_kwargs(cfg: ManiSkillConfig, num_envs: int, render_frames: bool) -> dict[str, Any]:
    """Keyword arguments for gym.make of one ManiSkill env (or a GPU batch)."""
    height, width = cfg.image_size
    kwargs: dict[str, Any] = dict(
        obs_mode="state_dict" if cfg.obs_mode == "state" else "rgb",
        control_mode=cfg.control_mode,
        reward_mode=_ms_reward_mode(cfg.reward_mode),
        sim_backend=cfg.backend,
        num_envs=num_envs,
    )
    if cfg.obs_mode == "rgb":
        kwargs["sensor_configs"] = dict(width=width, height=height)
    if render_frames:
        kwargs["render_mode"] = "rgb_array"
        kwargs["human_render_camera_configs"] = dict(width=width, height=height)
    elif cfg.obs_mode == "state":
        kwargs["render_backend"] = "none"  # no Vulkan rendering at all for state-only envs
    if cfg.max_episode_steps is not None:
        kwargs["max_episode_steps"] = cfg.max_episode_steps
    return kwargs


def flatten_named(tree: dict, prefix: str = "") -> tuple[list[np.ndarray], list[str]]:
    """Flatten a nested dict of arrays [..., d] in insertion order; one name per scalar dim."""
    values, names = [], []
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            sub_values, sub_names = flatten_named(value, path + "/")
            values += sub_values
            names += sub_names
        else:
            arr = np.asarray(value, dtype=np.float32).reshape(-1)
            values.append(arr)
            names += [f"{path}[{j}]" for j in range(arr.size)] if arr.size > 1 else [path]
    return values, names


def _lookup(tree: dict, key: str):
    node = tree
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(f"state key {key!r} not in the observation (have {list(tree)})")
        node = node[part]
    return node


class ManiSkillObsAdapter:
    """Turns one unbatched ManiSkill observation (numpy) into the VLA observation of one env."""

    def __init__(self, cfg: ManiSkillConfig):
        self.cfg = cfg
        self.state_names: list[str] | None = None

    def __call__(self, raw: dict) -> dict[str, Any]:
        if self.cfg.obs_mode == "state":
            tree = {k: raw[k] for k in ("agent", "extra") if k in raw}
            values, names = flatten_named(tree)
            images = {}
        else:
            values, names = [], []
            for key in self.cfg.state_keys:
                sub_values, sub_names = flatten_named({key: _lookup(raw, key)})
                values += sub_values
                names += sub_names
            images = {}
            for cam in self.cfg.cameras:
                if cam not in raw["sensor_data"]:
                    raise KeyError(f"camera {cam!r} not in {self.cfg.task} (has {list(raw['sensor_data'])})")
                images[cam] = np.ascontiguousarray(raw["sensor_data"][cam]["rgb"][..., :3], dtype=np.uint8)
        if self.state_names is None:
            self.state_names = names
        return {"images": images, "state": np.concatenate(values).astype(np.float32),
                "prompt": self.cfg.instruction}


def _inference_mode():
    import torch

    return torch.inference_mode()


def _in_grad_context(method):
    """Run a ManiSkillSingleEnv method inside the env's grad context (see `no_autograd`)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._grad_context():
            return method(self, *args, **kwargs)

    return wrapper


class ManiSkillSingleEnv:
    """One ManiSkill env on the CPU sim, unbatched numpy in and out (lives in a worker process).

    no_autograd: run every call (construction included) under torch.inference_mode. ManiSkill's
    controllers, observations and checks are hundreds of small torch ops per step on batch-1
    tensors; without autograd bookkeeping a step costs ~15% less CPU, with bit-identical results.
    Only for envs used through this class's methods (the worker pool's): tensors made in inference
    mode cannot be updated in place outside it, so code that drives `raw_env` itself (demos) keeps
    the default.
    """

    def __init__(self, cfg: ManiSkillConfig, render_frames: bool = False, max_episode_steps=None,
                 no_autograd: bool = False):
        self._grad_context = _inference_mode if no_autograd else contextlib.nullcontext
        with self._grad_context():
            self._build(cfg, render_frames, max_episode_steps)

    def _build(self, cfg: ManiSkillConfig, render_frames: bool, max_episode_steps) -> None:
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401  (registers the tasks)
        from mani_skill.utils.wrappers.gymnasium import CPUGymWrapper

        check_assets(cfg.task)
        if cfg.backend != "cpu":
            raise ValueError("ManiSkillSingleEnv is the CPU backend")
        self.cfg = cfg
        self.render_frames = render_frames
        kwargs = make_kwargs(cfg, 1, render_frames)
        if max_episode_steps is not None:
            kwargs["max_episode_steps"] = max_episode_steps
        self.raw_env = gym.make(cfg.task, **kwargs)
        self.env = CPUGymWrapper(self.raw_env, ignore_terminations=not cfg.terminate_on_success)
        self.obs_adapter = ManiSkillObsAdapter(cfg)
        self.shaper = DifferencedShapedReward()
        self.differ = DifferencedPotential()
        self.action_dim = int(np.prod(self.env.action_space.shape))
        self._first_obs = None

    @_in_grad_context
    def spec(self) -> EnvSpec:
        if self._first_obs is None:
            self._first_obs = self.reset(0)[0]
        height, width = self.cfg.image_size
        limit = self.raw_env.spec.max_episode_steps if self.raw_env.spec else None
        return EnvSpec(
            cameras={cam: (height, width) for cam in (self.cfg.cameras if self.cfg.obs_mode == "rgb" else ())},
            state_dim=int(self._first_obs["state"].shape[0]),
            state_names=tuple(self.obs_adapter.state_names),
            action_dim=self.action_dim,
            max_episode_steps=int(limit or self.cfg.max_episode_steps or 0),
            control_mode=self.cfg.control_mode,
        )

    def _info(self, info: dict) -> dict[str, Any]:
        out = {"success": bool(info.get("success", False)),
               "is_grasped": bool(info.get("is_grasped", False))}
        if self.render_frames:
            out["frame"] = np.asarray(self.env.render(), dtype=np.uint8)[..., :3]
        return out

    @_in_grad_context
    def reset(self, seed: int, hard: bool = False):
        # hard: rebuild the scene, so the episode is independent of what ran before (state obs:
        # ~20 ms in a worker process, ~0.2 s elsewhere; see prepare_worker_process).
        raw, info = self.env.reset(seed=int(seed), options={"reconfigure": True} if hard else None)
        self.shaper.reset()
        self.differ.reset()
        return self.obs_adapter(raw), self._info(info)

    @_in_grad_context
    def step(self, action: np.ndarray):
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.action_dim,):
            raise ValueError(f"{self.cfg.task}: action shape {action.shape} != ({self.action_dim},)")
        raw, reward, terminated, truncated, info = self.env.step(action)
        out_info = self._info(info)
        reward = differenced_reward(self.cfg.reward_mode, self.shaper, self.differ, out_info["is_grasped"],
                                    out_info["success"], float(reward))
        return self.obs_adapter(raw), float(reward), bool(terminated), bool(truncated), out_info

    @_in_grad_context
    def get_state(self) -> np.ndarray:
        """The full simulator state (for reproducibility checks)."""
        return np.asarray(self.raw_env.unwrapped.get_state()).reshape(-1)

    @_in_grad_context
    def close(self) -> None:
        self.env.close()


class _SingleEnvFactory:
    """Picklable constructor of a worker's env (spawned processes rebuild it from the config).

    keep_render_context: no env of the batch renders (see prepare_worker_process)."""

    def __init__(self, cfg: ManiSkillConfig, render_frames: bool, keep_render_context: bool = False):
        self.cfg, self.render_frames, self.keep_render_context = cfg, render_frames, keep_render_context

    def __call__(self) -> ManiSkillSingleEnv:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        prepare_worker_process(self.keep_render_context)
        return ManiSkillSingleEnv(self.cfg, self.render_frames, no_autograd=True)


_render_keepalive = None


def prepare_worker_process(keep_render_context: bool) -> None:
    """Make scene rebuilds (hard resets, ~210 ms each in state mode) cheap in a worker: ~17 ms.

    - ManiSkill's reconfigure runs gc.collect(), which walked the ~360k objects of torch, SAPIEN and
      ManiSkill (~150 ms); they are frozen out of the collector first (envs.workers).
    - keep_render_context, for processes whose envs never render (state obs, no video): building
      the cube and the goal creates two sapien RenderMaterials that no render body keeps; when none
      is alive SAPIEN sets its render context up again, ~19 ms each time. One material kept for the
      process's life keeps the context. Not where an env renders: the material takes SAPIEN's
      default render device, and the renderer of an rgb env or a video camera (ManiSkill asks for
      "cpu" on a machine without CUDA) then fails with "only supports single-GPU rendering".
    Neither touches the simulation: rollouts are bit-identical (bench/results/rl_throughput.md).
    """
    global _render_keepalive
    freeze_gc_after_imports("torch", "gymnasium", "mani_skill.envs", "sapien")
    if keep_render_context and _render_keepalive is None:
        import sapien

        _render_keepalive = sapien.render.RenderMaterial()


class ManiSkillGPUBackend:
    """All num_envs envs in one GPU-simulated ManiSkill env (sim_backend="gpu"), batched tensors.

    Only envs listed in step_envs receive their action; the rest (finished inside the current chunk)
    get a zero action, their results are dropped, and they are reset (partial reset by env_idx)
    before their next observation is used, so nothing they "execute" is ever seen.
    """

    def __init__(self, cfg: ManiSkillConfig):
        import gymnasium as gym
        import mani_skill.envs  # noqa: F401
        import torch

        check_assets(cfg.task)
        self.torch = torch
        self.cfg = cfg
        self.num_envs = cfg.num_envs
        self.render_frames = bool(cfg.record_video_envs)
        self.env = gym.make(cfg.task, **make_kwargs(cfg, cfg.num_envs, self.render_frames))
        self.base = self.env.unwrapped
        self.device = self.base.device
        self.action_dim = int(self.base.single_action_space.shape[0])
        self.obs_adapter = ManiSkillObsAdapter(cfg)
        self.shaper = DifferencedShapedReward()
        self.shaper.prev_potential = torch.zeros(self.num_envs, device=self.device)
        self.shaper.prev_grasped = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        self.differ = DifferencedPotential()
        self.differ.prev_potential = torch.zeros(self.num_envs, device=self.device)
        self._spec = None
        self._seeds = list(range(self.num_envs))

    def _split(self, raw, info) -> list[tuple[dict, dict]]:
        """Batched tensors -> per-env numpy observations and infos."""
        from mani_skill.utils import common

        raw_np = common.to_numpy(raw)
        info_np = common.to_numpy(info)
        frames = None
        if self.render_frames:
            frames = common.to_numpy(self.env.render())
        out = []
        for i in range(self.num_envs):
            one = _index_tree(raw_np, i)
            inf = {"success": bool(np.asarray(info_np.get("success", np.zeros(self.num_envs)))[i]),
                   "is_grasped": bool(np.asarray(info_np.get("is_grasped", np.zeros(self.num_envs)))[i])}
            if frames is not None:
                inf["frame"] = np.asarray(frames[i], dtype=np.uint8)[..., :3]
            out.append((self.obs_adapter(one), inf))
        return out

    def env_spec(self) -> EnvSpec:
        if self._spec is None:
            per_env, _ = self.reset_envs(list(range(self.num_envs)), list(range(self.num_envs)))
            first = per_env[0][0]
            height, width = self.cfg.image_size
            limit = self.env.spec.max_episode_steps if self.env.spec else None
            self._spec = EnvSpec(
                cameras={c: (height, width) for c in (self.cfg.cameras if self.cfg.obs_mode == "rgb" else ())},
                state_dim=int(first["state"].shape[0]),
                state_names=tuple(self.obs_adapter.state_names),
                action_dim=self.action_dim,
                max_episode_steps=int(limit or self.cfg.max_episode_steps or 0),
                control_mode=self.cfg.control_mode,
            )
        return self._spec

    def reset_envs(self, indices: Sequence[int], seeds: Sequence[int], hard: bool = False):
        # hard resets are not applied on the GPU: reconfiguring would reset every env at once.
        torch = self.torch
        env_idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.device)
        # ManiSkill 3.0.1 takes a seed list of length num_envs even for a partial reset (it rebuilds
        # every env's episode RNG from it): keep the seeds of the other envs in their slots. Its
        # tasks draw initial poses with torch under a fork seeded by the batch's first seed, so on
        # the GPU the same seed list gives the same initial states, but one env's seed alone does not
        # fix its state the way it does on the CPU backend.
        for i, s in zip(indices, seeds):
            self._seeds[i] = int(s)
        raw, info = self.env.reset(seed=[int(s) for s in self._seeds], options={"env_idx": env_idx})
        mask = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        mask[env_idx] = True
        self.shaper.reset(mask)
        self.differ.reset(mask)
        per_env = self._split(raw, info)
        return {i: per_env[i] for i in indices}, []

    def step_envs(self, indices: Sequence[int], actions: np.ndarray):
        torch = self.torch
        full = torch.zeros((self.num_envs, self.action_dim), dtype=torch.float32, device=self.device)
        idx = torch.as_tensor(list(indices), dtype=torch.long, device=self.device)
        full[idx] = torch.as_tensor(np.asarray(actions), dtype=torch.float32, device=self.device)
        raw, reward, terminated, truncated, info = self.env.step(full)
        if not self.cfg.terminate_on_success:
            terminated = torch.zeros_like(terminated)
        if self.cfg.reward_mode.endswith("_diff"):
            # Envs outside step_envs got a zero action; their potentials are reset with them.
            grasped = info.get("is_grasped", torch.zeros_like(terminated)).bool()
            reward = differenced_reward(self.cfg.reward_mode, self.shaper, self.differ, grasped,
                                        info["success"].bool(), reward.float())
        per_env = self._split(raw, info)
        reward_np = reward.detach().float().cpu().numpy().reshape(-1)
        term_np = terminated.detach().cpu().numpy().reshape(-1)
        trunc_np = truncated.detach().cpu().numpy().reshape(-1)
        results = {i: (per_env[i][0], float(reward_np[i]), bool(term_np[i]), bool(trunc_np[i]), per_env[i][1])
                   for i in indices}
        return results, []

    def close(self) -> None:
        self.env.close()


def _index_tree(tree, i: int):
    if isinstance(tree, dict):
        return {k: _index_tree(v, i) for k, v in tree.items()}
    return np.asarray(tree)[i]


def make_maniskill_env(cfg: ManiSkillConfig | dict) -> VLAEnv:
    """Build the batched env for a ManiSkill config (a ManiSkillConfig or a plain dict)."""
    if isinstance(cfg, dict):
        cfg = ManiSkillConfig.from_dict(cfg)
    for task in cfg.tasks or (cfg.task,):
        check_assets(task)  # fail fast in this process, before any worker starts
    if cfg.backend == "gpu":
        backend = ManiSkillGPUBackend(cfg)
    else:
        # A process only hosts envs of this batch, so this decides for each process as a whole.
        renders = cfg.obs_mode != "state" or bool(cfg.record_video_envs)
        factories = [_SingleEnvFactory(cfg.env_task(i), i in cfg.record_video_envs, keep_render_context=not renders)
                     for i in range(cfg.num_envs)]
        backend = PoolBackend(SubprocEnvPool(factories, timeout_s=cfg.worker_timeout_s,
                                             envs_per_process=cfg.process_layout()))
    try:
        return VLAEnv(backend, cfg)
    except Exception:
        backend.close()  # e.g. a multi-task batch whose shapes disagree: stop the workers it started
        raise
