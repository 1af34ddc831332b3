"""The mirrored (πRL paper / QGF / ReinFlow) time convention, mapped onto openpi's (METHODS.md §1).

openpi (used everywhere in pirl):  x_t = (1 - t) a + t eps,   t = 1 noise,   v = eps - a
mirrored (πRL paper notation):     A^tau = tau A + (1 - tau) eps,   tau = 0 noise,   v = A - eps

Same latent at matching times: x_openpi(t) = A^(1 - t). Velocities: v_openpi(x, t) = -v_mirror(x, 1 - t).
Use these helpers at the boundary (importing a mirrored-convention model or formula); never mix the two
inside pirl.
"""
from __future__ import annotations

from typing import Callable

import torch

Field = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mirror_time(t: torch.Tensor | float) -> torch.Tensor | float:
    """tau = 1 - t (and back: the map is its own inverse)."""
    return 1.0 - t


def openpi_velocity_from_mirrored(v_mirror: Field) -> Field:
    """Wrap a mirrored-convention field v_mirror(x, tau) as openpi's v(x, t) = -v_mirror(x, 1 - t)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -v_mirror(x, mirror_time(t))

    return velocity


def mirrored_velocity_from_openpi(v_openpi: Field) -> Field:
    """Wrap openpi's field v(x, t) as the mirrored v_mirror(x, tau) = -v(x, 1 - tau)."""

    def velocity(x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        return -v_openpi(x, mirror_time(tau))

    return velocity
