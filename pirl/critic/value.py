"""PPO value heads on the policy's own features (METHODS.md §4).

π0 reads the action expert: its action tokens' final hidden states, mean-pooled, from one expert pass
on a fixed input (x = 0, the noise distribution's mean, at t = 1), so V depends on the observation
only: reading the chain's random initial noise made V(s) change with the draw. π0.5 reads the VLM
prefix, mean-pooled over valid tokens. Both are recomputed identically at training, so the value at
rollout and at training is the same function (RLinf computes them differently).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vla.policy import FlowPolicy, Prefix


class ValueHead(nn.Module):
    """MLP [features] -> scalar value. `source` says which policy features it reads."""

    def __init__(self, in_dim: int, hidden: tuple[int, ...] = (256, 128), source: str = "expert"):
        super().__init__()
        if source not in ("expert", "prefix"):
            raise ValueError(f"value source must be 'expert' or 'prefix', got {source!r}")
        self.source = source
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), nn.Tanh()]
            width = h
        last = nn.Linear(width, 1)
        nn.init.zeros_(last.weight)  # start at V = 0: no arbitrary first-iteration value errors
        nn.init.zeros_(last.bias)
        self.mlp = nn.Sequential(*layers, last)

    @classmethod
    def for_policy(cls, policy: FlowPolicy, hidden: tuple[int, ...] = (256, 128)) -> "ValueHead":
        cfg = policy.config
        if cfg.variant == "pi05":
            return cls(cfg.vlm.width, hidden, source="prefix")
        return cls(cfg.expert.width, hidden, source="expert")

    def features(self, policy: FlowPolicy, prefix: Prefix) -> Tensor:
        if self.source == "prefix":
            return prefix.pooled()
        cfg, param = policy.config, next(policy.parameters())
        x = torch.zeros(prefix.batch_size, cfg.action_horizon, cfg.action_dim, device=param.device)
        ones = torch.ones(prefix.batch_size, device=param.device)
        return policy.expert_forward(prefix, x, ones).pooled()

    def forward(self, features: Tensor) -> Tensor:
        return self.mlp(features.float()).squeeze(-1)

    def value(self, policy: FlowPolicy, prefix: Prefix, detach_features: bool = False) -> Tensor:
        """V(obs) [B]. `detach_features`: the value loss trains this head only, not the policy
        features it reads."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not detach_features):
            features = self.features(policy, prefix)
        return self(features)
