"""Pure loss and advantage functions on torch tensors: GAE, PPO, value loss, entropy, GRPO (METHODS.md §4).

Every function is registered by name (``pirl.algos.get("gae")``); hyperparameters live in the frozen
dataclasses of :mod:`pirl.algos.config`.
"""
from pirl.algos.config import GAEConfig, GRPOConfig, PPOConfig, ValueLossConfig, from_dict
from pirl.algos.gae import gae
from pirl.algos.grpo import grpo_advantages, grpo_filter
from pirl.algos.ppo import (
    approx_kl_early_stop,
    gaussian_entropy,
    ppo_policy_loss,
    reduce_log_probs,
    value_loss,
)
from pirl.algos.registry import get, names, register
from pirl.algos.stats import explained_variance, masked_mean, normalize_advantages

__all__ = [
    "GAEConfig", "GRPOConfig", "PPOConfig", "ValueLossConfig", "from_dict",
    "gae", "grpo_advantages", "grpo_filter", "approx_kl_early_stop", "gaussian_entropy",
    "ppo_policy_loss", "reduce_log_probs", "value_loss", "explained_variance", "masked_mean",
    "normalize_advantages", "get", "names", "register",
]
