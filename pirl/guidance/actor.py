"""A guided sampler with the `PolicyActor` signature: what `pirl eval` and `pirl serve` plug in for guidance.

    sample = GuidedSampler(policy, critic, GuidanceConfig("qgf", weight=0.1, clip=None), num_steps=4)
    PolicyActor(policy, processor, num_steps, sample=sample)      # evaluate(..., actor=...)

`sample(inputs, noise [B, H, D], generators) -> normalised chunk [B, H, D]`: the VLM runs once per call,
the critic is bound to that prefix, and `guided_sample` does the rest (METHODS.md §5). Best-of-N
candidates beyond the first draw their noise from each row's own generator, so a row's result does not
depend on the other rows of its batch (a served request stays reproducible when batched).
"""
from __future__ import annotations

import dataclasses
import time

import torch

from pirl.flow.grid import DenoiseGrid

from .config import GuidanceConfig, fields_used
from .sampler import guided_sample


def resolve_clip(clip, action_mode: str | None):
    """The clean-estimate box of `GuidanceConfig.clip` for a policy's action normalisation.

    "auto": (-1, 1) for actions normalised into that box (openpi's quantile mode), None otherwise
    (z-scored actions have no box; clipping them at ±1 would cut off a third of the data)."""
    if clip == "auto":
        return (-1.0, 1.0) if action_mode == "quantile" else None
    return None if clip is None else tuple(clip)


def guidance_config(data: dict | None, action_mode: str | None) -> GuidanceConfig:
    """A `GuidanceConfig` from a config section ({method, weight, n, ..., clip: auto | null | [lo, hi]});
    `clip` (default auto) is resolved for the methods that use it."""
    data = dict(data or {})
    clip = data.pop("clip", "auto")
    if "clip" in fields_used(data.get("method", "none")):
        data["clip"] = resolve_clip(clip, action_mode)
    return GuidanceConfig(**data)


@dataclasses.dataclass
class GuidanceTotals:
    """What the guided chunks cost so far: network passes and wall time, summed over chunks."""

    chunks: int = 0
    seconds: float = 0.0
    velocity_evals: float = 0.0
    velocity_backwards: float = 0.0
    q_evals: float = 0.0
    q_backwards: float = 0.0
    ratio_median_per_step: list[float] = dataclasses.field(default_factory=list)

    def per_chunk(self) -> dict[str, float]:
        n = max(self.chunks, 1)
        return {"ms_per_chunk": 1e3 * self.seconds / n, "velocity_evals": self.velocity_evals / n,
                "velocity_backwards": self.velocity_backwards / n, "q_evals": self.q_evals / n,
                "q_backwards": self.q_backwards / n}


class GuidedSampler:
    """`(inputs, noise, generators) -> chunk`, guided by a critic; accumulates `totals` per call."""

    def __init__(self, policy, critic, cfg: GuidanceConfig, num_steps: int):
        if cfg.needs_critic and critic is None:
            raise ValueError(f"guidance {cfg.method!r} needs a critic (critic=DIR, written by `pirl critic`)")
        self.policy, self.critic, self.cfg = policy, critic, cfg
        self.grid = DenoiseGrid.uniform(num_steps)
        self.totals = GuidanceTotals()

    def _candidate_noise(self, noise: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """[n, B, H, D]: candidate 0 is the given noise, the others come from each row's generator."""
        extra = [torch.stack([torch.randn(noise.shape[1:], generator=g) for g in generators]).to(noise.device)
                 for _ in range(self.cfg.num_candidates - 1)]
        return torch.stack([noise, *extra])

    def __call__(self, inputs, noise: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        start = time.perf_counter()
        with torch.no_grad():
            prefix = self.policy.embed_prefix(inputs)
        q_fn = self.critic.bind(self.policy, prefix) if self.cfg.needs_critic else None
        if self.cfg.method in ("best_of_n", "qgf_best_of_n"):
            noise = self._candidate_noise(noise, generators)
        out = guided_sample(self.policy, prefix, q_fn, self.cfg, grid=self.grid, noise=noise)
        actions = out.actions.detach()
        self.totals.seconds += time.perf_counter() - start
        t = self.totals
        t.chunks += out.stats.batch_size
        for key, value in out.stats.per_chunk().items():
            setattr(t, key, getattr(t, key) + value * out.stats.batch_size)
        ratios = out.stats.ratio_per_step()
        if ratios:
            t.ratio_median_per_step = ratios
        return actions
