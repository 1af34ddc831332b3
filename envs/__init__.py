"""envs: one batched VLA env API over ManiSkill3 and LIBERO. Knows nothing about models.

    from envs import make_env
    env = make_env({"simulator": "maniskill", "task": "PickCube-v1", "num_envs": 4})
    obs = env.reset(seed=0)                       # {"images", "state", "prompt"}
    obs, reward, terminated, truncated, info = env.step_chunk(actions, n_exec=5)

Simulator packages are imported only when an env of that kind is built (see docs/envs.md).
"""
from __future__ import annotations

from typing import Any

from .base import ActionError, EnvSpec, VLAEnv
from .config import ConfigError, LiberoConfig, ManiSkillConfig, ToyConfig

__all__ = ["ActionError", "ConfigError", "EnvSpec", "LiberoConfig", "ManiSkillConfig", "ToyConfig", "VLAEnv", "make_env"]


def make_env(cfg: ManiSkillConfig | LiberoConfig | ToyConfig | dict[str, Any]) -> VLAEnv:
    """Build a batched env from a config object, or a dict with "simulator": maniskill | libero | toy."""
    if isinstance(cfg, dict):
        cfg = dict(cfg)
        simulator = cfg.pop("simulator", None)
        if simulator == "maniskill":
            cfg = ManiSkillConfig.from_dict(cfg)
        elif simulator == "libero":
            cfg = LiberoConfig.from_dict(cfg)
        elif simulator == "toy":
            cfg = ToyConfig.from_dict(cfg)
        else:
            raise ConfigError(f"env config needs simulator: maniskill | libero | toy (got {simulator!r})")
    if isinstance(cfg, ManiSkillConfig):
        from .maniskill import make_maniskill_env

        return make_maniskill_env(cfg)
    if isinstance(cfg, LiberoConfig):
        from .libero import make_libero_env

        return make_libero_env(cfg)
    if isinstance(cfg, ToyConfig):
        from .toy import make_toy_env

        return make_toy_env(cfg)
    raise TypeError(f"not an env config: {type(cfg).__name__}")
