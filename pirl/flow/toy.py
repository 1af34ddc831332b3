"""Closed-form velocity fields for tests and toys (METHODS.md §6), openpi convention (§1).

Data a ~ N(m, S) (diagonal S here, given per element) with x_t = (1 - t) a + t eps:

    Sigma_t = (1 - t)^2 S + t^2,     v(x, t) = -m + (t - (1 - t) S) / Sigma_t * (x - (1 - t) m)

Mixture sum_k pi_k N(m_k, S_k): v = sum_k w_k(x, t) v^(k)(x, t), w_k ∝ pi_k N(x; (1 - t) m_k, Sigma_{t,k}).
All functions act element-wise, so x may have any shape [B, ...]; t is [B] (or a float).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch


def _time_like(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device)
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1))) if t.ndim else t


def gaussian_velocity(x: torch.Tensor, t: torch.Tensor | float, mean: float, var: float) -> torch.Tensor:
    """Exact flow-matching velocity E[eps - a | x_t = x] for data a ~ N(mean, var) per element."""
    t = _time_like(t, x)
    sigma_t = (1 - t) ** 2 * var + t**2
    return -mean + (t - (1 - t) * var) / sigma_t * (x - (1 - t) * mean)


def gaussian_mixture_velocity(
    x: torch.Tensor,
    t: torch.Tensor | float,
    weights: Sequence[float],
    means: Sequence[float],
    variances: Sequence[float],
) -> torch.Tensor:
    """Exact velocity for a 1-D Gaussian mixture per element (posterior-weighted component fields)."""
    t = _time_like(t, x)
    log_resp, fields = [], []
    for weight, mean, var in zip(weights, means, variances):
        sigma_t = (1 - t) ** 2 * var + t**2
        centred = x - (1 - t) * mean
        log_resp.append(math.log(weight) - 0.5 * torch.log(2 * math.pi * sigma_t) - 0.5 * centred**2 / sigma_t)
        fields.append(-mean + (t - (1 - t) * var) / sigma_t * centred)
    resp = torch.softmax(torch.stack(log_resp), dim=0)
    return (resp * torch.stack(fields)).sum(dim=0)
