"""Stochastic flow samplers with exact log-likelihoods (METHODS.md §1-3).

    grid = DenoiseGrid.uniform(K)
    chain = sample(velocity_fn, grid, SDERule(0.5), hybrid_mask(B, K, generator=g), noise=x0, generator=g)
    out = log_prob(chain, velocity_fn, SDERule(0.5), LogProbReduction("sum", "chunk"), mask_exec=..., mask_dims=...)
    ratio = (out.log_prob - reduce_chain_log_prob(chain, ...)).exp()

With a `vla` policy: `sample_chain(policy, inputs, ...)` and `chain_log_prob(policy, inputs, chain, rule, ...)`.
"""
from .chain import Chain
from .convention import mirror_time, mirrored_velocity_from_openpi, openpi_velocity_from_mirrored
from .grid import DenoiseGrid
from .likelihood import (
    ChainLogProb,
    LogProbReduction,
    StepDistributions,
    element_mask,
    log_prob,
    recompute_steps,
    reduce_chain_log_prob,
    reduce_chain_terms,
)
from .masks import (
    all_steps_mask,
    hybrid_mask,
    index_mask,
    make_step_mask,
    no_steps_mask,
    step_index_range,
    window_mask,
)
from .noise_head import NoiseHead, sinusoidal_time_features
from .policy import chain_log_prob, sample_chain
from .sampler import evaluate_velocity, sample
from .steps import (
    FixedNoiseRule,
    LearnedNoiseRule,
    ODERule,
    SDERule,
    StepDistribution,
    StepRule,
    clean_estimate,
    euler_step,
    gaussian_entropy,
    gaussian_log_prob,
    learned_noise_step,
    noise_estimate,
    sde_sigma,
    sde_step,
    squash_log_std,
    standard_normal_log_prob,
)

__all__ = [
    "Chain", "ChainLogProb", "DenoiseGrid", "FixedNoiseRule", "LearnedNoiseRule", "LogProbReduction", "NoiseHead", "ODERule",
    "SDERule", "StepDistribution", "StepDistributions", "StepRule", "all_steps_mask", "chain_log_prob",
    "clean_estimate", "element_mask", "euler_step", "evaluate_velocity", "gaussian_entropy",
    "gaussian_log_prob", "hybrid_mask", "index_mask", "learned_noise_step", "log_prob", "make_step_mask",
    "mirror_time", "mirrored_velocity_from_openpi", "no_steps_mask", "noise_estimate",
    "openpi_velocity_from_mirrored", "recompute_steps", "reduce_chain_log_prob", "reduce_chain_terms",
    "sample", "sample_chain", "sde_sigma", "sde_step", "sinusoidal_time_features", "squash_log_std",
    "standard_normal_log_prob", "step_index_range", "window_mask",
]
