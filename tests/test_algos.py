"""pirl.algos against hand-worked numbers (METHODS.md §4). Every expected value is derived in a comment."""
import math

import pytest
import torch

from pirl.algos import (
    GAEConfig,
    PPOConfig,
    approx_kl_early_stop,
    explained_variance,
    from_dict,
    gae,
    grpo_advantages,
    grpo_filter,
    normalize_advantages,
    ppo_policy_loss,
    value_loss,
)
from pirl.flow.likelihood import LogProbReduction, element_mask, reduce_chain_terms
from pirl.flow.steps import gaussian_entropy


# ----------------------------------------------------------------------------------------------- GAE
def _gae_case(dones, truncs, truncated_values=None):
    # T = 3, one env column per call; gamma = lam = 0.5 so gamma * lam = 0.25.
    r = torch.tensor([[1.0], [0.0], [2.0]])
    v = torch.tensor([[0.5], [1.0], [1.5]])
    return gae(r, v, torch.tensor(dones)[:, None], torch.tensor(truncs)[:, None],
               last_value=torch.tensor([2.0]), gamma=0.5, lam=0.5,
               truncated_values=None if truncated_values is None else torch.tensor(truncated_values)[:, None])


def test_gae_no_episode_end_hand_worked():
    # next values = [1.0, 1.5, 2.0 (last_value)]
    # deltas: 1 + .5*1.0 - .5 = 1.0 ; 0 + .5*1.5 - 1 = -0.25 ; 2 + .5*2 - 1.5 = 1.5
    # A2 = 1.5 ; A1 = -0.25 + .25*1.5 = 0.125 ; A0 = 1.0 + .25*0.125 = 1.03125
    adv, ret = _gae_case([False] * 3, [False] * 3)
    assert torch.allclose(adv[:, 0], torch.tensor([1.03125, 0.125, 1.5]))
    assert torch.allclose(ret[:, 0], torch.tensor([1.53125, 1.125, 3.0]))  # A + V


def test_gae_done_stops_bootstrap_and_propagation():
    # Terminated inside chunk 1: delta1 = 0 + 0 - 1.0 = -1.0 and A1 gets nothing from A2.
    # A2 = 1.5 ; A1 = -1.0 ; A0 = 1.0 + .25 * (-1.0) = 0.75
    adv, _ = _gae_case([False, True, False], [False] * 3)
    assert torch.allclose(adv[:, 0], torch.tensor([0.75, -1.0, 1.5]))


def test_gae_truncation_bootstraps_from_truncated_obs_value():
    # Truncated inside chunk 1, V(final obs) = 4.0: delta1 = 0 + .5*4 - 1 = 1.0, no propagation from
    # A2 (next episode): A1 = 1.0 ; A0 = 1.0 + .25*1.0 = 1.25. values[2] (= 1.5, the new episode's
    # first obs) must not be used, or A1 would be -0.25 + ... as in the no-end case.
    adv, _ = _gae_case([False] * 3, [False, True, False],
                       truncated_values=[0.0, 4.0, 0.0])
    assert torch.allclose(adv[:, 0], torch.tensor([1.25, 1.0, 1.5]))
    # Without the truncated value a truncation is cut like a termination (bootstrap 0).
    adv_nov, _ = _gae_case([False] * 3, [False, True, False])
    assert torch.allclose(adv_nov[:, 0], torch.tensor([0.75, -1.0, 1.5]))
    # done and truncated together: done wins (no bootstrap even though a value is given).
    adv_both, _ = _gae_case([False, True, False], [False, True, False], truncated_values=[0.0, 4.0, 0.0])
    assert torch.allclose(adv_both[:, 0], torch.tensor([0.75, -1.0, 1.5]))


