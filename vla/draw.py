"""Random draws on the generator's own device, moved to where they are used.

Rollouts, evaluation and SFT seed CPU `torch.Generator`s; torch refuses a CPU generator for a draw made
on a GPU ("Expected a 'cuda' device type for generator"). Drawing on the generator's device and moving the
result serves a policy on any device, and a seed gives the same numbers on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _source(generator: torch.Generator | None, device) -> torch.device | None:
    return generator.device if generator is not None else device


def normal(shape, generator: torch.Generator | None = None, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """N(0, I) of `shape` on `device`."""
    return torch.randn(shape, generator=generator, dtype=dtype, device=_source(generator, device)).to(device)


def uniform(shape, generator: torch.Generator | None = None, device=None) -> Tensor:
    """U[0, 1) float32 of `shape` on `device`."""
    return torch.rand(shape, generator=generator, device=_source(generator, device)).to(device)


def integers(low: int, high: int, shape, generator: torch.Generator | None = None, device=None) -> Tensor:
    """Integers uniform on [low, high) (int64) of `shape` on `device`."""
    return torch.randint(low, high, shape, generator=generator, device=_source(generator, device)).to(device)
