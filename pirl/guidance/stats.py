"""What one guided sampling call cost and how hard it steered: counters and per-step guidance ratios.

Compute is counted in rows through each network, divided by the number of observations B, so it reads
"per chunk": plain ODE sampling is K velocity passes per chunk, best-of-N is K * N plus N critic passes,
QGF is K velocity passes plus K critic forward+backward passes. The caller measures wall time around the
call (synchronising the device first); both go into the bench's tables.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .qfunction import QFunction


@dataclass
class GuidanceStats:
    """Counters for one `guided_sample` call (a fresh object per call: no global state).

    Fields:
        batch_size: B, the number of observations (chunks) the call produced.
        velocity_rows / velocity_backward_rows: rows through the velocity network, forward / backward.
        q_rows / q_backward_rows: rows through the critic, forward / backward.
        ratios: one [rows] tensor per guided velocity evaluation, ||w g|| / ||v|| per row (kept as
            tensors so logging does not force a device sync inside the denoising loop).
    """

    batch_size: int
    velocity_rows: int = 0
    velocity_backward_rows: int = 0
    q_rows: int = 0
    q_backward_rows: int = 0
    ratios: list[torch.Tensor] = field(default_factory=list)

    def per_chunk(self) -> dict[str, float]:
        """Network passes per produced chunk: what the bench reports next to success and wall time."""
        b = max(self.batch_size, 1)
        return {
            "velocity_evals": self.velocity_rows / b,
            "velocity_backwards": self.velocity_backward_rows / b,
            "q_evals": self.q_rows / b,
            "q_backwards": self.q_backward_rows / b,
        }

    def ratio_per_step(self) -> list[float]:
        """Median over rows of ||w g|| / ||v|| at each guided step (empty for unguided methods).

        The median, because rows whose velocity is near zero make the mean meaningless."""
        return [float(r.float().median()) for r in self.ratios]

    def ratio_max_per_step(self) -> list[float]:
        """Max over rows of ||w g|| / ||v|| at each guided step."""
        return [float(r.float().max()) for r in self.ratios]


def counted_velocity(velocity_fn: Callable, stats: GuidanceStats) -> Callable:
    """`velocity_fn` that adds its batch rows to `stats.velocity_rows`; outputs pass through untouched."""
    def velocity(x: torch.Tensor, t: torch.Tensor):
        stats.velocity_rows += x.shape[0]
        return velocity_fn(x, t)

    return velocity


def counted_q(q_fn: QFunction, stats: GuidanceStats) -> QFunction:
    """`q_fn` that adds its batch rows to `stats.q_rows` (backward passes are counted where they are taken)."""
    def q(actions: torch.Tensor) -> torch.Tensor:
        stats.q_rows += actions.shape[0]
        return q_fn(actions)

    return q
