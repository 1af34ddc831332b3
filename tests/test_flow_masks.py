"""Step masks, Chain bookkeeping and log-prob reductions (METHODS.md §2-4)."""
import math

import pytest
import torch
from scipy import stats

from pirl.flow import (
    Chain,
    DenoiseGrid,
    LogProbReduction,
    SDERule,
    gaussian_log_prob,
    hybrid_mask,
    make_step_mask,
    reduce_chain_log_prob,
    sample,
    standard_normal_log_prob,
    window_mask,
)


def test_hybrid_mask_one_step_per_sample_uniform_over_range():
    num_steps, batch = 10, 18_000
    mask = hybrid_mask(batch, num_steps, high=-1, generator=torch.Generator().manual_seed(0))
    assert mask.dtype == torch.bool and mask.shape == (batch, num_steps)
    assert torch.equal(mask.sum(1), torch.ones(batch, dtype=torch.long))
    assert not mask[:, -1].any()  # high=-1 excludes the last step
    counts = mask.sum(0)[:-1].numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
    # a biased draw (index 0 twice as likely) is rejected by the same test
    biased = counts.copy()
    biased[0] += 2000
    biased[1:] -= 2000 // 8
    assert stats.chisquare(biased).pvalue < 1e-6
    # per-sample, not per-batch: a small batch already mixes indices
    small = hybrid_mask(16, num_steps, generator=torch.Generator().manual_seed(1))
    assert small.float().argmax(1).unique().numel() > 1


def test_hybrid_mask_range_and_errors():
    mask = hybrid_mask(500, 6, low=2, high=4, generator=torch.Generator().manual_seed(0))
    index = mask.float().argmax(1)
    assert set(index.tolist()) == {2, 3}
    with pytest.raises(ValueError):
        hybrid_mask(4, 6, low=4, high=4)
    # negative bounds count from the end: low=-1 is always the last step, [-3, -1) is {3, 4}
    assert hybrid_mask(50, 6, low=-1, generator=torch.Generator().manual_seed(0))[:, 5].all()
    index = hybrid_mask(500, 6, low=-3, high=-1, generator=torch.Generator().manual_seed(0)).float().argmax(1)
    assert set(index.tolist()) == {3, 4}
    with pytest.raises(ValueError):
        hybrid_mask(4, 6, low=-7)
    with pytest.raises(ValueError):
        make_step_mask("sometimes", 4, 6)


def test_window_mask_consecutive_and_uniform_start():
    num_steps, width, batch = 8, 3, 12_000
    mask = window_mask(batch, num_steps, width, high=-1, generator=torch.Generator().manual_seed(2))
    assert torch.equal(mask.sum(1), torch.full((batch,), width))
    start = mask.float().argmax(1)
    steps = torch.arange(num_steps)[None]
    assert torch.equal(mask, (steps >= start[:, None]) & (steps < start[:, None] + width))
    assert not mask[:, -1].any()
    counts = torch.bincount(start, minlength=num_steps)[: num_steps - width].numpy()  # starts 0..4
    assert counts.min() > 0 and stats.chisquare(counts).pvalue > 1e-3
    assert make_step_mask("all", 2, 3).all() and not make_step_mask("none", 2, 3).any()
    with pytest.raises(ValueError):
        window_mask(2, 4, 5)


def zero_field(x, t):
    return torch.zeros_like(x)


def small_chain(seed=0, batch=4, num_steps=5, horizon=3, action_dim=2):
    mask = torch.zeros(batch, num_steps, dtype=torch.bool)
    mask[0, [0, 2]] = True
    mask[1, 4] = True
    mask[3] = True  # sample 2 has no stochastic step
    return sample(zero_field, DenoiseGrid.uniform(num_steps), SDERule(0.6), mask, batch_size=batch,
                  action_shape=(horizon, action_dim), generator=torch.Generator().manual_seed(seed),
                  dtype=torch.float64)


def naive_reduce(chain, reduction, mask_exec, mask_dims):
    """Loop version of the documented reduction, for comparison."""
    b, k = chain.step_mask.shape
    h, d = chain.latents.shape[2:]
    rows = iter(range(chain.num_stochastic))
    per_sample_terms = [[] for _ in range(b)]
    for i in range(b):
        for j in range(k):
            if chain.step_mask[i, j]:
                per_sample_terms[i].append(chain.log_probs[next(rows)])
        if reduction.include_initial:
            per_sample_terms[i].append(standard_normal_log_prob(chain.latents[i, 0]))
    out = []
    for i in range(b):
        terms = per_sample_terms[i]
        element = sum(terms) if terms else torch.zeros(h, d, dtype=torch.float64)
        if reduction.step_reduce == "mean" and terms:
            element = element / len(terms)
        weight = (mask_exec[i] if mask_exec.ndim == 2 else mask_exec)[:, None] & mask_dims[None, :]
        element = element * weight
        if reduction.granularity == "element":
            out.append(element)
        elif reduction.granularity == "action":
            value = element.sum(-1)
            out.append(value / weight.sum(-1).clamp(min=1) if reduction.reduce == "mean" else value)
        else:
            value = element.sum()
            out.append(value / weight.sum().clamp(min=1) if reduction.reduce == "mean" else value)
    return torch.stack(out)


