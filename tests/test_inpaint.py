"""Real-time chunking's inpainting guidance (docs/serve.md) against closed forms and finite differences.

A new chunk is steered onto the current chunk's actions still to run: g = J^T [W (Y - a_hat)] scaled by
min(beta, (t^2 + (1-t)^2) / (t (1-t))), with W the soft mask of Black et al. (2025).
"""
import math

import pytest
import torch

from pirl.flow import DenoiseGrid, ODERule, sample
from pirl.flow.toy import gaussian_mixture_velocity
from pirl.guidance import GuidanceStats
from pirl.guidance.gradients import inpaint_direction, inpaint_guidance_scale, inpaint_weights
from pirl.guidance.velocity import InpaintGuidedVelocity


def test_weights_are_one_on_the_committed_steps_then_decay_to_zero_where_the_old_plan_ends():
    w = inpaint_weights(10, 2, 5)
    soft = [c * math.expm1(c) / math.expm1(1.0) for c in (3 / 4, 2 / 4, 1 / 4)]
    torch.testing.assert_close(w, torch.tensor([1.0, 1.0, *soft, 0, 0, 0, 0, 0]))
    assert torch.equal(inpaint_weights(6, 3, 3), torch.tensor([1.0, 1, 1, 0, 0, 0]))  # nothing soft
    assert torch.equal(inpaint_weights(6, 0, 0), torch.zeros(6))
    assert bool((w[2:5].diff() < 0).all()) and 0 < float(w[4]) < float(w[2]) < 1
    with pytest.raises(ValueError, match="delay"):
        inpaint_weights(6, 4, 3)  # more committed steps than the old plan has


def test_step_scale_closed_form_and_cap():
    t = torch.tensor([0.5, 0.25, 0.75, 0.1, 0.0, 1.0])
    torch.testing.assert_close(inpaint_guidance_scale(t, 5.0), torch.tensor([2.0, 10 / 3, 10 / 3, 5.0, 5.0, 5.0]))
    torch.testing.assert_close(inpaint_guidance_scale(torch.tensor([0.1]), 20.0), torch.tensor([0.82 / 0.09]))
    per_row = inpaint_guidance_scale(torch.tensor([0.5, 0.5, 0.0]), torch.tensor([1.0, 5.0, 0.5]))
    torch.testing.assert_close(per_row, torch.tensor([1.0, 2.0, 0.5]))


MIX = torch.tensor([[0.4, -0.3, 0.2, 0.1], [0.2, 0.5, -0.4, 0.3], [-0.6, 0.1, 0.3, 0.2], [0.3, 0.2, 0.1, -0.5]],
                   dtype=torch.float64)


def coupled_field(x, t):
    """A nonlinear field mixing all four entries of a [2, 2] chunk, so J is far from the identity."""
    t = t.reshape(-1, 1)
    return (torch.tanh(x.flatten(1) @ MIX) * (0.5 + t) + x.flatten(1) * t).reshape(x.shape)


@pytest.mark.parametrize("t_value", [0.9, 0.5, 0.2])
def test_direction_is_the_gradient_of_the_weighted_distance_of_the_clean_estimate(t_value):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64)
    target = torch.randn(3, 2, 2, generator=gen, dtype=torch.float64)
    weights = torch.tensor([[1.0, 1.0], [0.4, 0.0]], dtype=torch.float64)[None].expand(3, 2, 2)
    t = torch.full((3,), t_value, dtype=torch.float64)
    g, v = inpaint_direction(coupled_field, x, t, target, weights)

    def objective(z):  # -1/2 sum W (Y - a_hat(z))^2, whose ascent direction g is
        return -0.5 * (weights * (target - (z - t_value * coupled_field(z, t))) ** 2).sum()

    eps, fd = 1e-6, torch.zeros_like(x)
    for i in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=torch.float64)
        step[i] = eps
        step = step.reshape(x.shape)
        fd.view(-1)[i] = (objective(x + step) - objective(x - step)) / (2 * eps)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-8)
    assert torch.equal(v, coupled_field(x, t))
    assert float(g[:, 1, 1].abs().max()) > 0  # J couples the unweighted entry in: not W (Y - a_hat) alone


MODES = (-1.5, 1.5)


def mixture_field(x, t):
    return gaussian_mixture_velocity(x, t, (0.5, 0.5), MODES, (0.04, 0.04))


def test_inpainting_moves_the_chunk_onto_the_old_plans_mode_and_zero_weights_change_nothing():
    """Two equally likely modes: the plain ODE splits half and half; steered onto an old plan at +1.5 with
    W = 1, nearly every chunk lands there. Zero weights give the plain chunks bit for bit."""
    grid = DenoiseGrid.uniform(10)
    noise = torch.randn(4000, 1, 1, generator=torch.Generator().manual_seed(0))
    plain = sample(mixture_field, grid, ODERule(), "none", noise=noise).actions

    def steered(weight):
        field = InpaintGuidedVelocity(mixture_field, torch.full_like(noise, 1.5), torch.full_like(noise, weight),
                                      5.0, GuidanceStats(batch_size=4000))
        return sample(field, grid, ODERule(), "none", noise=noise).actions

    assert 0.45 < float((plain > 0).float().mean()) < 0.55
    assert float((steered(1.0) > 0).float().mean()) > 0.95
    assert torch.equal(steered(0.0), plain)