def test_gae_columns_independent_and_shape_checks():
    r = torch.zeros(4, 3)
    v = torch.arange(12.0).reshape(4, 3)
    d = torch.zeros(4, 3, dtype=torch.bool)
    adv, ret = gae(r, v, d, d, last_value=torch.ones(3), gamma=GAEConfig().gamma, lam=GAEConfig().lam)
    # gamma = 1 would be needed for a constant; just check returns == adv + values and shape.
    assert adv.shape == (4, 3) and torch.allclose(ret, adv + v)
    with pytest.raises(ValueError):
        gae(r, v[:3], d, d, last_value=torch.ones(3))


# ----------------------------------------------------------------------------------------------- PPO
def _ppo_inputs():
    ratios = torch.tensor([1.5, 0.5, 1.1, 0.7])
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    old = torch.tensor([-1.0, -2.0, -3.0, -4.0])
    new = (old + ratios.log()).requires_grad_(True)
    return new, old, adv


def test_ppo_loss_hand_worked():
    new, old, adv = _ppo_inputs()
    loss, m = ppo_policy_loss(new, old, adv, clip_eps=0.2, normalize_advantages=False)
    # per chunk l = max(-A r, -A clip(r, .8, 1.2)):
    #   r=1.5 A=+1: max(-1.5, -1.2) = -1.2 (clipped)   r=0.5 A=+1: max(-0.5, -0.8) = -0.5
    #   r=1.1 A=-1: max( 1.1,  1.1) =  1.1             r=0.7 A=-1: max( 0.7,  0.8) =  0.8 (clipped)
    # mean = (-1.2 - 0.5 + 1.1 + 0.8) / 4 = 0.05
    assert loss.item() == pytest.approx(0.05, abs=1e-6)
    # clip fraction: |r - 1| > 0.2 for 1.5, 0.5, 0.7 -> 3/4
    assert m["clip_frac"].item() == pytest.approx(0.75)
    # approx KL = mean((r-1) - ln r) = (0.094535 + 0.193147 + 0.004690 + 0.056675) / 4 = 0.087262
    assert m["approx_kl"].item() == pytest.approx(0.0872617, abs=1e-6)
    # d l / d log p = -A r where unclipped, 0 where the clipped branch is active; / 4 for the mean:
    #   [0, -0.5/4, 1.1/4, 0] = [0, -0.125, 0.275, 0]
    loss.backward()
    assert torch.allclose(new.grad, torch.tensor([0.0, -0.125, 0.275, 0.0]), atol=1e-6)


def test_ppo_ratio_one_gives_minus_mean_advantage_and_zero_kl():
    lp = torch.randn(6)
    adv = torch.tensor([1.0, 2.0, 3.0, -1.0, 0.0, 1.0])
    loss, m = ppo_policy_loss(lp, lp.clone(), adv, normalize_advantages=False)
    assert loss.item() == pytest.approx(-adv.mean().item())
    assert m["approx_kl"].item() == 0.0 and m["clip_frac"].item() == 0.0


def test_ppo_dual_clip():
    # A = -1 with r = 5: standard PPO loss max(5, 1.2) = 5 is unbounded in r; dual clip c = 3 caps
    # it at -A c = 3 (gradient 0). r = 2: 2 < 3, untouched. A = +1, r = 5: max(-5, -1.2) = -1.2,
    # the dual clip never applies to positive advantages.
    ratios = torch.tensor([5.0, 2.0, 5.0])
    adv = torch.tensor([-1.0, -1.0, 1.0])
    old = torch.zeros(3)
    new = ratios.log().requires_grad_(True)
    plain, _ = ppo_policy_loss(new, old, adv, normalize_advantages=False)
    assert plain.item() == pytest.approx((5.0 + 2.0 - 1.2) / 3, abs=1e-5)
    dual, m = ppo_policy_loss(new, old, adv, dual_clip=3.0, normalize_advantages=False)
    assert dual.item() == pytest.approx((3.0 + 2.0 - 1.2) / 3, abs=1e-5)
    assert m["dual_clip_frac"].item() == pytest.approx(1 / 3)
    dual.backward()
    # grads: capped -> 0 ; r=2, A=-1 unclipped: -A r / 3 = 2/3 ; clipped positive -> 0
    assert torch.allclose(new.grad, torch.tensor([0.0, 2.0 / 3, 0.0]), atol=1e-6)
    with pytest.raises(ValueError):
        ppo_policy_loss(new, old, adv, dual_clip=0.5)