@pytest.mark.parametrize("granularity", ["chunk", "action", "element"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("include_initial,step_reduce", [(False, "sum"), (True, "sum"), (True, "mean")])
def test_reductions_match_the_documented_loop(granularity, reduce, include_initial, step_reduce):
    chain = small_chain()
    reduction = LogProbReduction(reduce, granularity, include_initial, step_reduce)
    mask_exec = torch.tensor([[True, True, False], [True, False, False], [True, True, True], [False, True, True]])
    mask_dims = torch.tensor([True, False])
    got = reduce_chain_log_prob(chain, reduction, mask_exec=mask_exec, mask_dims=mask_dims)
    torch.testing.assert_close(got, naive_reduce(chain, reduction, mask_exec, mask_dims))
    # a [H] mask_exec is broadcast over the batch
    got_1d = reduce_chain_log_prob(chain, reduction, mask_exec=mask_exec[0], mask_dims=mask_dims)
    torch.testing.assert_close(got_1d, naive_reduce(chain, reduction, mask_exec[0], mask_dims))


def test_stored_log_probs_are_gaussian_densities_of_the_stored_samples():
    chain = small_chain(seed=3)
    sample_index, step_index = chain.stochastic_pairs()
    assert sample_index.tolist() == [0, 0, 1, 3, 3, 3, 3, 3] and step_index.tolist() == [0, 2, 4, 0, 1, 2, 3, 4]
    x_next = chain.latents[sample_index, step_index + 1]
    torch.testing.assert_close(chain.log_probs, gaussian_log_prob(x_next, chain.means, chain.stds))
    # with the zero field the SDE mean is x_k (1 - d sigma^2 / (2 t)) and std = sigma sqrt(d)
    times, steps = chain.grid.times, chain.grid.steps
    for row, (i, k) in enumerate(zip(sample_index.tolist(), step_index.tolist())):
        t, d = times[k], steps[k]
        sigma = 0.6 * math.sqrt(t / (d if t == 1.0 else 1 - t))
        torch.testing.assert_close(chain.means[row], chain.latents[i, k] * (1 - d * sigma**2 / (2 * t)))
        torch.testing.assert_close(chain.stds[row], torch.full_like(chain.stds[row], sigma * math.sqrt(d)))
    # non-stochastic steps are Euler steps: with v = 0 the latent does not move
    assert torch.equal(chain.latents[2, 0], chain.latents[2, -1])


def test_chain_select_and_cat_keep_rows_with_their_samples():
    chain = small_chain(seed=4)
    index = torch.tensor([3, 0, 0, 2])
    sub = chain.select(index)
    assert torch.equal(sub.step_mask, chain.step_mask[index])
    torch.testing.assert_close(reduce_chain_log_prob(sub, LogProbReduction(granularity="element")),
                               reduce_chain_log_prob(chain, LogProbReduction(granularity="element"))[index])
    both = Chain.cat([chain.select(torch.tensor([0, 1])), chain.select(torch.tensor([2, 3]))])
    for name in ("latents", "step_mask", "means", "stds", "log_probs"):
        assert torch.equal(getattr(both, name), getattr(chain, name)), name
    with pytest.raises(ValueError):
        Chain(chain.latents, chain.grid, chain.step_mask, chain.means[:-1], chain.stds, chain.log_probs)


def test_draws_come_from_the_generators_device_then_move():
    """vla.draw: a CPU generator (what rollouts seed) serves a policy on any device, with torch's own
    numbers for that seed ('meta' stands in for a GPU here: the draw is made on the CPU and moved)."""
    from vla import draw

    def gen():
        return torch.Generator().manual_seed(3)

    assert torch.equal(draw.normal((2, 3), gen(), "cpu"), torch.randn((2, 3), generator=gen()))
    assert torch.equal(draw.uniform((4,), gen(), "cpu"), torch.rand((4,), generator=gen()))
    assert torch.equal(draw.integers(1, 5, (6,), gen(), "cpu"), torch.randint(1, 5, (6,), generator=gen()))
    moved = draw.normal((2, 3), gen(), "meta", torch.bfloat16)
    assert moved.device.type == "meta" and moved.dtype == torch.bfloat16
    assert draw.integers(0, 3, (2,), None, "meta").device.type == "meta"  # no generator: drawn where used
