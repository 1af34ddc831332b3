"""Log-prob recomputation from stored chains with a small learnable field (METHODS.md §2, §3).

The field here is a plain MLP (no `vla`), so these run before and independently of the policy; the
same properties with the tiny π0 policy are in test_flow_policy.py.
"""
import dataclasses
import math

import pytest
import torch
from torch import nn

from pirl.flow import (
    DenoiseGrid,
    LearnedNoiseRule,
    LogProbReduction,
    NoiseHead,
    SDERule,
    gaussian_entropy,
    log_prob,
    make_step_mask,
    reduce_chain_log_prob,
    sample,
)

HORIZON, ACTION_DIM, WIDTH, NUM_STEPS = 4, 3, 16, 5


class ToyExpert(nn.Module):
    """Per-token MLP velocity with hidden states, a stand-in for the action expert."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Linear(ACTION_DIM + 1, WIDTH), nn.Tanh())
        self.head = nn.Linear(WIDTH, ACTION_DIM)

    def forward(self, x, t):
        features = torch.cat([x, t[:, None, None].expand(-1, x.shape[1], 1)], dim=-1)
        hidden = self.body(features)
        return self.head(hidden), hidden


def rules(seed=0):
    torch.manual_seed(seed)
    return {
        "sde": SDERule(0.5),
        "noise_hidden": LearnedNoiseRule(NoiseHead(ACTION_DIM, WIDTH, mlp_widths=(32, 16), init_scale=1.0)),
        "noise_time": LearnedNoiseRule(NoiseHead(ACTION_DIM, 0, time_features="scalar", std_min=0.1, std_max=0.24,
                                                 init_scale=1.0)),
    }


MASKS = ["hybrid", "window", "all"]


def make_chain(expert, rule, mask_kind, batch=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mask = make_step_mask(mask_kind, batch, NUM_STEPS, width=2, generator=generator)
    return sample(expert, DenoiseGrid.uniform(NUM_STEPS), rule, mask, batch_size=batch,
                  action_shape=(HORIZON, ACTION_DIM), generator=generator)


@pytest.mark.parametrize("rule_name", ["sde", "noise_hidden", "noise_time"])
@pytest.mark.parametrize("mask_kind", MASKS)
def test_recomputed_log_prob_equals_rollout_log_prob(rule_name, mask_kind):
    expert, rule = ToyExpert(), rules()[rule_name]
    chain = make_chain(expert, rule, mask_kind)
    for reduction in (LogProbReduction(), LogProbReduction("mean", "action"),
                      LogProbReduction(granularity="element", include_initial=True, step_reduce="mean")):
        out = log_prob(chain, expert, rule, reduction)
        old = reduce_chain_log_prob(chain, reduction)
        assert (out.log_prob - old).exp().sub(1).abs().max() < 1e-6
    torch.testing.assert_close(out.steps.means, chain.means, rtol=0, atol=0)
    torch.testing.assert_close(out.steps.stds, chain.stds, rtol=0, atol=0)


def test_gradients_reach_field_and_noise_head_but_not_stored_latents():
    expert, rule = ToyExpert(), rules()["noise_hidden"]
    chain = make_chain(expert, rule, "all")
    stored = chain.latents.clone()
    # even a latents tensor that requires grad must not receive any
    chain = dataclasses.replace(chain, latents=chain.latents.clone().requires_grad_(True))
    out = log_prob(chain, expert, rule)
    (out.log_prob.sum() + out.entropy.sum()).backward()
    assert chain.latents.grad is None
    assert torch.equal(chain.latents.detach(), stored)
    for module in (expert.body, expert.head, rule.noise_head.mlp, rule.noise_head.out):
        for param in module.parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0


def test_ratio_moves_after_an_update_and_mean_over_terms_rescales_log_ratio():
    """After one gradient step the ratio is no longer 1; RLinf's mean over the K+1 terms divides the
    all-steps log-ratio by K+1 exactly (METHODS.md §3)."""
    expert, rule = ToyExpert(), rules()["noise_hidden"]
    chain = make_chain(expert, rule, "all")
    summed = LogProbReduction(include_initial=True, step_reduce="sum")
    averaged = LogProbReduction(include_initial=True, step_reduce="mean")
    out = log_prob(chain, expert, rule, summed)
    out.log_prob.sum().backward()
    with torch.no_grad():
        for param in list(expert.parameters()) + list(rule.noise_head.parameters()):
            param.add_(1e-2 * param.grad)
    log_ratio_sum = log_prob(chain, expert, rule, summed).log_prob - reduce_chain_log_prob(chain, summed)
    log_ratio_mean = log_prob(chain, expert, rule, averaged).log_prob - reduce_chain_log_prob(chain, averaged)
    assert log_ratio_sum.abs().min() > 1e-3
    torch.testing.assert_close(log_ratio_mean, log_ratio_sum / (NUM_STEPS + 1), rtol=1e-4, atol=1e-6)
    # the initial-noise term has no parameters: it cancels in the summed log-ratio
    no_initial = LogProbReduction(include_initial=False)
    log_ratio_no_initial = log_prob(chain, expert, rule, no_initial).log_prob - reduce_chain_log_prob(chain, no_initial)
    torch.testing.assert_close(log_ratio_no_initial, log_ratio_sum, rtol=1e-4, atol=1e-5)


def test_entropy_is_the_masked_gaussian_entropy_of_the_noise_head():
    expert, rule = ToyExpert(), rules()["noise_hidden"]
    chain = make_chain(expert, rule, "all")
    mask_exec, mask_dims = torch.tensor([True, True, False, False]), torch.tensor([True, False, True])
    out = log_prob(chain, expert, rule, mask_exec=mask_exec, mask_dims=mask_dims)
    per_element = gaussian_entropy(chain.stds).reshape(8, NUM_STEPS, HORIZON, ACTION_DIM)
    expected = 0.5 * torch.log(2 * math.pi * math.e * chain.stds.reshape(per_element.shape) ** 2)
    torch.testing.assert_close(per_element, expected)
    weight = (mask_exec[:, None] & mask_dims[None, :]).float()
    torch.testing.assert_close(out.entropy, (per_element * weight).sum((1, 2, 3)))


def test_noise_head_std_stays_in_bounds_and_reaches_them():
    torch.manual_seed(0)
    head = NoiseHead(ACTION_DIM, WIDTH, std_min=0.08, std_max=0.16, init_scale=50.0)
    hidden = 100.0 * torch.randn(256, HORIZON, WIDTH)
    std = head(hidden, torch.rand(256))
    assert std.shape == (256, HORIZON, ACTION_DIM)
    assert std.min() >= 0.08 and std.max() <= 0.16
    assert std.min() < 0.081 and std.max() > 0.159  # saturates at both ends, within the bounds
    neutral = NoiseHead(ACTION_DIM, WIDTH, init_scale=0.0)(hidden, torch.rand(256))
    torch.testing.assert_close(neutral, torch.full_like(neutral, math.sqrt(0.08 * 0.16)))
    # the std depends on time through the sinusoidal features
    head_t = NoiseHead(ACTION_DIM, 0, init_scale=1.0)
    std_t = head_t(None, torch.tensor([0.1, 0.9]), action_shape=(HORIZON, ACTION_DIM))
    assert not torch.allclose(std_t[0], std_t[1])


def test_velocity_transforms_are_applied_and_must_be_repeated_for_ratio_one():
    expert, rule = ToyExpert(), SDERule(0.5)
    shift = torch.tensor([0.3, -0.2, 0.1])

    def guide(x, t, v):
        return v - shift

    plain = make_chain(expert, rule, "all", seed=3)
    generator = torch.Generator().manual_seed(3)
    mask = make_step_mask("all", 8, NUM_STEPS, width=2, generator=generator)
    guided = sample(expert, DenoiseGrid.uniform(NUM_STEPS), rule, mask, batch_size=8,
                    action_shape=(HORIZON, ACTION_DIM), generator=generator, velocity_transforms=[guide])
    assert torch.equal(guided.latents[:, 0], plain.latents[:, 0])
    assert (guided.actions - plain.actions).abs().max() > 0.05
    same = log_prob(guided, expert, rule, velocity_transforms=[guide]).log_prob
    assert (same - reduce_chain_log_prob(guided)).exp().sub(1).abs().max() < 1e-6
    without = log_prob(guided, expert, rule).log_prob
    assert (without - reduce_chain_log_prob(guided)).abs().max() > 1e-2
