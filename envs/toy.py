"""The toy env of `ToyConfig`: numpy only, no simulator, the same VLAEnv API as ManiSkill and LIBERO.

Used by tests/test_learning_toy.py to check that every RL method raises success on a task a correct
policy-gradient setup must learn, and by users to smoke-test a new RL config in seconds.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from .base import EnvSpec, VLAEnv
from .config import ToyConfig


class ToyBackend:
    """All envs in one set of numpy arrays (no processes)."""

    def __init__(self, cfg: ToyConfig):
        self.cfg = cfg
        self.num_envs = cfg.num_envs
        self._state = np.zeros((cfg.num_envs, cfg.state_dim), dtype=np.float32)
        self._t = np.zeros(cfg.num_envs, dtype=np.int64)
        self._action_sum = np.zeros(cfg.num_envs, dtype=np.float64)

    def env_spec(self) -> EnvSpec:
        cfg = self.cfg
        return EnvSpec(cameras={}, state_dim=cfg.state_dim, state_names=tuple(f"x{i}" for i in range(cfg.state_dim)),
                       action_dim=cfg.action_dim, max_episode_steps=cfg.episode_steps, control_mode="toy")

    def _obs(self, i: int) -> dict:
        return {"images": {}, "state": self._state[i].copy(), "prompt": self.cfg.prompt}

    def reset_envs(self, indices: Sequence[int], seeds: Sequence[int], hard: bool = False):
        for i, seed in zip(indices, seeds):
            rng = np.random.default_rng(int(seed))
            self._state[i] = rng.normal(scale=self.cfg.state_scale, size=self.cfg.state_dim)
            self._t[i], self._action_sum[i] = 0, 0.0
        return {i: (self._obs(i), {}) for i in indices}, []

    def step_envs(self, indices: Sequence[int], actions: np.ndarray):
        cfg = self.cfg
        idx = np.asarray(indices, dtype=np.int64)
        self._t[idx] += 1
        self._action_sum[idx] += actions[:, cfg.action_index]
        done = self._t[idx] >= cfg.episode_steps
        success = done & (self._action_sum[idx] / cfg.episode_steps > cfg.threshold)
        results = {int(i): (self._obs(int(i)), float(s), bool(d), False, {"success": bool(s)})
                   for i, d, s in zip(idx, done, success)}
        return results, []

    def close(self) -> None:
        """Nothing to release: no processes, no simulator (the Backend protocol requires the method)."""


def make_toy_env(cfg: ToyConfig) -> VLAEnv:
    return VLAEnv(ToyBackend(cfg), cfg)
