"""Pure loss and advantage functions on torch tensors: GAE, PPO, value loss, GRPO (METHODS.md §4).

Hyperparameters live in the frozen dataclasses of :mod:`pirl.algos.config`. Log-prob reductions and the
Gaussian entropy of the flow chain live in :mod:`pirl.flow.likelihood` (one implementation, used by
the PPO loss of :mod:`pirl.train.rl_core`).
"""
from pirl.algos.config import GAEConfig, GRPOConfig, PPOConfig, ValueLossConfig, from_dict
from pirl.algos.gae import gae
from pirl.algos.grpo import grpo_advantages, grpo_filter
from pirl.algos.ppo import approx_kl_early_stop, ppo_policy_loss, value_loss
from pirl.algos.stats import explained_variance, masked_mean, normalize_advantages

__all__ = [
    "GAEConfig", "GRPOConfig", "PPOConfig", "ValueLossConfig", "from_dict",
    "gae", "grpo_advantages", "grpo_filter", "approx_kl_early_stop",
    "ppo_policy_loss", "value_loss", "explained_variance", "masked_mean", "normalize_advantages",
]
