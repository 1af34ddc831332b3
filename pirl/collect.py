"""`pirl collect`: run a policy in a simulator and write what happened as a LeRobot dataset.

Episode i plays seed `seed + i` exactly once (as `pirl eval` does), in rounds of `num_envs` envs.
Each env acts chunk by chunk: when its previous chunk's n_exec actions are spent (or its episode
has just begun) the policy samples a new chunk for it, plain ODE (`ode=true`) or with the sampler's
exploration (Flow-SDE / Flow-Noise, the `sampler` section of `pirl train`); the env then steps one
action at a time, so every step's observation, executed action (raw env units), reward,
termination, truncation and success are recorded, and `chunk_start` marks the first action of each
chunk. The observation after an episode's last action is kept in the episode's metadata
(`final_state`), for a critic that bootstraps an episode cut by the time limit.

The dataset is the layout `envs.dataset` writes and reads (`pirl sft` and `pirl critic` take it).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from pirl.config import check_device
from pirl.train.rl_core import SamplerConfig, act, select_obs

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CollectConfig:
    checkpoint: str = ""
    """The policy (a pirl policy directory, or an RL trainer checkpoint: its noise head is used)."""
    env: dict = dataclasses.field(default_factory=dict)
    """Simulator section, as in `pirl eval` / `pirl train` (configs/env/)."""
    episodes: int = 16
    out: str = ""
    """Output dataset directory (must not hold a dataset)."""
    num_envs: int = 4
    n_exec: int = 5
    """Actions executed per chunk."""
    ode: bool = False
    """true: plain ODE sampling with sampler.num_steps steps (no exploration); false: the sampler's
    stochastic steps (Flow-SDE a_noise / explore_std, or the checkpoint's Flow-Noise head)."""
    sampler: SamplerConfig = SamplerConfig()
    seed: int = 0
    """Episode i plays seed `seed + i`."""
    camera_map: dict = dataclasses.field(default_factory=dict)
    """Model camera name -> env camera name (as in `pirl eval`)."""
    image_mode: str = "image"
    """image (PNG per frame) or video (mp4 per camera) for camera observations."""
    fps: int = 20
    device: str = "cpu"
    """Where the policy runs: cpu | cuda | cuda:N (fp32 there, CUDA graphs for its passes)."""

    def __post_init__(self) -> None:
        check_device(self.device, "device")
        if self.episodes < 1:
            raise ValueError(f"collect: episodes must be >= 1, got {self.episodes}")
        if self.num_envs < 1 or self.n_exec < 1:
            raise ValueError("collect: num_envs and n_exec must be >= 1")
        if self.image_mode not in ("image", "video"):
            raise ValueError(f"collect: image_mode must be image or video, got {self.image_mode!r}")


@dataclasses.dataclass
class _EpisodeLog:
    """What one env records during one episode (lists of per-step values)."""

    seed: int
    prompt: str = ""
    state: list = dataclasses.field(default_factory=list)
    images: dict = dataclasses.field(default_factory=dict)
    actions: list = dataclasses.field(default_factory=list)
    rewards: list = dataclasses.field(default_factory=list)
    terminated: list = dataclasses.field(default_factory=list)
    truncated: list = dataclasses.field(default_factory=list)
    success: list = dataclasses.field(default_factory=list)
    chunk_start: list = dataclasses.field(default_factory=list)

    def episode(self, final_state: np.ndarray):
        from envs.dataset import Episode

        return Episode(prompt=self.prompt, state=np.stack(self.state), actions=np.stack(self.actions),
                       images={cam: np.stack(frames) for cam, frames in self.images.items()}, seed=self.seed,
                       success=bool(any(self.success)), rewards=np.asarray(self.rewards),
                       terminated=np.asarray(self.terminated), truncated=np.asarray(self.truncated),
                       step_success=np.asarray(self.success), chunk_start=np.asarray(self.chunk_start),
                       final_state=final_state)


def collect(cfg: CollectConfig) -> dict:
    """Runs the episodes and writes the dataset; returns a summary (episodes, successes, seconds, ...)."""
    from envs.dataset import write_lerobot_dataset
    from pirl.train.common import graphs_on_gpu
    from pirl.train.rl import build_agent, make_env, processor_for

    if not cfg.checkpoint:
        raise ValueError("collect: checkpoint= is required (a pirl policy directory)")
    if not (Path(cfg.checkpoint) / "config.json").exists():
        raise FileNotFoundError(f"collect: no policy checkpoint at {cfg.checkpoint} (no config.json)")
    if not cfg.out:
        raise ValueError("collect: out= is required (the dataset directory to write)")
    if (Path(cfg.out) / "meta" / "info.json").exists():
        raise FileExistsError(f"collect: {cfg.out} already holds a dataset")
    started = time.perf_counter()
    agent = build_agent(cfg.checkpoint, cfg.sampler, "expert")
    agent.eval()
    agent.to(cfg.device)  # fp32, heads included: `act` moves observations to it, results come back
    graphs_on_gpu(agent.policy)
    if cfg.sampler.kind == "flow_noise" and not cfg.ode and agent.noise_head is not None:
        from vla.checkpoint import read_metadata

        if "noise_head" not in read_metadata(cfg.checkpoint).get("pirl_extra_modules", []):
            log.warning("collect: %s has no trained noise head; Flow-Noise explores with a fresh one", cfg.checkpoint)
    processor = processor_for(cfg.checkpoint, cfg.camera_map)
    horizon = agent.policy.config.action_horizon
    if cfg.n_exec > horizon:
        raise ValueError(f"collect: n_exec={cfg.n_exec} > the policy's action horizon {horizon}")
    env = make_env(cfg.env, cfg.num_envs, cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    episodes = []
    try:
        spec = env.spec
        for start in range(cfg.seed, cfg.seed + cfg.episodes, cfg.num_envs):
            obs = env.reset(start)
            active = list(range(min(cfg.num_envs, cfg.seed + cfg.episodes - start)))
            logs = {i: _EpisodeLog(seed=start + i, prompt=obs["prompt"][i]) for i in active}
            queue: dict[int, np.ndarray] = {}
            used = {i: cfg.n_exec for i in active}  # actions of the current chunk spent
            while active:
                need = [i for i in active if used[i] >= cfg.n_exec]
                if need:
                    _, _, _, actions = act(agent, processor, select_obs(obs, need), cfg.sampler, generator,
                                           deterministic=cfg.ode)
                    for j, i in enumerate(need):
                        queue[i], used[i] = actions[j, : cfg.n_exec], 0
                step = np.zeros((env.num_envs, 1, spec.action_dim), dtype=np.float32)
                for i in active:
                    rec = logs[i]
                    rec.state.append(np.asarray(obs["state"][i], dtype=np.float32))
                    for cam, frames in obs["images"].items():
                        rec.images.setdefault(cam, []).append(np.asarray(frames[i]))
                    rec.chunk_start.append(used[i] == 0)
                    step[i, 0] = queue[i][used[i]]
                    rec.actions.append(step[i, 0].copy())
                    used[i] += 1
                obs, reward, terminated, truncated, info = env.step_chunk(step, 1)
                for i in list(active):
                    rec = logs[i]
                    rec.rewards.append(float(reward[i]))
                    rec.terminated.append(bool(terminated[i]))
                    rec.truncated.append(bool(truncated[i]))
                    rec.success.append(bool(info["success"][i]))
                    if terminated[i] or truncated[i]:
                        final = np.asarray(info["final_obs"]["state"][i], dtype=np.float32)
                        episodes.append(rec.episode(final))
                        active.remove(i)
            log.info("collect: %d/%d episodes", len(episodes), cfg.episodes)
    finally:
        env.close()
    episodes.sort(key=lambda e: e.seed)
    seconds = time.perf_counter() - started
    summary = {"episodes": len(episodes), "successes": int(sum(e.success for e in episodes)),
               "mean_return": float(np.mean([e.rewards.sum() for e in episodes])),
               "mean_length": float(np.mean([len(e.actions) for e in episodes])),
               "env_steps": int(sum(len(e.actions) for e in episodes)), "seconds": round(seconds, 2)}
    extra = {"source": "pirl collect", "policy_checkpoint": str(cfg.checkpoint), "env": dict(cfg.env),
             "n_exec": cfg.n_exec, "ode": cfg.ode, "sampler": dataclasses.asdict(cfg.sampler),
             "seeds": [e.seed for e in episodes], "summary": summary}
    write_lerobot_dataset(cfg.out, episodes, cfg.fps, state_names=spec.state_names,
                          image_mode=cfg.image_mode, extra_info=json.loads(json.dumps(extra, default=str)))
    return {**summary, "out": str(cfg.out)}
