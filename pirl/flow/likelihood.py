"""Log-likelihoods of stored chains under current parameters, and their reductions (METHODS.md §2-4).

`recompute_steps` gathers the (sample, step) pairs where the chain's mask is True and evaluates the
velocity field (and noise head) on them as ONE batch, then scores the stored x_{k+1} under the
recomputed Gaussian. Gradients flow into the means and stds, never into the stored latents.

`LogProbReduction` makes every reduction explicit:

    granularity  "chunk"   -> [B]        one log-prob per action chunk (one PPO ratio per chunk)
                 "action"  -> [B, H]     one per action step
                 "element" -> [B, H, D]  one per element (advantage broadcast)
    reduce       "sum" | "mean" over the executed action steps x real action dims inside the granularity
                 (mask_exec [H] or [B, H], mask_dims [D] or [B, D]); masked elements are 0 at "element".
    step_reduce  "sum" | "mean" over the chain's terms: the stochastic steps of the sample, plus the
                 initial-noise term when include_initial. Flow-Noise's joint likelihood (METHODS.md §3)
                 is include_initial=True, step_reduce="sum"; RLinf's average over the K+1 terms is
                 step_reduce="mean" (it rescales the log-ratio by 1/(K+1) and loosens the PPO clip).
    include_initial  add log N(x_0; 0, I). It has no parameters, so it cancels in a ratio under "sum";
                 it matters for absolute values and for the count under "mean".
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import torch

from .chain import Chain
from .sampler import VelocityFn, VelocityTransform, evaluate_velocity, noise_head_inputs
from .steps import StepRule, gaussian_entropy, gaussian_log_prob, standard_normal_log_prob

_GRANULARITIES = ("chunk", "action", "element")


@dataclass(frozen=True)
class LogProbReduction:
    """How per-element step log-probs become the numbers PPO uses (see module docstring)."""

    reduce: str = "sum"
    granularity: str = "chunk"
    include_initial: bool = False
    step_reduce: str = "sum"

    def __post_init__(self) -> None:
        if self.reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {self.reduce!r}")
        if self.step_reduce not in ("sum", "mean"):
            raise ValueError(f"step_reduce must be 'sum' or 'mean', got {self.step_reduce!r}")
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {self.granularity!r}")


def element_mask(
    batch_size: int,
    horizon: int,
    action_dim: int,
    mask_exec: torch.Tensor | None = None,
    mask_dims: torch.Tensor | None = None,
    device=None,
) -> torch.Tensor:
    """Bool [B, H, D]: executed action step (mask_exec [H] or [B, H]) and real action dim (mask_dims
    [D] or [B, D]); None means all."""
    mask = torch.ones(batch_size, horizon, action_dim, dtype=torch.bool, device=device)
    if mask_exec is not None:
        mask_exec = mask_exec.to(device=device).bool()
        mask = mask & (mask_exec[None, :, None] if mask_exec.ndim == 1 else mask_exec[:, :, None])
    if mask_dims is not None:
        mask_dims = mask_dims.to(device=device).bool()
        mask = mask & (mask_dims[None, None, :] if mask_dims.ndim == 1 else mask_dims[:, None, :])
    return mask


def reduce_chain_terms(
    step_values: torch.Tensor,
    sample_index: torch.Tensor,
    batch_size: int,
    reduction: LogProbReduction,
    *,
    initial_values: torch.Tensor | None = None,
    mask_exec: torch.Tensor | None = None,
    mask_dims: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduce per-element values of stochastic steps [N, H, D] (rows belong to samples `sample_index`)
    to the reduction's granularity (METHODS.md §3, §4; see the module docstring).

    `initial_values` [B, H, D] is the initial-noise term, used when reduction.include_initial.
    """
    horizon, action_dim = step_values.shape[1:]
    per_element = step_values.new_zeros((batch_size, horizon, action_dim)).index_add(0, sample_index, step_values)
    terms = torch.bincount(sample_index, minlength=batch_size).to(step_values.dtype)
    if reduction.include_initial:
        if initial_values is None:
            raise ValueError("include_initial needs the initial-noise term")
        per_element = per_element + initial_values
        terms = terms + 1
    if reduction.step_reduce == "mean":
        per_element = per_element / terms.clamp(min=1)[:, None, None]
    mask = element_mask(batch_size, horizon, action_dim, mask_exec, mask_dims, device=step_values.device)
    per_element = torch.where(mask, per_element, torch.zeros_like(per_element))
    if reduction.granularity == "element":
        return per_element
    sum_dims = (-1,) if reduction.granularity == "action" else (-2, -1)
    total = per_element.sum(dim=sum_dims)
    if reduction.reduce == "mean":
        total = total / mask.sum(dim=sum_dims).clamp(min=1).to(total.dtype)
    return total


