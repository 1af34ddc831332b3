"""Guided velocities that plug into `pirl.flow.sample` unchanged (METHODS.md §5).

QGF and the OOD gradient only need (x, t, v), so they are `VelocityTransform`s: pass them as
`sample(..., velocity_transforms=[QGFGuidance(...)])` or `sample_chain(..., velocity_transforms=...)`.
The Jacobian and BPTT baselines differentiate through the velocity network itself, so they wrap the
velocity function instead (one forward with a graph replaces the plain forward, no extra pass).

Each records ||w g|| / ||v|| per step and its critic / backward passes into a `GuidanceStats`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pirl.flow.grid import DenoiseGrid
from pirl.flow.sampler import VelocityFn

from .gradients import (
    ClipBounds,
    bptt_direction,
    guidance_ratio,
    guided_velocity,
    inpaint_direction,
    inpaint_guidance_scale,
    jacobian_direction,
    ood_direction,
    qgf_direction,
)
from .qfunction import QFunction
from .stats import GuidanceStats


def _record(stats: GuidanceStats, v: torch.Tensor, direction: torch.Tensor, weight: float) -> torch.Tensor:
    """v' = v - w g, logging ||w g|| / ||v|| for this step."""
    term = weight * direction
    stats.ratios.append(guidance_ratio(v, term).detach())
    return guided_velocity(v, direction, weight)


@dataclass(frozen=True)
class QGFGuidance:
    """QGF as a velocity transform: v' = v - w * grad Q(clip(x - t v)) (METHODS.md §5)."""

    q_fn: QFunction
    weight: float
    clip: ClipBounds
    stats: GuidanceStats

    def __call__(self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        direction = qgf_direction(self.q_fn, x, t, v, self.clip)
        self.stats.q_backward_rows += x.shape[0]
        return _record(self.stats, v, direction, self.weight)


@dataclass(frozen=True)
class OODGuidance:
    """OOD-gradient baseline as a velocity transform: v' = v - w * grad Q(x) at the noisy x (METHODS.md §5)."""

    q_fn: QFunction
    weight: float
    stats: GuidanceStats

    def __call__(self, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        direction = ood_direction(self.q_fn, x)
        self.stats.q_backward_rows += x.shape[0]
        return _record(self.stats, v, direction, self.weight)


@dataclass(frozen=True)
class JacobianGuidedVelocity:
    """QGF-Jacobian as a velocity function: v' = v - w * J^T grad Q(a_hat) (METHODS.md §5)."""

    velocity_fn: VelocityFn
    q_fn: QFunction
    weight: float
    clip: ClipBounds
    stats: GuidanceStats

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        direction, v = jacobian_direction(self.velocity_fn, self.q_fn, x, t, self.clip)
        self.stats.velocity_backward_rows += x.shape[0]
        self.stats.q_backward_rows += x.shape[0]
        return _record(self.stats, v, direction, self.weight)


@dataclass(frozen=True)
class BPTTGuidedVelocity:
    """BPTT baseline as a velocity function: v' = v - w * dQ(a_final)/dx through the rest of `grid`.

    The step index is read off t, which must be a time of `grid` (as in `pirl.flow.sample`); that needs
    t's value, so this wrapper cannot run on the `meta` device.
    """

    velocity_fn: VelocityFn
    q_fn: QFunction
    weight: float
    grid: DenoiseGrid
    stats: GuidanceStats

    def step_index(self, t: torch.Tensor) -> int:
        """k with t_k = t (every row of t is the same time in the sampler)."""
        t_value = float(t.reshape(-1)[0])
        k = min(range(self.grid.num_steps), key=lambda i: abs(self.grid.times[i] - t_value))
        if abs(self.grid.times[k] - t_value) > 1e-5:
            raise ValueError(f"BPTT guidance: t = {t_value} is not a time of the grid {self.grid.times}")
        return k

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = self.step_index(t)
        direction, v = bptt_direction(self.velocity_fn, self.q_fn, x, self.grid, k)
        remaining = self.grid.num_steps - k
        # The first unrolled pass is the step's own velocity; the other K - k - 1 are extra.
        self.stats.velocity_backward_rows += remaining * x.shape[0]
        self.stats.q_backward_rows += x.shape[0]
        return _record(self.stats, v, direction, self.weight)


@dataclass(frozen=True)
class InpaintGuidedVelocity:
    """Real-time chunking as a velocity function: v' = v - s(t) J^T [W (Y - a_hat)] (docs/serve.md), which
    steers the new chunk's first actions onto the current chunk's remaining ones (`target` Y, `weights` W,
    both [B, H, D]). Rows whose weights are all zero get v exactly. s(t) = `inpaint_guidance_scale`, capped
    at `beta` (one value, or one per row)."""

    velocity_fn: VelocityFn
    target: torch.Tensor
    weights: torch.Tensor
    beta: float | torch.Tensor
    stats: GuidanceStats

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        direction, v = inpaint_direction(self.velocity_fn, x, t, self.target, self.weights)
        self.stats.velocity_backward_rows += x.shape[0]
        scale = inpaint_guidance_scale(t, self.beta).to(v.dtype).reshape(-1, *([1] * (v.ndim - 1)))
        term = scale * direction
        self.stats.ratios.append(guidance_ratio(v, term).detach())
        return v - term
