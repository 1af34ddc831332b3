"""Per-sample step masks: which denoising steps of each sample are stochastic (METHODS.md §2).

A mask is a bool tensor [B, K]; True at (b, k) means sample b's transition x_k -> x_{k+1} is drawn
from the step rule's Gaussian and its log-prob enters the PPO ratio; False means a plain Euler step,
part of the environment. Hybrid (πRL Flow-SDE: one index per sample, drawn per sample rather than per
batch as RLinf does), window (MixGRPO: w consecutive steps), all (Flow-GRPO, Flow-Noise), none (ODE).
"""
from __future__ import annotations

import torch

from vla import draw


def step_index_range(num_steps: int, low: int, high: int | None, width: int = 1) -> tuple[int, int]:
    """[low, high) as non-negative step indices (negative values count from the end, as in Python),
    checked to hold a window of `width` consecutive steps."""
    high = num_steps if high is None else high
    if high < 0:
        high += num_steps
    if low < 0:
        low += num_steps
    if not 0 <= low < high <= num_steps:
        raise ValueError(f"step range [{low}, {high}) is empty or outside [0, {num_steps})")
    if not 1 <= width <= high - low:
        raise ValueError(f"window width {width} does not fit in step range [{low}, {high})")
    return low, high


def hybrid_mask(
    batch_size: int,
    num_steps: int,
    *,
    low: int = 0,
    high: int | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Exactly one stochastic step per sample, index uniform on [low, high) (default all K steps).

    `high=-1` (or K-1) excludes the last step, as some πRL configs do; `low=-1` makes the last step the
    stochastic one. For a policy that is nearly deterministic given the observation, noise injected
    before the last step is mostly undone by the remaining ODE steps (the field points back at the
    mode), so those samples carry almost no outcome signal while their log-probs still add gradient
    noise: `bench/results/noise_propagation.md`.
    """
    low, high = step_index_range(num_steps, low, high)
    index = draw.integers(low, high, (batch_size,), generator, device)
    return index_mask(index, num_steps)


def window_mask(
    batch_size: int,
    num_steps: int,
    width: int,
    *,
    low: int = 0,
    high: int | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """`width` consecutive stochastic steps per sample; the window lies inside [low, high) and its start
    is uniform over the admissible positions."""
    low, high = step_index_range(num_steps, low, high, width)
    start = draw.integers(low, high - width + 1, (batch_size, 1), generator, device)
    steps = torch.arange(num_steps, device=device)[None, :]
    return (steps >= start) & (steps < start + width)


def all_steps_mask(batch_size: int, num_steps: int, device=None) -> torch.Tensor:
    """Every step stochastic (Flow-GRPO SDE, Flow-Noise)."""
    return torch.ones(batch_size, num_steps, dtype=torch.bool, device=device)


def no_steps_mask(batch_size: int, num_steps: int, device=None) -> torch.Tensor:
    """No stochastic step: the pure ODE sampler (evaluation)."""
    return torch.zeros(batch_size, num_steps, dtype=torch.bool, device=device)


def index_mask(index: torch.Tensor, num_steps: int) -> torch.Tensor:
    """[B] step indices -> [B, K] one-hot bool mask."""
    return torch.nn.functional.one_hot(index.long(), num_steps).bool()


def make_step_mask(
    kind: str,
    batch_size: int,
    num_steps: int,
    *,
    width: int = 1,
    low: int = 0,
    high: int | None = None,
    generator: torch.Generator | None = None,
    device=None,
) -> torch.Tensor:
    """Mask by name: "hybrid", "window", "all" or "none" (for configs)."""
    if kind == "hybrid":
        return hybrid_mask(batch_size, num_steps, low=low, high=high, generator=generator, device=device)
    if kind == "window":
        return window_mask(batch_size, num_steps, width, low=low, high=high, generator=generator, device=device)
    if kind == "all":
        return all_steps_mask(batch_size, num_steps, device=device)
    if kind == "none":
        return no_steps_mask(batch_size, num_steps, device=device)
    raise ValueError(f"unknown step mask kind {kind!r}; expected hybrid, window, all or none")
