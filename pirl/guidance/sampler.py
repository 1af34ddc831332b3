"""`guided_sample`: the one entry `pirl eval`, the bench and the server call (METHODS.md §5).

    prefix = policy.embed_prefix(inputs)                   # the VLM runs once per observation
    q_fn = critic.bind(...)                                  # QFunction: actions [B, H, D] -> [B]
    out = guided_sample(policy, prefix, q_fn, GuidanceConfig("qgf", weight=0.5), noise=noise)
    out.actions, out.stats.per_chunk(), out.stats.ratio_per_step()

Every method runs `pirl.flow.sample` with the ODE rule: QGF and the OOD gradient as velocity transforms,
Jacobian and BPTT as wrapped velocity functions, best-of-N on N * B rows whose prefix rows are repeated
with `Prefix.select` (the VLM is not rerun), GradStep after the plain chain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vla import draw

from pirl.flow.chain import Chain
from pirl.flow.grid import DenoiseGrid
from pirl.flow.policy import default_grid, policy_velocity_fn
from pirl.flow.sampler import VelocityFn, VelocityTransform, sample
from pirl.flow.steps import ODERule

from .config import BEST_OF_N, GuidanceConfig
from .gradients import best_of_n_index, gradstep_ascent, inpaint_weights
from .qfunction import QFunction, tile_q
from .stats import GuidanceStats, counted_q, counted_velocity
from .velocity import BPTTGuidedVelocity, InpaintGuidedVelocity, JacobianGuidedVelocity, OODGuidance, QGFGuidance

INPAINT_BETA = 5.0  # the cap on real-time chunking's step scale, as Black et al. (2025) set it


@dataclass
class GuidedSample:
    """The result of one guided sampling call.

    Fields:
        actions: [B, H, D] the chunks to execute (normalised units, padded dims included).
        chain: the ODE chain the actions came from, [B, K+1, H, D] latents: for best-of-N the selected
            candidates' chains; for GradStep the chain before the ascent (its last latent is not `actions`).
        q: [B] Q of the returned actions where the method computed it anyway (best-of-N), else None.
        stats: compute counters and per-step ||w g|| / ||v||.
    """

    actions: torch.Tensor
    chain: Chain
    q: torch.Tensor | None
    stats: GuidanceStats


def guided_sample(
    field: Any,
    prefix: Any,
    q_fn: QFunction | None,
    cfg: GuidanceConfig,
    *,
    grid: DenoiseGrid | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    action_shape: tuple[int, int] | None = None,
) -> GuidedSample:
    """Sample one action chunk per observation with the guidance method of `cfg`.

    Args:
        field: a `vla` policy (with `prefix` its `embed_prefix` output), or, with `prefix=None`, a
            velocity function (x [R, H, D], t [R]) -> v that accepts any number of rows R (closed-form
            fields do; a closure over B observations does not, so best-of-N needs the policy form).
        prefix: the policy's prefix for the B observations, computed once by the caller.
        q_fn: the critic bound to the same B observations; None only for method "none".
        cfg: the method and its knobs.
        grid: denoising times; default the policy's uniform grid (required with a velocity function).
        noise: initial latents, [B, H, D], or [n, B, H, D] for the best-of-N methods (candidate j of
            observation b starts from noise[j, b]); drawn from N(0, I) with `generator` when None.
        batch_size, action_shape: B and (H, D) when a velocity function is given without noise.

    Returns:
        A `GuidedSample`. With w = 0 (or method "none") the actions equal the plain ODE sampler's
        (`sample_chain(..., rule=ODERule())`) bit for bit and no critic pass is made.
    """
    if cfg.needs_critic and q_fn is None:
        raise ValueError(f"guidance method {cfg.method!r} needs a q_fn (a critic bound to the observations)")
    if torch.is_inference_mode_enabled() and (cfg.steers_velocity or cfg.method == "gradstep"):
        raise ValueError(f"guidance method {cfg.method!r} differentiates the critic: call it under "
                         "torch.no_grad(), not torch.inference_mode()")
    n = cfg.num_candidates
    noise = _initial_noise(field, prefix, n, cfg.method in BEST_OF_N, noise, generator, batch_size, action_shape)
    num_obs, rows = noise.shape[-3], noise.shape[-3] * n
    grid = grid or (default_grid(field) if prefix is not None else None)
    if grid is None:
        raise ValueError("pass a grid when sampling with a velocity function")

    stats = GuidanceStats(batch_size=num_obs)
    velocity_fn = counted_velocity(_candidate_velocity_fn(field, prefix, num_obs, n), stats)
    q = tile_q(counted_q(q_fn, stats), n) if q_fn is not None else None
    velocity_fn, transforms = _guided_field(cfg, velocity_fn, q, grid, stats)

    chain = sample(velocity_fn, grid, ODERule(), "none", noise=noise.reshape(rows, *noise.shape[-2:]),
                   velocity_transforms=transforms)
    actions, q_values = chain.actions, None

    if cfg.method == "gradstep" and cfg.gradstep_steps > 0 and cfg.gradstep_size > 0:
        actions = gradstep_ascent(q, actions, cfg.gradstep_steps, cfg.gradstep_size, cfg.clip)
        stats.q_backward_rows += cfg.gradstep_steps * rows

    if cfg.method in BEST_OF_N:
        with torch.no_grad():
            candidate_q = q(actions).reshape(n, num_obs)
        best = best_of_n_index(candidate_q)
        obs_index = torch.arange(num_obs, device=best.device)
        chain = chain.select(best * num_obs + obs_index)
        actions, q_values = chain.actions, candidate_q[best, obs_index]

    return GuidedSample(actions=actions, chain=chain, q=q_values, stats=stats)


def _initial_noise(field, prefix, n, candidates, noise, generator, batch_size, action_shape) -> torch.Tensor:
    """x_0 as [B, H, D], or [n, B, H, D] for the best-of-N methods (`candidates`), even with n = 1.

    Drawn like `sample_chain` draws it when not given, so a plain call matches it bit for bit."""
    if noise is None:
        if prefix is not None:
            batch_size = prefix.batch_size
            action_shape = (field.config.action_horizon, field.config.action_dim)
            device = next(field.parameters()).device
        elif batch_size is None or action_shape is None:
            raise ValueError("pass the initial noise, or batch_size and action_shape with a velocity function")
        else:
            device = None
        shape = (n, batch_size, *action_shape) if candidates else (batch_size, *action_shape)
        return draw.normal(shape, generator, device)
    shape_ok = noise.ndim == 4 and noise.shape[0] == n if candidates else noise.ndim == 3
    if not shape_ok:
        expected = f"[n = {n}, B, H, D] for best-of-N" if candidates else "[B, H, D]"
        raise ValueError(f"noise must be {expected}, got {tuple(noise.shape)}")
    if prefix is not None and noise.shape[-3] != prefix.batch_size:
        raise ValueError(f"noise has {noise.shape[-3]} observations, the prefix {prefix.batch_size}")
    return noise


def _candidate_velocity_fn(field, prefix, num_obs: int, n: int) -> VelocityFn:
    """The plain velocity over n * B rows, candidate-major; prefix rows repeated, not recomputed."""
    if prefix is None:
        return field
    if n > 1:
        prefix = prefix.select(torch.arange(num_obs, device=prefix.pad_mask.device).repeat(n))
    return policy_velocity_fn(field, prefix, with_hidden=False)


def _guided_field(
    cfg: GuidanceConfig, velocity_fn: VelocityFn, q_fn: QFunction | None, grid: DenoiseGrid, stats: GuidanceStats
) -> tuple[VelocityFn, list[VelocityTransform]]:
    """(velocity function, velocity transforms) for `sample`; unchanged when nothing steers the velocity."""
    if not cfg.steers_velocity:
        return velocity_fn, []
    if cfg.method in ("qgf", "qgf_best_of_n"):
        return velocity_fn, [QGFGuidance(q_fn, cfg.weight, cfg.clip, stats)]
    if cfg.method == "ood":
        return velocity_fn, [OODGuidance(q_fn, cfg.weight, stats)]
    if cfg.method == "qgf_jacobian":
        return JacobianGuidedVelocity(velocity_fn, q_fn, cfg.weight, cfg.clip, stats), []
    if cfg.method == "bptt":
        return BPTTGuidedVelocity(velocity_fn, q_fn, cfg.weight, grid, stats), []
    raise AssertionError(f"unhandled velocity-guided method {cfg.method!r}")


@dataclass(frozen=True)
class Inpainting:
    """What real-time chunking steers new chunks onto (docs/serve.md): per row, the current chunk's
    remaining actions `target` Y and the weights W (`inpaint_weights`, zero on padded dims and on rows
    without a current chunk), both [B, H, D] in the policy's normalised units, and each row's cap `beta`
    [B] on the step scale (`inpaint_guidance_scale`): how hard the new chunk is pulled onto the old one."""

    target: torch.Tensor
    weights: torch.Tensor
    beta: torch.Tensor

    @classmethod
    def from_raw(cls, processor: Any, remaining: list, delays: list[int], betas: list[float] | None = None
                 ) -> "Inpainting":
        """Rows from the env-unit actions still to run of each row's current chunk ([L, d] with L <= H, or
        None for a row without one), the steps `delays` until the new chunk takes over, and the caps
        `betas` (default `INPAINT_BETA`)."""
        horizon, dim = processor.config.action_horizon, processor.config.action_dim
        betas = [INPAINT_BETA] * len(remaining) if betas is None else betas
        target = torch.zeros(len(remaining), horizon, dim)
        weights = torch.zeros(len(remaining), horizon, dim)
        dims = processor.dim_mask().float()
        for i, (rest, delay) in enumerate(zip(remaining, delays, strict=True)):
            if rest is None or len(rest) == 0:
                continue
            rest = np.asarray(rest)
            if rest.ndim != 2 or rest.shape[0] > horizon or rest.shape[1] != processor.action_dims:
                raise ValueError(f"row {i}: the remaining actions must be [L <= {horizon}, {processor.action_dims}] "
                                 f"(env units), got {tuple(rest.shape)}")
            overlap = len(rest)
            target[i, :overlap] = torch.from_numpy(processor.normalize_actions(rest))
            weights[i] = inpaint_weights(horizon, int(delay), overlap)[:, None] * dims
        return cls(target, weights, torch.tensor(betas, dtype=torch.float32))

    def select(self, index: torch.Tensor) -> "Inpainting":
        return Inpainting(self.target[index], self.weights[index], self.beta[index])

    def to(self, device) -> "Inpainting":
        return Inpainting(self.target.to(device), self.weights.to(device), self.beta.to(device))


def inpainted_sample(policy: Any, prefix: Any, noise: torch.Tensor, inpainting: Inpainting, *,
                     grid: DenoiseGrid | None = None) -> GuidedSample:
    """The policy's ODE chunk steered onto the current chunk's remaining actions: real-time chunking's
    guided velocity (`InpaintGuidedVelocity`) at every step. Rows with zero weights get the plain ODE
    chunk. Costs one backward through the action expert per step; not under `torch.inference_mode()`."""
    stats = GuidanceStats(batch_size=noise.shape[0])
    velocity_fn = counted_velocity(policy_velocity_fn(policy, prefix, with_hidden=False), stats)
    guided = InpaintGuidedVelocity(velocity_fn, inpainting.target, inpainting.weights, inpainting.beta, stats)
    chain = sample(guided, grid or default_grid(policy), ODERule(), "none", noise=noise)
    return GuidedSample(actions=chain.actions, chain=chain, q=None, stats=stats)
