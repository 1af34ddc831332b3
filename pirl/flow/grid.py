"""The denoising time grid shared by sampling and log-prob recomputation (METHODS.md §1).

Convention (openpi): t = 1 is pure noise, t = 0 is the clean action chunk; sampling walks the grid
1 = t_0 > t_1 > ... > t_K = 0 and step k has size d_k = t_k - t_{k+1} > 0.

One frozen `DenoiseGrid` object travels inside every `Chain`, so the log-prob of a stored transition is
always recomputed at exactly the times it was sampled at (sampling on i/(K-1) and recomputing on i/K
is a known bug of public code, METHODS.md §1).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class DenoiseGrid:
    """Times t_0 > t_1 > ... > t_K of one denoising run (METHODS.md §1).

    `times` is stored as a tuple of Python floats (float64) so the object is hashable, immutable and
    device-free; `times_tensor` / `steps_tensor` cast it for a computation. Build it with `uniform(K)`
    (π0's schedule) or `from_times(...)` (any strictly decreasing schedule inside [0, 1]).
    """

    times: tuple[float, ...]

    def __post_init__(self) -> None:
        times = tuple(float(t) for t in self.times)
        object.__setattr__(self, "times", times)
        if len(times) < 2:
            raise ValueError(f"a grid needs at least two times (one step), got {times}")
        if not all(0.0 <= t <= 1.0 for t in times):
            raise ValueError(f"grid times must lie in [0, 1], got {times}")
        if not all(a > b for a, b in zip(times[:-1], times[1:])):
            raise ValueError(f"grid times must be strictly decreasing (t=1 noise -> t=0 data), got {times}")

    @classmethod
    def uniform(cls, num_steps: int) -> "DenoiseGrid":
        """K equal steps from t = 1 to t = 0: t_k = 1 - k / K (π0 / openpi inference)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        # 1 - k/K rather than accumulating dt, so t_K is exactly 0 and every t_k is correctly rounded.
        return cls(tuple(1.0 - k / num_steps for k in range(num_steps + 1)))

    @classmethod
    def from_times(cls, times: Sequence[float] | torch.Tensor) -> "DenoiseGrid":
        """Any strictly decreasing schedule t_0 > ... > t_K inside [0, 1]."""
        if isinstance(times, torch.Tensor):
            times = times.detach().double().cpu().tolist()
        return cls(tuple(times))

    @property
    def num_steps(self) -> int:
        """K, the number of denoising steps."""
        return len(self.times) - 1

    @property
    def steps(self) -> tuple[float, ...]:
        """Step sizes d_k = t_k - t_{k+1} > 0, k = 0..K-1."""
        return tuple(a - b for a, b in zip(self.times[:-1], self.times[1:]))

    def times_tensor(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """[K+1] tensor of t_0..t_K."""
        return torch.tensor(self.times, dtype=torch.float64, device=device).to(dtype)

    def steps_tensor(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """[K] tensor of d_0..d_{K-1} (differences taken in float64, then cast)."""
        return torch.tensor(self.steps, dtype=torch.float64, device=device).to(dtype)
