"""Denoising step rules as pure functions (METHODS.md §1, §2, §3).

Every function takes the current latent x [N, H, D], the velocity v [N, H, D] evaluated at (x, t),
the step's start time t and size dt = t_k - t_{k+1} > 0 (each a Python float or a tensor [N], one per
row), and returns the next latent's mean (and std for stochastic rules). Time convention is openpi's:
t = 1 noise, t = 0 data, the Euler step is x - dt * v.

The rule objects at the bottom (`ODERule`, `SDERule`, `LearnedNoiseRule`) bundle a step function with
its parameters so the sampler and the log-prob recomputation call the very same code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_HALF_LOG_2PI_E = 0.5 * math.log(2.0 * math.pi * math.e)


def per_row(value: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A per-row scalar ([N] tensor) reshaped to broadcast against `like` [N, ...]; floats pass through."""
    if not isinstance(value, torch.Tensor):
        return float(value)
    value = value.to(dtype=like.dtype, device=like.device)
    if value.ndim == 0:
        return value
    return value.reshape(value.shape[0], *([1] * (like.ndim - 1)))


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: float | torch.Tensor) -> torch.Tensor:
    """ODE (Euler) step x_{k+1} = x_k - d_k * v_k (METHODS.md §1)."""
    return x - per_row(dt, x) * v


