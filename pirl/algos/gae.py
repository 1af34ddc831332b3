"""Generalised advantage estimation over action-chunk steps (METHODS.md §4)."""
from __future__ import annotations

import torch


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    dones: torch.Tensor,
    truncations: torch.Tensor,
    last_value: torch.Tensor,
    gamma: float = 0.99,
    lam: float = 0.95,
    truncated_values: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunk-level GAE (METHODS.md §4: "GAE over chunk steps, gamma 0.99, lambda 0.95").

    One step t is one action chunk. All per-step tensors are [T, B] (time first):

    - ``rewards[t]``: reward of chunk t (summed over its executed actions).
    - ``values[t]``: V(s_t), the value of the observation chunk t was chosen from.
    - ``dones[t]``: the episode *terminated* inside chunk t (success/failure): nothing to bootstrap.
    - ``truncations[t]``: the episode was *cut* inside chunk t (time limit). The env auto-resets, so
      ``values[t + 1]`` belongs to the next episode and must not be used. If ``truncated_values`` is
      given, ``truncated_values[t]`` = V(final observation before the reset) is bootstrapped from;
      otherwise the truncation is treated like a termination (bootstrap 0). A step that is both
      done and truncated counts as done.
    - ``last_value``: [B], V of the observation after the last chunk T - 1 (bootstrap of the batch
      boundary when the episode goes on).

    Recursion, with end_t = dones_t or truncations_t and next_v_t the bootstrap value above:

        delta_t = r_t + gamma * next_v_t - V(s_t)
        A_t     = delta_t + gamma * lam * (1 - end_t) * A_{t+1}          (A_T = 0)
        returns = A + values

    Returns ``(advantages, returns)``, both [T, B], without gradients.
    """
    if rewards.dim() != 2:
        raise ValueError(f"gae: rewards must be [T, B], got {tuple(rewards.shape)}")
    for name, t in (("values", values), ("dones", dones), ("truncations", truncations)):
        if t.shape != rewards.shape:
            raise ValueError(f"gae: {name} shape {tuple(t.shape)} != rewards {tuple(rewards.shape)}")
    if last_value.shape != rewards.shape[1:]:
        raise ValueError(f"gae: last_value must be [B], got {tuple(last_value.shape)}")
    if truncated_values is not None and truncated_values.shape != rewards.shape:
        raise ValueError("gae: truncated_values must be [T, B]")

    with torch.no_grad():
        rewards, values = rewards.float(), values.float()
        done = dones.bool()
        trunc = truncations.bool() & ~done
        # Value of the observation that follows chunk t inside the same batch row.
        next_values = torch.cat([values[1:], last_value.float()[None]], dim=0)
        # Episode ends: a terminated step bootstraps nothing; a truncated one bootstraps from the
        # truncated observation's value when known, else nothing.
        boot = torch.zeros_like(next_values)
        if truncated_values is not None:
            boot = torch.where(trunc, truncated_values.float(), boot)
        next_values = torch.where(done | trunc, boot, next_values)
        not_end = (~(done | trunc)).float()

        deltas = rewards + gamma * next_values - values
        advantages = torch.zeros_like(rewards)
        running = torch.zeros_like(rewards[0])
        for t in reversed(range(rewards.shape[0])):
            running = deltas[t] + gamma * lam * not_end[t] * running
            advantages[t] = running
        return advantages, advantages + values
