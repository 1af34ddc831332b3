"""GRPO: group-relative advantages and group filtering (METHODS.md §4)."""
from __future__ import annotations

import torch


def _check_groups(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    if scores.dim() != 1 or group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(
            f"GRPO: scores must be [n_groups * G] with G = {group_size}, got {tuple(scores.shape)}"
        )
    return scores.float().reshape(-1, group_size)


def grpo_advantages(
    scores: torch.Tensor, group_size: int, eps: float = 1e-6, unbiased_std: bool = False
) -> torch.Tensor:
    """Group-relative advantages (METHODS.md §4 "GRPO").

    ``scores`` is [n_groups * G], one score (e.g. success or return) per rollout, laid out group by
    group: rollouts ``g*G .. g*G + G - 1`` started from the same reset state. Each gets

        A = (score - mean of its group) / (std of its group + eps)

    (population std unless ``unbiased_std``). Returns [n_groups * G]; a group with identical scores
    gets all-zero advantages.
    """
    groups = _check_groups(scores, group_size)
    mean = groups.mean(dim=1, keepdim=True)
    std = groups.std(dim=1, keepdim=True, unbiased=unbiased_std) if group_size > 1 else torch.zeros_like(mean)
    return ((groups - mean) / (std + eps)).reshape(-1)


def grpo_filter(
    success: torch.Tensor, group_size: int, low: float = 0.1, high: float = 0.9
) -> torch.Tensor:
    """Keep only groups whose mean success lies in [low, high] (METHODS.md §4 "drop groups...").

    All-fail and all-success groups have zero advantages and only add noise and cost. ``success``
    is [n_groups * G] in {0, 1} (or a success rate), laid out as in :func:`grpo_advantages`.
    Returns a bool mask per rollout, [n_groups * G] (the same for every member of a group; the
    per-group mask is ``keep.reshape(-1, G)[:, 0]``).
    """
    groups = _check_groups(success, group_size)
    rate = groups.mean(dim=1)
    keep = (rate >= low) & (rate <= high)
    return keep.repeat_interleave(group_size)