def test_ppo_token_mask_excludes_elements():
    torch.manual_seed(0)
    N, H, D = 3, 4, 5
    old = torch.randn(N, H, D)
    log_ratio = 0.1 * torch.randn(N, H, D)
    mask_exec = torch.tensor([1.0, 1.0, 0.0, 0.0])  # first 2 steps executed
    mask_dims = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0])  # 3 real dims
    mask = mask_exec[:, None] * mask_dims  # [H, D], broadcast over N
    # Garbage in the masked region: a huge ratio that would dominate the mean if it leaked.
    garbage = log_ratio.clone()
    garbage[:, 2:, :] = 30.0
    garbage[:, :, 3:] = 30.0
    adv = torch.tensor([1.0, -2.0, 0.5])
    new = (old + garbage).requires_grad_(True)
    loss, m = ppo_policy_loss(new, old, adv, mask=mask, normalize_advantages=False)
    # Reference: the same loss on the valid [N, 2, 3] block only, no mask.
    ref, ref_m = ppo_policy_loss(old[:, :2, :3] + log_ratio[:, :2, :3], old[:, :2, :3], adv,
                                 normalize_advantages=False)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert m["approx_kl"].item() == pytest.approx(ref_m["approx_kl"].item(), abs=1e-6)
    loss.backward()
    assert torch.all(new.grad[:, 2:, :] == 0) and torch.all(new.grad[:, :, 3:] == 0)
    assert torch.any(new.grad[:, :2, :3] != 0)


def test_ppo_action_level_advantage_broadcast_and_reduce():
    # Per-element log-probs reduced to action level [N, H] (sum over real dims) with mask_exec.
    lp = torch.tensor([[[0.1, 0.2, 9.0], [0.3, 0.4, 9.0]]])  # N=1, H=2, D=3; dim 2 is padding
    mask = torch.tensor([1.0, 1.0, 0.0])
    # (the production reduction of pirl.flow: one stochastic step of sample 0, padded dim masked)
    def reduce(granularity):
        return reduce_chain_terms(lp, torch.tensor([0]), 1, LogProbReduction(granularity=granularity), mask_dims=mask)

    per_action = reduce("action")
    m_action = element_mask(1, 2, 3, mask_dims=mask).float().amax(-1)  # as rl_core.ratio_valid_mask
    assert torch.allclose(per_action, torch.tensor([[0.3, 0.7]]))  # 0.1+0.2, 0.3+0.4
    assert m_action.tolist() == [[1.0, 1.0]]
    per_chunk = reduce("chunk")
    assert torch.allclose(per_chunk, torch.tensor([1.0]))
    # Action level: ratio per step, advantage (2.0) broadcast to both steps; old = new - [0, 0.1]
    # -> r = [1, e^0.1 = 1.10517] (inside the clip) -> loss = -2 * (1 + 1.10517) / 2 = -2.10517
    loss, _ = ppo_policy_loss(per_action, per_action - torch.tensor([[0.0, 0.1]]), torch.tensor([2.0]),
                              mask=m_action, normalize_advantages=False)
    assert loss.item() == pytest.approx(-(1 + math.exp(0.1)), abs=1e-6)


