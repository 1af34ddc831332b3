"""Hyperparameters of the pure functions in ``pirl.algos``, as frozen dataclasses (METHODS.md §4).

Each field is one hyperparameter with its default from METHODS.md §4. Build them from YAML/dicts with
:func:`from_dict`, which rejects unknown keys (a misspelt key is an error, never silently ignored).
The functions themselves take plain keyword arguments (the trainer passes each field by name).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# The project's one strict loader (vla.config.from_dict through pirl.config), under its old name here.
from pirl.config import load_section as from_dict  # noqa: F401


@dataclass(frozen=True)
class GAEConfig:
    """Chunk-level GAE (METHODS.md §4). One step = one action chunk."""

    gamma: float = 0.99
    """Discount per chunk step."""
    lam: float = 0.95
    """GAE lambda: 0 = one-step TD, 1 = Monte Carlo."""
    reward_scale: float = 1.0
    """Rewards are multiplied by this before GAE, so values and returns live in the scaled units.
    The value head starts at 0 and its output moves ~value_lr per Adam step: ManiSkill's dense reward
    (returns ~40 per 100-step episode) needs ~0.03 to put returns at O(1), where the Huber delta and
    the value clip are meant to act."""


@dataclass(frozen=True)
class PPOConfig:
    """Clipped PPO policy loss on action chunks (METHODS.md §4)."""

    clip_eps: float = 0.2
    """Ratio clip: the objective is flat outside [1 - clip_eps, 1 + clip_eps]."""
    dual_clip: float | None = None
    """Dual clip c > 1 (Ye et al. 2020): for negative advantages the loss is capped at c * |A|.
    None disables it."""
    normalize_advantages: bool = True
    """Normalise advantages to zero mean / unit std over the valid chunks of the (mini)batch."""
    adv_norm_eps: float = 1e-8
    """Added to the std when normalising advantages."""
    target_kl: float | None = None
    """Stop the update epochs once the approx-KL of a minibatch exceeds this; None never stops."""


@dataclass(frozen=True)
class ValueLossConfig:
    """Value loss with value clipping (METHODS.md §4)."""

    loss_type: Literal["huber", "mse"] = "huber"
    """Per-element error: Huber (quadratic within ``huber_delta``) or 0.5 * squared error."""
    huber_delta: float = 10.0
    """Huber threshold."""
    clip_eps: float | None = 0.2
    """Value clipping: new values are kept within old_values +- clip_eps (pessimistic max of the
    clipped and unclipped losses). None disables it."""
    detach_features: bool = False
    """Stop the value loss's gradient at the policy features it reads (π0: the expert's pooled tokens;
    π0.5: the prefix), so only the value head learns from it. Shared (False) is πRL's setting; with a
    small expert the value gradient dominates the clipped global grad norm and drags the velocity field."""


@dataclass(frozen=True)
class GRPOConfig:
    """Group-relative advantages (METHODS.md §4)."""

    group_size: int = 8
    """G: rollouts started from the same reset state form one group."""
    eps: float = 1e-6
    """Added to the group std."""
    unbiased_std: bool = False
    """Use the unbiased (G - 1) group std instead of the population std."""
    filter_low: float = 0.1
    """Groups whose mean success is below this are dropped (all-fail groups carry no signal)."""
    filter_high: float = 0.9
    """Groups whose mean success is above this are dropped (all-success groups carry no signal)."""

