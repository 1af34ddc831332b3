"""Flow samplers wired to the tiny π0 / π0.5 policy (DESIGN.md "Chain"; METHODS.md §2, §3)."""
import pytest
import torch

import vla.testing as vla_testing

from pirl.flow import (  # noqa: E402
    DenoiseGrid,
    LearnedNoiseRule,
    LogProbReduction,
    NoiseHead,
    ODERule,
    SDERule,
    chain_log_prob,
    reduce_chain_log_prob,
    sample_chain,
)

BATCH = 6


@pytest.fixture(scope="module", params=["pi0", "pi05"])
def policy_and_inputs(request):
    policy = vla_testing.tiny_policy(seed=0, variant=request.param)
    return policy, vla_testing.random_inputs(policy, BATCH, seed=1)


def noise_head_for(policy, seed=0):
    torch.manual_seed(seed)
    cfg = policy.config
    return NoiseHead(cfg.action_dim, cfg.expert.width, init_scale=1.0)


def rule_cases(policy):
    return [
        ("sde_hybrid", SDERule(0.5), "hybrid"),
        ("sde_window", SDERule(0.5), "window"),
        ("sde_all", SDERule(0.7), "all"),
        ("noise_all", LearnedNoiseRule(noise_head_for(policy)), "all"),
        ("noise_hybrid", LearnedNoiseRule(noise_head_for(policy)), "hybrid"),
    ]


def test_recomputed_log_probs_equal_rollout_log_probs_for_every_rule(policy_and_inputs):
    policy, inputs = policy_and_inputs
    cfg = policy.config
    mask_exec = torch.arange(cfg.action_horizon) < 5
    mask_dims = torch.arange(cfg.action_dim) < cfg.action_dim - 2
    reductions = [LogProbReduction(), LogProbReduction("mean", "action"), LogProbReduction(granularity="element"),
                  LogProbReduction(include_initial=True, step_reduce="mean")]
    generator = torch.Generator().manual_seed(0)
    for name, rule, mask in rule_cases(policy):
        chain = sample_chain(policy, inputs, rule=rule, step_mask=mask, window=3, mask_high=-1, generator=generator)
        assert chain.latents.shape == (BATCH, cfg.num_steps + 1, cfg.action_horizon, cfg.action_dim)
        assert chain.num_stochastic == {"hybrid": BATCH, "window": 3 * BATCH, "all": BATCH * cfg.num_steps}[mask]
        with torch.no_grad():
            for reduction in reductions:
                new = chain_log_prob(policy, inputs, chain, rule, reduction, mask_exec=mask_exec, mask_dims=mask_dims)
                old = reduce_chain_log_prob(chain, reduction, mask_exec=mask_exec, mask_dims=mask_dims)
                ratio = (new.log_prob - old).exp()
                assert (ratio - 1).abs().max() < 1e-6, (name, reduction)


def test_gradients_reach_expert_and_noise_head_not_stored_latents(policy_and_inputs):
    policy, inputs = policy_and_inputs
    rule = LearnedNoiseRule(noise_head_for(policy))
    chain = sample_chain(policy, inputs, rule=rule, step_mask="all", generator=torch.Generator().manual_seed(1))
    stored = chain.latents.clone()
    policy.zero_grad(set_to_none=True)
    with torch.no_grad():
        prefix = policy.embed_prefix(inputs)  # VLM frozen, as in πRL: only expert + heads train
    out = chain_log_prob(policy, inputs, chain, rule, prefix=prefix)
    (out.log_prob.mean() + 0.005 * out.entropy.mean()).backward()
    assert torch.equal(chain.latents, stored) and not chain.latents.requires_grad and chain.latents.grad is None
    expert_grads = [p.grad for n, p in policy.named_parameters() if "action_out_proj" in n or "action_in_proj" in n]
    assert expert_grads and all(g is not None and g.abs().sum() > 0 for g in expert_grads)
    for param in rule.noise_head.parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)


def test_noise_head_stds_stay_inside_bounds_on_policy_features(policy_and_inputs):
    policy, inputs = policy_and_inputs
    head = noise_head_for(policy)
    with torch.no_grad():
        head.out.weight.mul_(100.0)  # push the pre-squash output far into saturation
    rule = LearnedNoiseRule(head)
    chain = sample_chain(policy, inputs, rule=rule, step_mask="all", generator=torch.Generator().manual_seed(2))
    assert chain.stds.min() >= head.std_min and chain.stds.max() <= head.std_max
    assert chain.stds.min() < 1.01 * head.std_min and chain.stds.max() > 0.99 * head.std_max


def test_ode_chain_matches_policy_euler_sampler_and_hybrid_has_one_step_each(policy_and_inputs):
    policy, inputs = policy_and_inputs
    cfg = policy.config
    noise = torch.randn(BATCH, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(3))
    ode = sample_chain(policy, inputs, rule=ODERule(), step_mask="none", noise=noise)
    torch.testing.assert_close(ode.actions, policy.sample_actions(inputs, noise=noise), rtol=0, atol=1e-6)
    sde0 = sample_chain(policy, inputs, rule=SDERule(0.0), step_mask="all", noise=noise)
    assert torch.equal(sde0.latents, ode.latents)
    hybrid = sample_chain(policy, inputs, rule=SDERule(0.5), step_mask="hybrid", noise=noise,
                          generator=torch.Generator().manual_seed(4), grid=DenoiseGrid.uniform(4))
    assert torch.equal(hybrid.step_mask.sum(1), torch.ones(BATCH, dtype=torch.long))
    assert hybrid.num_steps == 4 and torch.equal(hybrid.latents[:, 0], noise)
    # steps before the stochastic one are the ODE's (same grid, same noise)
    ode4 = sample_chain(policy, inputs, rule=ODERule(), step_mask="none", noise=noise, grid=DenoiseGrid.uniform(4))
    first = hybrid.step_mask.float().argmax(1)
    for b in range(BATCH):
        k = int(first[b])
        assert torch.equal(hybrid.latents[b, : k + 1], ode4.latents[b, : k + 1])
        assert not torch.equal(hybrid.latents[b, k + 1], ode4.latents[b, k + 1])


def test_hybrid_sde_gradients_and_uniform_stochastic_index(policy_and_inputs):
    """Hybrid Flow-SDE: one stochastic step per sample, index uniform on [0, K-1) (chi-square), and the
    recomputed log-prob of that one step carries gradient into the expert."""
    from scipy import stats

    policy, _ = policy_and_inputs
    batch, num_steps = 320, 5
    inputs = vla_testing.random_inputs(policy, batch, seed=5)
    rule = SDERule(0.5)
    chain = sample_chain(policy, inputs, rule=rule, step_mask="hybrid", mask_high=-1,
                         grid=DenoiseGrid.uniform(num_steps), generator=torch.Generator().manual_seed(6))
    assert torch.equal(chain.step_mask.sum(1), torch.ones(batch, dtype=torch.long))
    counts = chain.step_mask.sum(0)
    assert counts[-1] == 0 and stats.chisquare(counts[:-1].numpy()).pvalue > 1e-3
    sub = chain.select(torch.arange(8))
    policy.zero_grad(set_to_none=True)
    out = chain_log_prob(policy, None, sub, rule, prefix=policy.embed_prefix(inputs).select(torch.arange(8)))
    out.log_prob.sum().backward()
    grad = policy.action_out_proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    policy.zero_grad(set_to_none=True)