def clean_estimate(x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """One-step clean action estimate a_hat = x - t * v (METHODS.md §1)."""
    return x - per_row(t, x) * v


def noise_estimate(x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """One-step noise estimate e_hat = x + (1 - t) * v (METHODS.md §1)."""
    return x + (1.0 - per_row(t, x)) * v


def sde_sigma(t: float | torch.Tensor, dt: float | torch.Tensor, a_noise: float) -> float | torch.Tensor:
    """Flow-GRPO noise schedule sigma_t = a_noise * sqrt(t / (1 - t)) with the t = 1 cap (METHODS.md §2).

    At t = 1 the schedule diverges; the denominator 1 - t is replaced by 1 - t_{k+1} = dt there, so the
    first step's noise variance sigma_0^2 * d_0 equals a_noise^2.
    """
    if isinstance(t, torch.Tensor) or isinstance(dt, torch.Tensor):
        t = torch.as_tensor(t)
        dt = torch.as_tensor(dt, dtype=t.dtype, device=t.device)
        denominator = torch.where(t >= 1.0, dt, 1.0 - t)
        return a_noise * torch.sqrt(t / denominator)
    denominator = dt if t >= 1.0 else 1.0 - t
    return a_noise * math.sqrt(t / denominator)


class StepDistribution(NamedTuple):
    """Gaussian transition x_{k+1} ~ N(mean, std^2); std is None for a deterministic (ODE) step.

    `std` has the shape of `mean` (possibly an expanded view of a per-row value)."""

    mean: torch.Tensor
    std: torch.Tensor | None


def sde_step(
    x: torch.Tensor, v: torch.Tensor, t: float | torch.Tensor, dt: float | torch.Tensor, a_noise: float
) -> StepDistribution:
    """Flow-SDE transition with the ODE's marginals (METHODS.md §2, Flow-GRPO form).

        mu_k  = x_k - d_k * [ v_k + (sigma_k^2 / (2 t_k)) * (x_k + (1 - t_k) * v_k) ]
        std_k = sigma_k * sqrt(d_k)

    written as  mu_k = Euler step - (d_k sigma_k^2 / (2 t_k)) * e_hat  so that a_noise = 0 makes the
    correction exactly zero and the mean is the Euler step bit for bit.
    """
    t_row, dt_row = per_row(t, x), per_row(dt, x)
    sigma = sde_sigma(t_row, dt_row, a_noise)
    score_coefficient = dt_row * sigma**2 / (2.0 * t_row)
    mean = euler_step(x, v, dt_row) - score_coefficient * noise_estimate(x, v, t_row)
    if isinstance(dt_row, torch.Tensor):
        std = sigma * torch.sqrt(dt_row)
    else:
        std = torch.as_tensor(sigma * math.sqrt(dt_row), dtype=x.dtype, device=x.device)
    return StepDistribution(mean, torch.as_tensor(std, dtype=x.dtype, device=x.device).expand_as(x))


def squash_log_std(raw: torch.Tensor, std_min: float | torch.Tensor, std_max: float | torch.Tensor) -> torch.Tensor:
    """Noise-head output -> log std in [log s_min, log s_max] (METHODS.md §3); the bounds may be
    tensors [D] (one per action dim, e.g. set in the env's raw units).

        log_std = log s_min + (log s_max - log s_min) * (tanh(raw) + 1) / 2
    """
    log_min = torch.log(torch.as_tensor(std_min, dtype=raw.dtype, device=raw.device))
    log_max = torch.log(torch.as_tensor(std_max, dtype=raw.dtype, device=raw.device))
    return log_min + (log_max - log_min) * (torch.tanh(raw) + 1.0) * 0.5


def learned_noise_step(x: torch.Tensor, v: torch.Tensor, dt: float | torch.Tensor, std: torch.Tensor) -> StepDistribution:
    """Flow-Noise transition (METHODS.md §3): mean = the Euler step (no drift correction), std given."""
    return StepDistribution(euler_step(x, v, dt), std.expand_as(x))


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-element log N(sample; mean, std^2) (METHODS.md §2), unreduced.

        -(x - mu)^2 / (2 std^2) - log std - 0.5 log(2 pi)

    Gradients flow into mean and std; callers pass the stored sample detached.
    """
    z = (sample - mean) / std
    return -0.5 * z * z - torch.log(std) - _HALF_LOG_2PI


def standard_normal_log_prob(sample: torch.Tensor) -> torch.Tensor:
    """Per-element log N(x_0; 0, I): the initial-noise term of the Flow-Noise chain (METHODS.md §3)."""
    return -0.5 * sample * sample - _HALF_LOG_2PI


def gaussian_entropy(std: torch.Tensor) -> torch.Tensor:
    """Per-element entropy 0.5 log(2 pi e std^2) of a Gaussian step (METHODS.md §3)."""
    return torch.log(std) + _HALF_LOG_2PI_E


# --------------------------------------------------------------------------------------------------
# Step rules: a step function plus its parameters. `step` is called with the (gathered) rows that are
# stochastic; non-stochastic steps of any rule are plain Euler steps (hybrid ODE-SDE, METHODS.md §2).


@dataclass(frozen=True)
class ODERule:
    """Deterministic Euler steps (METHODS.md §1); a chain sampled with it has no stochastic step."""

    needs_hidden = False

    @property
    def stochastic(self) -> bool:
        return False

    def step(self, x, v, t, dt, hidden=None) -> StepDistribution:
        return StepDistribution(euler_step(x, v, dt), None)


@dataclass(frozen=True)
class SDERule:
    """Flow-SDE steps with noise level a_noise (METHODS.md §2); a_noise = 0 is the ODE."""

    a_noise: float = 0.5
    needs_hidden = False

    def __post_init__(self) -> None:
        if self.a_noise < 0:
            raise ValueError(f"a_noise must be >= 0, got {self.a_noise}")

    @property
    def stochastic(self) -> bool:
        return self.a_noise > 0

    def step(self, x, v, t, dt, hidden=None) -> StepDistribution:
        return sde_step(x, v, t, dt, self.a_noise)


@dataclass(frozen=True, eq=False)
class FixedNoiseRule:
    """Gaussian exploration of a set std around the Euler step (METHODS.md §2, "Exploration in the env's
    units"): mean x - d v, std `step_std` [D] per action dim in normalised units (converted from the
    env's raw units by `vla.normalize.raw_to_normalized_std`). Put on the last step, the executed action
    is the ODE action plus N(0, r^2) in raw units, as a Gaussian PPO policy explores.

    Why not Flow-SDE's drift-corrected mean with this std: the correction moves the mean by
    std^2 / (2 t) times the noise estimate. At the last step of K = 4 (t = 0.25) and a std of one
    normalised unit that is 2 units, a larger displacement than the noise itself; on the PickCube
    policy, 5 mm per step in raw units that way took rollout success from ~0.4 to 0/16.
    """

    step_std: torch.Tensor
    needs_hidden = False

    def __post_init__(self) -> None:
        if self.step_std.ndim != 1 or bool((self.step_std <= 0).any()):
            raise ValueError("step_std must be a 1-D tensor of positive stds, one per action dim")

    @property
    def stochastic(self) -> bool:
        return True

    def step(self, x, v, t, dt, hidden=None) -> StepDistribution:
        return learned_noise_step(x, v, dt, self.step_std.to(dtype=x.dtype, device=x.device))


@dataclass(frozen=True, eq=False)
class LearnedNoiseRule:
    """Flow-Noise steps (METHODS.md §3): Euler mean, std from `noise_head(hidden, t)`."""

    noise_head: nn.Module

    @property
    def stochastic(self) -> bool:
        return True

    @property
    def needs_hidden(self) -> bool:
        return getattr(self.noise_head, "hidden_dim", 0) > 0

    def step(self, x, v, t, dt, hidden=None) -> StepDistribution:
        t_rows = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(x.shape[0])
        std = self.noise_head(hidden, t_rows, action_shape=tuple(x.shape[1:]))
        return learned_noise_step(x, v, dt, std.to(x.dtype))


StepRule = ODERule | SDERule | FixedNoiseRule | LearnedNoiseRule