def test_advantage_normalisation_is_masked():
    adv = torch.tensor([1.0, 2.0, 3.0, 1000.0])
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])
    out = normalize_advantages(adv, mask)
    # valid: mean 2, population std sqrt(2/3) = 0.8165 -> [-1.2247, 0, 1.2247], masked entry 0
    assert torch.allclose(out, torch.tensor([-1.224744, 0.0, 1.224744, 0.0]), atol=1e-5)
    # In the loss, a chunk with no valid element does not enter the normalisation statistics: the
    # loss equals the loss on the 3 valid chunks alone.
    lp = torch.zeros(4, 2)
    mask2 = torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]])
    loss, _ = ppo_policy_loss(lp + 0.05, lp, adv, mask=mask2)
    ref, _ = ppo_policy_loss(lp[:3] + 0.05, lp[:3], adv[:3])
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_approx_kl_early_stop():
    assert approx_kl_early_stop(torch.tensor(0.03), 0.02) is True
    assert approx_kl_early_stop(0.01, 0.02) is False
    assert approx_kl_early_stop(1e9, None) is False


# ---------------------------------------------------------------------------------------- value loss
def test_value_loss_huber_with_clipping_hand_worked():
    values = torch.tensor([1.0, 3.0], requires_grad=True)
    old = torch.tensor([0.0, 2.9])
    ret = torch.tensor([2.0, 30.0])
    loss, m = value_loss(values, old, ret, loss_type="huber", huber_delta=10.0, clip_eps=0.2)
    # elem 0: unclipped e = -1 -> 0.5 ; clipped v = 0 + 0.2 -> e = -1.8 -> 0.5*3.24 = 1.62 ; max 1.62
    # elem 1: e = -27 (|e| > 10): 10 * (27 - 5) = 220 ; clipped v = 2.9 + 0.1 = 3.0 -> 220 ; max 220
    # mean = (1.62 + 220) / 2 = 110.81
    assert loss.item() == pytest.approx(110.81, abs=1e-4)
    assert m["value_clip_frac"].item() == pytest.approx(0.5)  # |1 - 0| > 0.2, |0.1| is not
    loss.backward()
    # elem 0: the clipped term wins and the clamp is saturated -> 0 ; elem 1: huber slope -10, / 2
    assert torch.allclose(values.grad, torch.tensor([0.0, -5.0]))
    mse, _ = value_loss(values, old, ret, loss_type="mse", clip_eps=0.2)
    # elem 0: max(0.5, 1.62) = 1.62 ; elem 1: 0.5 * 27^2 = 364.5 -> mean 183.06
    assert mse.item() == pytest.approx(183.06, abs=1e-4)
    unclipped, _ = value_loss(values, old, ret, loss_type="mse", clip_eps=None)
    assert unclipped.item() == pytest.approx((0.5 + 364.5) / 2, abs=1e-4)
    masked, _ = value_loss(values, old, ret, mask=torch.tensor([1.0, 0.0]))
    assert masked.item() == pytest.approx(1.62, abs=1e-5)


# ------------------------------------------------------------------------------------------- entropy
def test_gaussian_entropy_sum_and_mask():
    # The entropy the PPO loss uses: per-element Gaussian entropy (pirl.flow.steps), summed per chunk
    # over real dims by the chain reduction (pirl.flow.likelihood), as in chain_log_prob.
    def chunk_entropy(std, mask):
        n = std.shape[0]
        return reduce_chain_terms(gaussian_entropy(std), torch.arange(n), n, LogProbReduction(), mask_dims=mask)

    std = torch.exp(torch.randn(2, 3, 4))  # [N, H, D]
    mask = torch.tensor([1.0, 1.0, 1.0, 0.0])  # last dim padded
    ent = chunk_entropy(std, mask)
    ref = torch.distributions.Normal(torch.zeros_like(std), std).entropy()[..., :3].sum((-2, -1))
    assert ent.shape == (2,) and torch.allclose(ent, ref, atol=1e-5)
    # std = 1 everywhere: 0.5 * log(2 pi e) = 1.4189385 per valid element; 3 * 3 valid -> 12.770447
    assert chunk_entropy(torch.ones(1, 3, 4), mask).item() == pytest.approx(9 * 1.4189385, abs=1e-5)


