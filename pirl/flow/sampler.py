"""The stochastic flow sampler: velocity field + grid + step rule + step mask -> `Chain` (METHODS.md §1-3).

`velocity_fn(x [B,H,D], t [B]) -> v [B,H,D]` is a closure over the policy prefix (see `policy.py`) or a
closed-form field in tests. It may instead return `(v, hidden)` or an object with `.velocity` and
`.hidden` (the action expert's `ExpertOutput`): the hidden states [B,H,W] then feed a learned noise
head without a second expert pass (a rule whose head reads them needs a field that returns them).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from vla import draw

from .chain import Chain
from .grid import DenoiseGrid
from .masks import make_step_mask
from .steps import ODERule, StepRule, euler_step, gaussian_log_prob

VelocityFn = Callable[[torch.Tensor, torch.Tensor], object]
# A velocity transform (x, t, v) -> v' is a hook for test-time guidance (QGF, CFG, METHODS.md §5).
VelocityTransform = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def evaluate_velocity(
    velocity_fn: VelocityFn,
    x: torch.Tensor,
    t: torch.Tensor,
    velocity_transforms: Sequence[VelocityTransform] = (),
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """v (after the transforms, in order) and the per-token hidden states if the field returned them."""
    out = velocity_fn(x, t)
    if isinstance(out, torch.Tensor):
        v, hidden = out, None
    elif isinstance(out, tuple):
        v, hidden = out
    else:
        v, hidden = out.velocity, getattr(out, "hidden", None)
    for transform in velocity_transforms:
        v = transform(x, t, v)
    return v, hidden


def noise_head_inputs(rule: StepRule, hidden: torch.Tensor | None) -> torch.Tensor | None:
    """Hidden features for the rule: those the field returned (None if it returned none and the rule
    does not read them)."""
    if rule.needs_hidden and hidden is None:
        raise ValueError("the step rule's noise head needs per-token features: return (v, hidden) from "
                         "velocity_fn")
    return hidden


@torch.no_grad()
def sample(
    velocity_fn: VelocityFn,
    grid: DenoiseGrid,
    rule: StepRule = ODERule(),
    step_mask: torch.Tensor | str = "all",
    *,
    noise: torch.Tensor | None = None,
    batch_size: int | None = None,
    action_shape: tuple[int, int] | None = None,
    generator: torch.Generator | None = None,
    velocity_transforms: Sequence[VelocityTransform] = (),
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Chain:
    """Run one denoising chain from t = 1 to t = 0 and record its stochastic transitions.

    Args:
        velocity_fn: the field, see the module docstring.
        grid: times t_0..t_K; stored in the chain and reused by `log_prob`.
        rule: `ODERule()`, `SDERule(a_noise)` or `LearnedNoiseRule(head)`; applied at masked steps,
            every other step is Euler.
        step_mask: bool [B, K], or a kind for `make_step_mask` ("hybrid", "window" (width 1), "all",
            "none"). A rule that cannot make noise (ODE, a_noise = 0) yields an all-False mask: the
            chain then honestly has no stochastic step.
        noise: initial x_0 [B, H, D]; drawn from N(0, I) with `generator` when None (then batch_size and
            action_shape give its shape).
        generator: drives x_0, the mask draw (if a kind is given) and the step noise, in that order.
        velocity_transforms: callables (x, t, v) -> v' applied in order to every velocity (guidance).
            Runs under no_grad; a transform that needs autograd enables it itself.

    Returns:
        A `Chain` with detached latents [B, K+1, H, D] and per-element rollout log-probs of the
        stochastic steps.
    """
    if noise is None:
        if batch_size is None or action_shape is None:
            raise ValueError("pass the initial noise or both batch_size and action_shape")
        noise = draw.normal((batch_size, *action_shape), generator, device, dtype)
    x = noise.detach()
    batch_size, num_steps = x.shape[0], grid.num_steps
    if isinstance(step_mask, str):
        step_mask = make_step_mask(step_mask, batch_size, num_steps, generator=generator, device=x.device)
    step_mask = step_mask.to(device=x.device, dtype=torch.bool)
    if tuple(step_mask.shape) != (batch_size, num_steps):
        raise ValueError(f"step_mask must be [{batch_size}, {num_steps}], got {tuple(step_mask.shape)}")
    if not rule.stochastic:
        step_mask = torch.zeros_like(step_mask)

    times = grid.times_tensor(x.dtype, x.device)
    steps = grid.steps_tensor(x.dtype, x.device)
    # An ODE chain never reads the mask's values, so it also runs on `meta` tensors (shape checks of the
    # full π0 without memory).
    num_stochastic = int(step_mask.sum()) if rule.stochastic else 0
    # Row r of means/stds/log_probs belongs to the r-th True entry of step_mask in row-major order.
    row_of = torch.full((batch_size, num_steps), -1, dtype=torch.long, device=x.device)
    row_of[step_mask] = torch.arange(num_stochastic, device=x.device)
    means = x.new_zeros((num_stochastic, *x.shape[1:]))
    stds = x.new_zeros((num_stochastic, *x.shape[1:]))
    log_probs = x.new_zeros((num_stochastic, *x.shape[1:]))

    latents = [x]
    for k in range(num_steps):
        t = times[k].expand(batch_size)
        v, hidden = evaluate_velocity(velocity_fn, x, t, velocity_transforms)
        x_next = euler_step(x, v, steps[k])
        stochastic = step_mask[:, k]
        if num_stochastic and stochastic.any():
            rows = stochastic.nonzero(as_tuple=True)[0]
            x_rows, v_rows, t_rows = x[rows], v[rows], t[rows]
            hidden_rows = noise_head_inputs(rule, None if hidden is None else hidden[rows])
            dist = rule.step(x_rows, v_rows, t_rows, steps[k].expand(rows.shape[0]), hidden_rows)
            xi = draw.normal(x_rows.shape, generator, x.device, x.dtype)
            sampled = dist.mean + dist.std * xi
            x_next = x_next.index_copy(0, rows, sampled)
            out_rows = row_of[rows, k]
            means[out_rows] = dist.mean
            stds[out_rows] = dist.std
            # From the stored sample, exactly as `log_prob` will recompute it.
            log_probs[out_rows] = gaussian_log_prob(sampled, dist.mean, dist.std)
        x = x_next
        latents.append(x)

    return Chain(latents=torch.stack(latents, dim=1), grid=grid, step_mask=step_mask, means=means, stds=stds,
                 log_probs=log_probs)
