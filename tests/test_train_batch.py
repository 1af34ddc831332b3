"""TrajectoryBatch bookkeeping that the training metrics rely on (no simulator)."""

from __future__ import annotations

import torch

from pirl.train.batch import TrajectoryBatch


def _batch(terminated, truncated, success) -> TrajectoryBatch:
    t = lambda rows: torch.tensor(rows, dtype=torch.bool)  # noqa: E731
    term, trunc, succ = t(terminated), t(truncated), t(success)
    zeros = torch.zeros(term.shape)
    return TrajectoryBatch(inputs=None, chain=None, rewards=zeros, terminated=term, truncated=trunc,
                           values=zeros, truncated_values=zeros, last_value=zeros[0], success=succ,
                           episode_returns=[], episode_lengths=[], episode_success=[], env_steps=0,
                           weight_version=0, mask_exec=torch.ones(1, dtype=torch.bool),
                           mask_dims=torch.ones(1, dtype=torch.bool))


def test_first_episode_success_ignores_later_short_episodes():
    # 4 envs, 4 chunk steps (time-major rows):
    #   env 0 succeeds at t=1, then a quick second success at t=2 (must not count twice);
    #   env 1 fails by truncation at t=3;
    #   env 2 fails at t=0 (terminated without success), then succeeds at t=2 (a second episode);
    #   env 3 never ends; its latched success at the last step counts.
    terminated = [[0, 0, 1, 0], [1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    truncated = [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]]
    success = [[0, 0, 0, 0], [1, 0, 0, 0], [1, 0, 1, 1], [0, 0, 0, 1]]
    batch = _batch(terminated, truncated, success)
    assert batch.first_episode_success.tolist() == [True, False, False, True]
    # The finished-episode average also counts env 0's and env 2's second episodes:
    # 3 of the 5 finished episodes succeed (a biased 0.6); one episode per env gives 2 of 4.
    assert batch.first_episode_success.float().mean().item() == 0.5


def test_ratio_mask_counts_only_executed_steps_and_real_dims():
    from pirl.train.rl_core import PPOMinibatch, ratio_valid_mask

    mb = PPOMinibatch(inputs=None, chain=None, old_log_probs=None, advantages=None, returns=None,
                      old_values=None, valid=torch.tensor([1.0, 0.0, 1.0]),
                      mask_exec=torch.tensor([True, True, False, False]),
                      mask_dims=torch.tensor([True, True, True, False, False]))
    assert ratio_valid_mask(mb, "chunk").tolist() == [1.0, 0.0, 1.0]
    action = ratio_valid_mask(mb, "action")
    assert action.shape == (3, 4) and action.sum() == 2 * 2
    element = ratio_valid_mask(mb, "element")
    assert element.shape == (3, 4, 5) and element.sum() == 2 * 2 * 3
    assert element[1].sum() == 0 and element[:, 2:].sum() == 0 and element[:, :, 3:].sum() == 0


def _loss_inputs(granularity: str):
    from pirl.flow.policy import sample_chain
    from pirl.flow.grid import DenoiseGrid
    from pirl.flow.likelihood import reduce_chain_log_prob
    from pirl.train.rl_core import Agent, PPOMinibatch, SamplerConfig
    from vla.testing import random_inputs, tiny_policy

    policy = tiny_policy(seed=0)
    sampler = SamplerConfig(log_prob_granularity=granularity)
    agent = Agent.build(policy, sampler)
    torch.nn.init.normal_(agent.value_head.mlp[-1].weight, std=0.1)  # zero-initialised: open the path
    inputs = random_inputs(policy, 4, seed=1)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        chain = sample_chain(policy, inputs, grid=DenoiseGrid.uniform(sampler.num_steps), generator=generator)
    horizon, dims = chain.actions.shape[1:]
    mask_exec = torch.arange(horizon) < 3
    mask_dims = torch.arange(dims) < dims - 1
    old = reduce_chain_log_prob(chain, sampler.reduction, mask_exec=mask_exec, mask_dims=mask_dims)
    mb = PPOMinibatch(inputs=inputs, chain=chain, old_log_probs=old, advantages=torch.tensor([1.0, -1.0, 0.5, 2.0]),
                      returns=torch.tensor([3.0, -2.0, 1.0, 5.0]), old_values=torch.zeros(4), valid=torch.ones(4),
                      mask_exec=mask_exec, mask_dims=mask_dims)
    return agent, sampler, mb


def _expert_grad_norm(agent) -> float:
    expert = agent.policy.paligemma_with_expert.gemma_expert
    return sum(float(p.grad.norm()) for p in expert.parameters() if p.grad is not None)


def test_detached_value_features_keep_the_value_loss_out_of_the_expert():
    from pirl.algos.config import PPOConfig, ValueLossConfig
    from pirl.train.rl_core import OptimConfig, ppo_loss

    for detach in (False, True):
        agent, sampler, mb = _loss_inputs("element")
        loss, metrics = ppo_loss(agent, mb, sampler, OptimConfig(), PPOConfig(),
                                 ValueLossConfig(detach_features=detach))
        # unchanged weights: every element's ratio is 1 (the mask-aware loss sees the same log-probs)
        assert float(metrics["log_ratio_max_abs"]) < 1e-5
        # only the value loss: the policy term's gradient is removed by zeroing the advantages
        agent.zero_grad()
        mb.advantages.zero_()
        loss, _ = ppo_loss(agent, mb, sampler, OptimConfig(), PPOConfig(), ValueLossConfig(detach_features=detach))
        loss.backward()
        head = sum(float(p.grad.norm()) for p in agent.value_head.parameters() if p.grad is not None)
        assert head > 0
        if detach:
            assert _expert_grad_norm(agent) == 0.0
        else:
            assert _expert_grad_norm(agent) > 0.0


def test_minibatches_without_valid_rows_take_no_optimizer_step():
    # GRPO masks out groups without signal; when nothing is left, Adam must not step on a zero loss
    # (its momentum would still move the weights).
    from pirl.algos.config import PPOConfig, ValueLossConfig
    from pirl.train.rl_core import OptimConfig, ppo_update

    agent, sampler, mb = _loss_inputs("chunk")
    zeros = torch.zeros(1, 4)
    batch = TrajectoryBatch(inputs=mb.inputs, chain=mb.chain, rewards=zeros, terminated=zeros.bool(),
                            truncated=zeros.bool(), values=zeros, truncated_values=zeros, last_value=zeros[0],
                            success=zeros.bool(), episode_returns=[], episode_lengths=[], episode_success=[],
                            env_steps=0, weight_version=0, mask_exec=mb.mask_exec, mask_dims=mb.mask_dims)
    steps = []

    def train_step(minibatch, loss_fn):
        steps.append(int(minibatch.valid.sum()))
        return {"approx_kl": 0.0}

    optim = OptimConfig(update_epochs=2, minibatch_size=2)
    common = dict(sampler=sampler, optim=optim, ppo=PPOConfig(), value_cfg=ValueLossConfig(), use_value=False)
    valid = torch.tensor([[True, False, False, False]])
    out = ppo_update(agent, train_step, batch, zeros, zeros, generator=torch.Generator().manual_seed(0),
                     valid=valid, **common)
    assert steps == [1, 1] and out["minibatches_skipped"] == 2  # one of the two minibatches per epoch
    steps.clear()
    out = ppo_update(agent, train_step, batch, zeros, zeros, generator=torch.Generator().manual_seed(0),
                     valid=torch.zeros(1, 4, dtype=torch.bool), **common)
    assert steps == [] and out["minibatches_skipped"] == 4


def test_linear_lr_schedule_closed_form_and_applied_to_every_group():
    import pytest

    from pirl.train.rl_core import OptimConfig, scale_learning_rates

    assert OptimConfig().lr_scale(7, 10) == 1.0  # constant by default
    linear = OptimConfig(lr_schedule="linear", lr_final_fraction=0.1)
    assert [round(linear.lr_scale(i, 11), 6) for i in (0, 5, 10, 20)] == [1.0, 0.55, 0.1, 0.1]
    with pytest.raises(ValueError, match="lr_schedule"):
        OptimConfig(lr_schedule="cosine")
    with pytest.raises(ValueError, match="lr_final_fraction"):
        OptimConfig(lr_final_fraction=1.5)
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 4e-2}])
    scale_learning_rates(opt, 0.25)
    scale_learning_rates(opt, 0.5)  # relative to the built lr, not compounded
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 2e-2]
    restored = torch.optim.AdamW([{"params": [a], "lr": 1e-3}, {"params": [b], "lr": 4e-2}])
    restored.load_state_dict(opt.state_dict())  # a resumed run keeps the built lr as the base
    scale_learning_rates(restored, 1.0)
    assert [g["lr"] for g in restored.param_groups] == [1e-3, 4e-2]