# ---------------------------------------------------------------------------------------------- GRPO
def test_grpo_advantages_hand_worked():
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = grpo_advantages(scores, group_size=4, eps=0.0 + 1e-6)
    # group 0: mean 0.25, population std sqrt(0.25 * 0.75) = 0.4330127
    #   -> (1 - .25) / .4330127 = 1.7320508 ; (0 - .25) / .4330127 = -0.5773503
    # group 1: identical scores -> 0 / (0 + eps) = 0
    expected = torch.tensor([1.7320508, -0.5773503, -0.5773503, -0.5773503, 0, 0, 0, 0])
    assert torch.allclose(adv, expected, atol=1e-5)
    # unbiased std: sqrt(0.25 * 0.75 * 4 / 3) = 0.5 -> 1.5, -0.5
    adv_u = grpo_advantages(scores, group_size=4, unbiased_std=True)
    assert torch.allclose(adv_u[:4], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-5)
    with pytest.raises(ValueError):
        grpo_advantages(scores[:7], group_size=4)


def test_grpo_filter_drops_all_fail_and_all_success_groups():
    # G = 8: rates 0, 1/8 = 0.125, 7/8 = 0.875, 1 -> with [0.1, 0.9] keep the middle two.
    rows = [[0] * 8, [1] + [0] * 7, [1] * 7 + [0], [1] * 8]
    success = torch.tensor(rows, dtype=torch.float32).reshape(-1)
    keep = grpo_filter(success, group_size=8, low=0.1, high=0.9)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False] * 8 + [True] * 16 + [False] * 8
    assert keep.reshape(-1, 8)[:, 0].tolist() == [False, True, True, False]
    # Configurable bounds: [0.2, 0.8] drops the 1/8 and 7/8 groups too.
    assert not grpo_filter(success, 8, low=0.2, high=0.8).any()


# --------------------------------------------------------------------------------- metrics / configs
def test_explained_variance():
    ret = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert explained_variance(ret, ret).item() == pytest.approx(1.0)
    assert explained_variance(torch.full((4,), 2.5), ret).item() == pytest.approx(0.0)
    # Var(ret) = 1.25, Var(ret - v) with v = ret + [1, -1, 1, -1] is 1 -> 1 - 1 / 1.25 = 0.2
    assert explained_variance(ret + torch.tensor([1.0, -1, 1, -1]), ret).item() == pytest.approx(0.2)
    # A masked outlier is ignored.
    v = torch.tensor([1.0, 2.0, 3.0, 4.0, -100.0])
    r = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    assert explained_variance(v, r, torch.tensor([1.0, 1, 1, 1, 0])).item() == pytest.approx(1.0)
    assert math.isnan(explained_variance(ret, torch.ones(4)).item())


def test_strict_configs():
    assert from_dict(PPOConfig, {"clip_eps": 0.1}).clip_eps == 0.1
    with pytest.raises(KeyError, match="clip_esp"):
        from_dict(PPOConfig, {"clip_esp": 0.1})
    with pytest.raises(Exception):
        PPOConfig().clip_eps = 0.3  # frozen


def test_paired_counts_and_the_exact_sign_test_against_hand_worked_numbers():
    from pirl.algos.stats import paired_counts, sign_test_p

    mine = {0: True, 1: True, 2: False, 3: False, 4: True}
    base = {0: True, 1: False, 2: True, 3: False, 4: False}
    assert paired_counts(mine, base) == (2, 1) and paired_counts(base, mine) == (1, 2)
    # n = 10 discordant, k = 1: 2 * (C(10,0) + C(10,1)) / 2^10 = 22 / 1024
    assert sign_test_p(9, 1) == pytest.approx(22 / 1024) == sign_test_p(1, 9)
    assert sign_test_p(5, 5) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(26, 11) == pytest.approx(0.0201, abs=1e-4)  # RL (seed 0) vs its SFT start, PickCube
