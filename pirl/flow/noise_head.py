"""Learned exploration-noise head for Flow-Noise (METHODS.md §3).

πRL reads the action expert's hidden state per action token through an MLP 128-64-32 with tanh and
bounds the std to [0.08, 0.16]; ReinFlow reads (time embedding, observation embedding) with bounds
[0.10, 0.24]. `NoiseHead` reads per-token hidden features (optional) and time features (sinusoidal or
the scalar t, broadcast over the H action tokens); it has no separate observation input. It outputs
one std per action element [N, H, D], squashed in log space into [std_min, std_max].
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .steps import squash_log_std


def sinusoidal_time_features(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """[N] times -> [N, dim] sin/cos features (transformer-style frequencies); dim must be even."""
    if dim % 2:
        raise ValueError(f"sinusoidal feature dim must be even, got {dim}")
    half = dim // 2
    # Times live in [0, 1]; scale so the fastest frequency still resolves steps of ~1/1000.
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = (t.to(torch.float64)[:, None] * 1000.0) * frequencies[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).to(t.dtype)


class NoiseHead(nn.Module):
    """sigma_phi(hidden, t) -> std [N, H, D] in [std_min, std_max] (METHODS.md §3).

    Args:
        action_dim: D, one std per action dim (padded dims included; they are masked in reductions).
        hidden_dim: W, width of the per-token features (the action expert's hidden states); 0 for none.
        time_features: "sinusoidal" (time_dim sin/cos features), "scalar" (t itself) or "none".
        mlp_widths: hidden layer widths (tanh after each); πRL uses (128, 64, 32).
        std_min, std_max: output bounds; πRL uses (0.08, 0.16). Floats, or one value per action dim
            (e.g. bounds set in the env's raw units and converted per dim, METHODS.md §2).
        init_scale: scale of the last layer's initial weights; 0 starts every std at
            sqrt(std_min * std_max), the log-space midpoint.
    """

    def __init__(
        self,
        action_dim: int,
        hidden_dim: int = 0,
        *,
        time_features: str = "sinusoidal",
        time_dim: int = 16,
        mlp_widths: Sequence[int] = (128, 64, 32),
        std_min: float | Sequence[float] = 0.08,
        std_max: float | Sequence[float] = 0.16,
        init_scale: float = 0.01,
    ) -> None:
        super().__init__()
        lo, hi = torch.as_tensor(std_min, dtype=torch.float32), torch.as_tensor(std_max, dtype=torch.float32)
        if lo.ndim > 1 or hi.ndim > 1 or (lo.ndim == 1 and lo.shape[0] != action_dim) or \
                (hi.ndim == 1 and hi.shape[0] != action_dim):
            raise ValueError(f"std bounds must be floats or one value per action dim ({action_dim})")
        if not bool(((0 < lo) & (lo < hi)).all()):
            raise ValueError(f"need 0 < std_min < std_max, got {std_min}, {std_max}")
        if time_features not in ("sinusoidal", "scalar", "none"):
            raise ValueError(f"time_features must be sinusoidal, scalar or none, got {time_features!r}")
        self.action_dim = action_dim
        self.hidden_dim = hidden_dim
        self.time_features = time_features
        self.time_dim = {"sinusoidal": time_dim, "scalar": 1, "none": 0}[time_features]
        # Not saved with the weights: the bounds come from the sampler config (and norm stats).
        self.register_buffer("std_min", lo, persistent=False)
        self.register_buffer("std_max", hi, persistent=False)
        in_dim = hidden_dim + self.time_dim
        if in_dim == 0:
            raise ValueError("the noise head needs at least one input (hidden or time)")
        layers: list[nn.Module] = []
        for width in mlp_widths:
            layers += [nn.Linear(in_dim, width), nn.Tanh()]
            in_dim = width
        self.mlp = nn.Sequential(*layers)
        self.out = nn.Linear(in_dim, action_dim)
        with torch.no_grad():
            self.out.weight.mul_(init_scale)
            self.out.bias.zero_()

    def time_embedding(self, t: torch.Tensor) -> torch.Tensor | None:
        if self.time_features == "sinusoidal":
            return sinusoidal_time_features(t, self.time_dim)
        if self.time_features == "scalar":
            return t[:, None]
        return None

    def log_std(
        self,
        hidden: torch.Tensor | None,
        t: torch.Tensor,
        *,
        action_shape: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Bounded log std [N, H, D]. `action_shape` = (H, D) is needed only when there is no hidden."""
        n = t.shape[0]
        if self.hidden_dim:
            if hidden is None:
                raise ValueError("this noise head reads per-token hidden features but none were given")
            horizon = hidden.shape[1]
        elif action_shape is not None:
            horizon = action_shape[0]
        else:
            raise ValueError("action_shape is required when the noise head reads no hidden features")
        dtype = self.out.weight.dtype
        parts = []
        if self.hidden_dim:
            parts.append(hidden.to(dtype))
        time_embedding = self.time_embedding(t.to(dtype))
        if time_embedding is not None:
            parts.append(time_embedding[:, None, :].expand(n, horizon, -1))
        raw = self.out(self.mlp(torch.cat(parts, dim=-1)))
        return squash_log_std(raw, self.std_min, self.std_max)

    def forward(self, hidden, t, *, action_shape=None) -> torch.Tensor:
        """Std [N, H, D], clamped so exp() rounding can never leave [std_min, std_max]."""
        std = torch.exp(self.log_std(hidden, t, action_shape=action_shape))
        return std.clamp(self.std_min, self.std_max)
