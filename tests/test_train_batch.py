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
