"""The toy env of `ToyConfig`: numpy only, no simulator, the same VLAEnv API as ManiSkill and LIBERO.

Used by tests/test_learning_toy.py to check that every RL method raises success on a task a correct
policy-gradient setup must learn, and by users to smoke-test a new RL config in seconds. With
`envs_per_process` set, the envs run in worker processes as ManiSkill's CPU envs do, so the process
pool's paths (a pipelined rollout, a crashed worker) can be tried in seconds too.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Sequence

import numpy as np

from .base import EnvSpec, PoolBackend, VLAEnv
from .config import ToyConfig
from .workers import SubprocEnvPool


class ToyBackend:
    """All envs in one set of numpy arrays (no processes)."""

    def __init__(self, cfg: ToyConfig):
        self.cfg = cfg
        self.num_envs = cfg.num_envs
        self._state = np.zeros((cfg.num_envs, cfg.state_dim), dtype=np.float32)
        self._t = np.zeros(cfg.num_envs, dtype=np.int64)
        self._action_sum = np.zeros(cfg.num_envs, dtype=np.float64)
        self._paid_steps = np.zeros(cfg.num_envs, dtype=np.int64)
        self._cue_rngs = [np.random.default_rng(i) for i in range(cfg.num_envs)]
        self._center, self._spread = np.zeros(cfg.state_dim), np.ones(cfg.state_dim)
        if cfg.state_stats:
            # Read here, not with vla.processor's loader: envs must not import vla (one direction of
            # dependency). Only the state's mean and std are used.
            stats = json.loads(Path(cfg.state_stats).read_text())
            stats = stats.get("norm_stats", stats)["state"]
            self._center, self._spread = np.asarray(stats["mean"]), np.asarray(stats["std"])
            if self._center.shape != (cfg.state_dim,):
                raise ValueError(f"{cfg.state_stats}: state stats have {self._center.shape[0]} dims, "
                                 f"the toy state_dim is {cfg.state_dim}")

    def env_spec(self) -> EnvSpec:
        cfg = self.cfg
        return EnvSpec(cameras={}, state_dim=cfg.state_dim, state_names=tuple(f"x{i}" for i in range(cfg.state_dim)),
                       action_dim=cfg.action_dim, max_episode_steps=cfg.episode_steps, control_mode="toy")

    def _obs(self, i: int) -> dict:
        return {"images": {}, "state": self._state[i].copy(), "prompt": self.cfg.prompt}

    def reset_envs(self, indices: Sequence[int], seeds: Sequence[int], hard: bool = False):
        for i, seed in zip(indices, seeds):
            rng = np.random.default_rng(int(seed))
            self._state[i] = self._center + self._spread * rng.normal(scale=self.cfg.state_scale,
                                                                      size=self.cfg.state_dim)
            self._t[i], self._action_sum[i], self._paid_steps[i] = 0, 0.0, 0
            if self.cfg.cue_period:
                self._cue_rngs[i] = rng
                self._draw_cue(i)
        return {i: (self._obs(i), {}) for i in indices}, []

    def _draw_cue(self, i: int) -> None:
        d, sign = self.cfg.cue_dim, self._cue_rngs[i].choice([-1.0, 1.0])
        self._state[i, d] = self._center[d] + self._spread[d] * self.cfg.cue_scale * sign

    def step_envs(self, indices: Sequence[int], actions: np.ndarray):
        if self.cfg.cue_period:
            return self._step_cued(indices, actions)
        cfg = self.cfg
        idx = np.asarray(indices, dtype=np.int64)
        self._t[idx] += 1
        self._action_sum[idx] += actions[:, cfg.action_index]
        done = self._t[idx] >= cfg.episode_steps
        success = done & (self._action_sum[idx] / cfg.episode_steps > cfg.threshold)
        results = {int(i): (self._obs(int(i)), float(s), bool(d), False, {"success": bool(s)})
                   for i, d, s in zip(idx, done, success)}
        return results, []

    def _step_cued(self, indices: Sequence[int], actions: np.ndarray):
        cfg = self.cfg
        idx = np.asarray(indices, dtype=np.int64)
        # The reward of this step is judged against the cue the policy saw (the one before the redraw).
        cue_sign = np.sign(self._state[idx, cfg.cue_dim] - self._center[cfg.cue_dim])
        paid = cue_sign * (actions[:, cfg.action_index] - cfg.threshold) > 0
        self._paid_steps[idx] += paid
        self._t[idx] += 1
        done = self._t[idx] >= cfg.episode_steps
        success = done & (self._paid_steps[idx] >= 0.75 * cfg.episode_steps)
        for i in idx[(self._t[idx] % cfg.cue_period == 0) & ~done]:
            self._draw_cue(int(i))
        results = {int(i): (self._obs(int(i)), float(p) / cfg.episode_steps, bool(d), False,
                            {"success": bool(s)}) for i, p, d, s in zip(idx, paid, done, success)}
        return results, []

    def close(self) -> None:
        """Nothing to release: no processes, no simulator (the Backend protocol requires the method)."""


class ToySingleEnv:
    """One toy env in a worker process (the single-env API of `envs.workers`): a one-env
    ToyBackend, so env i returns exactly what env i of the in-process backend returns."""

    def __init__(self, cfg: ToyConfig):
        self.backend = ToyBackend(cfg.replace(num_envs=1, record_video_envs=()))

    def spec(self) -> EnvSpec:
        return self.backend.env_spec()

    def reset(self, seed: int, hard: bool = False):
        return self.backend.reset_envs([0], [seed], hard)[0][0]

    def step(self, action: np.ndarray):
        return self.backend.step_envs([0], np.asarray(action)[None])[0][0]

    def close(self) -> None:
        """Nothing to release (the worker process ends with the pool)."""


def make_toy_env(cfg: ToyConfig) -> VLAEnv:
    if cfg.envs_per_process is None:
        return VLAEnv(ToyBackend(cfg), cfg)
    factories = [functools.partial(ToySingleEnv, cfg)] * cfg.num_envs
    pool = SubprocEnvPool(factories, timeout_s=cfg.worker_timeout_s, envs_per_process=cfg.process_layout())
    return VLAEnv(PoolBackend(pool), cfg)
