"""The seam between guidance and the critic: a Q function already bound to a batch of observations.

Guidance code never sees observations, critic features or ensembles. It receives a `QFunction`:

    q(actions [B, H, D]) -> Q values [B]

bound to the B observations of the batch (`pirl.critic` builds it: min over its 2 target heads, reading
only the executed sub-chunk and the real action dims). Actions are in the policy's normalised units.
Gradient methods differentiate it with respect to `actions`, so it must be differentiable there and
must not detach its input.
"""
from __future__ import annotations

from typing import Protocol

import torch


class QFunction(Protocol):
    """Q(obs_b, actions_b) for the B observations the function was bound to; [B, H, D] -> [B]."""

    def __call__(self, actions: torch.Tensor) -> torch.Tensor: ...


def tile_q(q_fn: QFunction, num_samples: int) -> QFunction:
    """Q for N candidate chunks per observation, laid out sample-major: row j * B + b is candidate j of obs b.

    `q_fn` is bound to B observations, so the [N * B] rows are scored as N calls of B rows each
    (gradients flow through). The layout matches `Prefix.select(arange(B).repeat(N))`.
    """
    if num_samples == 1:
        return q_fn

    def tiled(actions: torch.Tensor) -> torch.Tensor:
        if actions.shape[0] % num_samples:
            raise ValueError(f"{actions.shape[0]} rows are not {num_samples} candidates per observation")
        per_candidate = actions.reshape(num_samples, actions.shape[0] // num_samples, *actions.shape[1:])
        return torch.cat([q_fn(chunk) for chunk in per_candidate])

    return tiled