def reduce_chain_log_prob(
    chain: Chain,
    reduction: LogProbReduction = LogProbReduction(),
    *,
    step_log_probs: torch.Tensor | None = None,
    mask_exec: torch.Tensor | None = None,
    mask_dims: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reduced log-prob of a chain: its stored rollout log-probs (the PPO "old" log-prob) or the given
    recomputed `step_log_probs` [N, H, D] (METHODS.md §2, §3)."""
    values = chain.log_probs if step_log_probs is None else step_log_probs
    sample_index, _ = chain.stochastic_pairs()
    initial = standard_normal_log_prob(chain.initial_noise) if reduction.include_initial else None
    return reduce_chain_terms(values, sample_index, chain.batch_size, reduction, initial_values=initial,
                              mask_exec=mask_exec, mask_dims=mask_dims)


@dataclass
class StepDistributions:
    """Recomputed Gaussians of a chain's stochastic steps, rows in `chain.stochastic_pairs()` order."""

    sample_index: torch.Tensor  # [N]
    step_index: torch.Tensor  # [N]
    means: torch.Tensor  # [N, H, D]
    stds: torch.Tensor  # [N, H, D]
    log_probs: torch.Tensor  # [N, H, D], log N(stored x_{k+1}; mean, std^2)


def recompute_steps(
    chain: Chain,
    velocity_fn: VelocityFn,
    rule: StepRule,
    *,
    velocity_transforms: Sequence[VelocityTransform] = (),
) -> StepDistributions:
    """Re-evaluate only the stochastic transitions of a stored chain, as one batch (METHODS.md §2, §3).

    `velocity_fn` is called ONCE on the gathered rows: x_k [N, H, D] and t_k [N] of the pairs in
    `chain.stochastic_pairs()` order. A field that depends on the sample (a policy prefix) must be bound
    to that order, e.g. with `prefix.select(sample_index)` (see `policy.chain_log_prob`). Pass the same
    `velocity_transforms` as at rollout for the ratio to start at 1.
    """
    sample_index, step_index = chain.stochastic_pairs()
    latents = chain.latents.detach()
    x = latents[sample_index, step_index]
    x_next = latents[sample_index, step_index + 1]
    times = chain.grid.times_tensor(latents.dtype, latents.device)
    steps = chain.grid.steps_tensor(latents.dtype, latents.device)
    t, dt = times[step_index], steps[step_index]
    if sample_index.numel() == 0:
        empty = x.new_zeros(x.shape)
        return StepDistributions(sample_index, step_index, empty, empty, empty)
    v, hidden = evaluate_velocity(velocity_fn, x, t, velocity_transforms)
    dist = rule.step(x, v, t, dt, noise_head_inputs(rule, hidden))
    if dist.std is None:
        raise ValueError("a deterministic step rule has no log-probs; the chain's stochastic steps need the "
                         "stochastic rule they were sampled with")
    return StepDistributions(sample_index, step_index, dist.mean, dist.std,
                             gaussian_log_prob(x_next, dist.mean, dist.std))


@dataclass
class ChainLogProb:
    """Output of `log_prob`: reduced log-prob and entropy, plus the per-step distributions."""

    log_prob: torch.Tensor  # shape set by the reduction's granularity
    entropy: torch.Tensor  # same shape; 0.5 log(2 pi e std^2) over stochastic steps, no initial term
    steps: StepDistributions


def log_prob(
    chain: Chain,
    velocity_fn: VelocityFn,
    rule: StepRule,
    reduction: LogProbReduction = LogProbReduction(),
    *,
    mask_exec: torch.Tensor | None = None,
    mask_dims: torch.Tensor | None = None,
    velocity_transforms: Sequence[VelocityTransform] = (),
) -> ChainLogProb:
    """log pi(chain) under current parameters with an explicit reduction (METHODS.md §2, §3, §4).

    The log-prob reduction is `reduction`; the entropy (METHODS.md §3, meaningful for a learned noise
    head, constant for Flow-SDE) uses the same granularity / reduce / step_reduce without the initial term.
    Under unchanged parameters, `log_prob(...).log_prob == reduce_chain_log_prob(chain, reduction, ...)`.
    """
    steps = recompute_steps(chain, velocity_fn, rule, velocity_transforms=velocity_transforms)
    log_prob_value = reduce_chain_log_prob(chain, reduction, step_log_probs=steps.log_probs,
                                           mask_exec=mask_exec, mask_dims=mask_dims)
    entropy = reduce_chain_terms(gaussian_entropy(steps.stds), steps.sample_index, chain.batch_size,
                                 replace(reduction, include_initial=False), mask_exec=mask_exec, mask_dims=mask_dims)
    return ChainLogProb(log_prob_value, entropy, steps)
