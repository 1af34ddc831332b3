"""Wiring of the flow samplers to a `vla` policy (DESIGN.md "Policy" and "Chain").

Rollout: `sample_chain` runs the VLM prefix once and denoises with a velocity closure over it.
Training: `chain_log_prob` runs the prefix once per sample, repeats its rows for the gathered
(sample, step) pairs with `prefix.select`, and runs the action expert once on all of them.

The policy API used: `policy.embed_prefix(inputs) -> prefix`, `prefix.select(index)`,
`policy.expert_forward(prefix, x_t, t) -> ExpertOutput(velocity, hidden)`, `policy.velocity(prefix, x_t, t)`,
`policy.config.num_steps / action_horizon / action_dim`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from vla import draw

from .chain import Chain
from .grid import DenoiseGrid
from .likelihood import ChainLogProb, LogProbReduction, log_prob
from .masks import make_step_mask
from .sampler import VelocityFn, VelocityTransform, sample
from .steps import SDERule, StepRule


def policy_velocity_fn(policy: Any, prefix: Any, with_hidden: bool) -> VelocityFn:
    """Closure (x [B,H,D], t [B]) -> velocity (and hidden states when `with_hidden`) over a fixed prefix."""
    if with_hidden:
        def velocity_and_hidden(x: torch.Tensor, t: torch.Tensor):
            out = policy.expert_forward(prefix, x, t)
            return out.velocity, out.hidden

        return velocity_and_hidden

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return policy.velocity(prefix, x, t)

    return velocity


def default_grid(policy: Any) -> DenoiseGrid:
    """Uniform grid with the policy's configured number of denoising steps."""
    return DenoiseGrid.uniform(int(policy.config.num_steps))


def sample_chain(
    policy: Any,
    inputs: Any = None,
    *,
    prefix: Any = None,
    rule: StepRule = SDERule(0.5),
    step_mask: torch.Tensor | str = "hybrid",
    mask_low: int = 0,
    mask_high: int | None = None,
    window: int = 1,
    grid: DenoiseGrid | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    velocity_transforms: Sequence[VelocityTransform] = (),
) -> Chain:
    """Sample a `Chain` of action chunks for a batch of observations (rollout, METHODS.md §2, §3).

    Embeds the prefix once (or uses the given `prefix`, e.g. one shared with the value head); then every
    denoising step is one action-expert pass. `step_mask` is a bool [B, K] tensor or a kind ("hybrid":
    one step per sample uniform on [mask_low, mask_high); "window": `window` consecutive steps there;
    "all"; "none"). Initial noise and masks are float32 on the policy's device.
    """
    if prefix is None:
        with torch.no_grad():
            prefix = policy.embed_prefix(inputs)
    grid = grid or default_grid(policy)
    config = policy.config
    batch_size = prefix.batch_size
    device = next(policy.parameters()).device if hasattr(policy, "parameters") else None
    if noise is None:
        noise = draw.normal((batch_size, config.action_horizon, config.action_dim), generator, device)
    if isinstance(step_mask, str):
        step_mask = make_step_mask(step_mask, batch_size, grid.num_steps, width=window, low=mask_low,
                                   high=mask_high, generator=generator, device=noise.device)
    velocity_fn = policy_velocity_fn(policy, prefix, with_hidden=rule.needs_hidden)
    return sample(velocity_fn, grid, rule, step_mask, noise=noise, generator=generator,
                  velocity_transforms=velocity_transforms)


def chain_log_prob(
    policy: Any,
    inputs: Any,
    chain: Chain,
    rule: StepRule,
    reduction: LogProbReduction = LogProbReduction(),
    *,
    prefix: Any = None,
    mask_exec: torch.Tensor | None = None,
    mask_dims: torch.Tensor | None = None,
    velocity_transforms: Sequence[VelocityTransform] = (),
) -> ChainLogProb:
    """Recompute a stored chain's log-prob and entropy under the policy's current weights (training).

    One prefix forward for the batch (skipped when `prefix` is given), rows repeated with
    `prefix.select` for the (sample, step) pairs where `chain.step_mask` is True, one expert pass on
    them. Gradients reach the expert (and the prefix, if it is trainable) and the noise head.
    """
    if prefix is None:
        prefix = policy.embed_prefix(inputs)
    sample_index, _ = chain.stochastic_pairs()
    # No stochastic step: nothing is recomputed, so no rows need gathering.
    pair_prefix = prefix.select(sample_index) if sample_index.numel() else prefix
    velocity_fn = policy_velocity_fn(policy, pair_prefix, with_hidden=rule.needs_hidden)
    return log_prob(chain, velocity_fn, rule, reduction, mask_exec=mask_exec, mask_dims=mask_dims,
                    velocity_transforms=velocity_transforms)
