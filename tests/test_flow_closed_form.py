"""Flow samplers against closed forms (METHODS.md §1, §2, §6), in float64.

With the exact velocity of Gaussian data every SDE transition is affine-Gaussian, so the final variance
can be propagated exactly through the very step functions the sampler uses and compared with the §6
table; the Monte Carlo tests run the sampler itself.
"""
from dataclasses import dataclass

import pytest
import torch

from pirl.flow import (
    DenoiseGrid,
    ODERule,
    SDERule,
    StepDistribution,
    euler_step,
    noise_estimate,
    openpi_velocity_from_mirrored,
    sample,
    sde_sigma,
    sde_step,
)
from pirl.flow.toy import gaussian_mixture_velocity, gaussian_velocity

DATA_MEAN, DATA_VAR = 0.7, 0.09

# METHODS.md §6: final variance, 1-D data N(0.7, 0.09), start N(0, 1).
VARIANCE_TABLE = {
    0.0: {10: 0.0609, 50: 0.0833, 200: 0.0883, 1000: 0.0897},
    0.5: {10: 0.0731, 50: 0.0869, 200: 0.0898, 1000: 0.0903},
    0.7: {10: 0.0795, 50: 0.0883, 200: 0.0900, 1000: 0.0902},
}
FLIPPED_TABLE_A07 = {10: 1.58, 50: 3.87, 200: 7.80, 1000: 17.3}


@dataclass(frozen=True)
class DriftSignFlippedSDERule:
    """The classic bug: the score correction added with the wrong sign (mixing conventions)."""

    a_noise: float
    needs_hidden = False
    stochastic = True

    def step(self, x, v, t, dt, hidden=None) -> StepDistribution:
        correct = sde_step(x, v, t, dt, self.a_noise)
        t_row, dt_row = t.reshape(-1, 1, 1), dt.reshape(-1, 1, 1)
        sigma = sde_sigma(t_row, dt_row, self.a_noise)
        flipped_mean = euler_step(x, v, dt_row) + dt_row * sigma**2 / (2 * t_row) * noise_estimate(x, v, t_row)
        return StepDistribution(flipped_mean, correct.std)


def gaussian_field(x, t):
    return gaussian_velocity(x, t, DATA_MEAN, DATA_VAR)


def propagate_moments(rule, num_steps):
    """Exact mean/variance of x_K from N(0, 1): each step is x -> A x + b + s xi with the exact field.

    A, b, s are read off the rule's own step at x = 0 and x = 1 (the map is affine in x)."""
    grid = DenoiseGrid.uniform(num_steps)
    mean, var = 0.0, 1.0
    points = torch.tensor([0.0, 1.0], dtype=torch.float64).reshape(2, 1, 1)
    for k in range(num_steps):
        t = torch.full((2,), grid.times[k], dtype=torch.float64)
        dt = torch.full((2,), grid.steps[k], dtype=torch.float64)
        dist = rule.step(points, gaussian_field(points, t), t, dt)
        b = dist.mean[0, 0, 0].item()
        slope = dist.mean[1, 0, 0].item() - b
        std = 0.0 if dist.std is None else dist.std[0, 0, 0].item()
        mean, var = slope * mean + b, slope**2 * var + std**2
    return mean, var


def assert_matches_table(final_var, a_noise, num_steps):
    expected = VARIANCE_TABLE[a_noise][num_steps]
    assert final_var == pytest.approx(expected, abs=6e-5), (a_noise, num_steps, final_var, expected)


def test_uniform_grid_and_validation():
    grid = DenoiseGrid.uniform(4)
    assert grid.times == (1.0, 0.75, 0.5, 0.25, 0.0)
    assert grid.steps == (0.25, 0.25, 0.25, 0.25)
    assert grid.num_steps == 4 and grid == DenoiseGrid.from_times(torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert DenoiseGrid.from_times([1.0, 0.9, 0.5, 0.0]).steps == pytest.approx((0.1, 0.4, 0.5))
    for bad in ([1.0], [0.0, 1.0], [1.0, 0.5, 0.5, 0.0], [1.5, 0.0]):
        with pytest.raises(ValueError):
            DenoiseGrid.from_times(bad)
    with pytest.raises(Exception):
        grid.times = (1.0, 0.0)


def test_sde_step_with_zero_noise_is_the_euler_step_bit_for_bit():
    generator = torch.Generator().manual_seed(0)
    grid = DenoiseGrid.uniform(7)
    for dtype in (torch.float32, torch.float64):
        x = torch.randn(5, 3, 4, generator=generator, dtype=dtype)
        v = torch.randn(5, 3, 4, generator=generator, dtype=dtype)
        for k in range(grid.num_steps):  # includes t = 1 (the capped first step)
            t = grid.times_tensor(dtype)[k].expand(5)
            dt = grid.steps_tensor(dtype)[k].expand(5)
            dist = sde_step(x, v, t, dt, 0.0)
            assert torch.equal(dist.mean, euler_step(x, v, dt))
            assert torch.equal(dist.std, torch.zeros_like(x))
            # and a positive noise level does change the mean (the test above is not vacuous)
            assert not torch.equal(sde_step(x, v, t, dt, 0.5).mean, euler_step(x, v, dt))


def test_first_step_noise_variance_is_a_noise_squared():
    """The t = 1 cap: sigma_0 = a / sqrt(1 - t_1), so std_0^2 = sigma_0^2 d_0 = a^2 (METHODS.md §2)."""
    for num_steps in (3, 10):
        grid = DenoiseGrid.uniform(num_steps)
        x = torch.zeros(1, 1, 1, dtype=torch.float64)
        dist = sde_step(x, x, torch.tensor([1.0], dtype=torch.float64), torch.tensor([grid.steps[0]], dtype=torch.float64), 0.7)
        assert dist.std.item() ** 2 == pytest.approx(0.49, rel=1e-12)
    # the scalar and tensor paths agree
    assert sde_sigma(0.6, 0.2, 0.5) == pytest.approx(sde_sigma(torch.tensor(0.6), torch.tensor(0.2), 0.5).item())


@pytest.mark.parametrize("a_noise", [0.0, 0.5, 0.7])
@pytest.mark.parametrize("num_steps", [10, 50, 200, 1000])
def test_exact_moment_propagation_reproduces_variance_table(a_noise, num_steps):
    mean, var = propagate_moments(SDERule(a_noise), num_steps)
    assert mean == pytest.approx(DATA_MEAN, abs=1e-12)  # the mean is exact for any K
    assert_matches_table(var, a_noise, num_steps)


@pytest.mark.parametrize("num_steps", [10, 50, 200, 1000])
def test_drift_sign_flip_is_detected_by_moment_propagation(num_steps):
    _, var = propagate_moments(DriftSignFlippedSDERule(0.7), num_steps)
    assert var == pytest.approx(FLIPPED_TABLE_A07[num_steps], rel=4e-3)  # reproduces the bug row
    with pytest.raises(AssertionError):
        assert_matches_table(var, 0.7, num_steps)


def test_ode_rule_moments_are_the_a_noise_zero_row():
    _, var = propagate_moments(ODERule(), 50)
    assert_matches_table(var, 0.0, 50)


def test_sampler_with_a_noise_zero_reproduces_the_ode_sampler_bit_for_bit():
    grid = DenoiseGrid.uniform(10)
    noise = torch.randn(64, 5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ode = sample(gaussian_field, grid, ODERule(), "all", noise=noise)
    sde0 = sample(gaussian_field, grid, SDERule(0.0), "all", noise=noise, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ode.latents, sde0.latents)
    assert not ode.step_mask.any() and not sde0.step_mask.any() and sde0.log_probs.shape[0] == 0
    noisy = sample(gaussian_field, grid, SDERule(1e-3), "all", noise=noise, generator=torch.Generator().manual_seed(2))
    assert not torch.equal(ode.latents, noisy.latents)
    assert torch.equal(ode.latents[:, 0], noise)


def monte_carlo_final(rule, num_steps, field, num_samples, seed, chunk=50_000):
    """x_K of `num_samples` independent 1-D chains (batched as [B, 25, 1]) through the sampler."""
    grid = DenoiseGrid.uniform(num_steps)
    generator = torch.Generator().manual_seed(seed)
    finals = []
    for _ in range(num_samples // chunk):
        chain = sample(field, grid, rule, "all", batch_size=chunk // 25, action_shape=(25, 1),
                       generator=generator, dtype=torch.float64)
        finals.append(chain.actions.reshape(-1))
    return torch.cat(finals)


def assert_monte_carlo_variance(final, a_noise, num_steps=200):
    expected = VARIANCE_TABLE[a_noise][num_steps]
    assert final.var().item() == pytest.approx(expected, rel=0.01), (a_noise, final.var().item(), expected)


@pytest.mark.parametrize("a_noise", [0.0, 0.5, 0.7])
def test_monte_carlo_sde_sampler_reproduces_variance_table(a_noise):
    """K = 200, 1% relative (2e5 samples: a relative standard error of 0.3% on the variance)."""
    final = monte_carlo_final(SDERule(a_noise), 200, gaussian_field, 200_000, seed=10 + int(10 * a_noise))
    assert final.mean().item() == pytest.approx(DATA_MEAN, abs=4 * (0.09 / 200_000) ** 0.5)
    assert_monte_carlo_variance(final, a_noise)


def test_monte_carlo_detects_drift_sign_flip():
    final = monte_carlo_final(DriftSignFlippedSDERule(0.7), 200, gaussian_field, 50_000, seed=3)
    with pytest.raises(AssertionError):
        assert_monte_carlo_variance(final, 0.7)


def test_monte_carlo_gaussian_mixture():
    """0.3 N(-1, 0.2^2) + 0.7 N(1.5, 0.4^2), a_noise 0.7, K = 100: mean 0.750, variance 1.4365 and
    P(x < 0.25) = 0.300, each within 4 standard errors."""
    def mixture_field(x, t):
        return gaussian_mixture_velocity(x, t, (0.3, 0.7), (-1.0, 1.5), (0.04, 0.16))

    final = monte_carlo_final(SDERule(0.7), 100, mixture_field, 100_000, seed=4)
    n = final.numel()
    mean, var = final.mean(), final.var()
    mean_se = (var / n).sqrt()
    var_se = (((final - mean) ** 2).var() / n).sqrt()
    below = (final < 0.25).double().mean()
    assert abs(mean.item() - 0.750) < 4 * mean_se.item(), (mean.item(), mean_se.item())
    assert abs(var.item() - 1.4365) < 4 * var_se.item(), (var.item(), var_se.item())
    assert abs(below.item() - 0.300) < 4 * (0.3 * 0.7 / n) ** 0.5, below.item()


def mirrored_gaussian_velocity(x, tau):
    """πRL paper notation: A^tau = tau A + (1 - tau) eps, tau = 0 noise, v = E[A - eps | x]; derived
    independently of pirl.flow.toy."""
    tau = tau.reshape(-1, 1, 1)
    var_x = tau**2 * DATA_VAR + (1 - tau) ** 2
    return DATA_MEAN + (tau * DATA_VAR - (1 - tau)) / var_x * (x - tau * DATA_MEAN)


def mirrored_flow_sde_sampler(v_mirror, num_steps, a_noise, noise, generator):
    """Flow-SDE written wholly in the mirrored notation: tau goes 0 -> 1, drift v + (sigma^2/2) score with
    score = -(x - tau v) / (1 - tau), sigma = a sqrt((1 - tau) / tau) capped at tau = 0."""
    x = noise
    for k in range(num_steps):
        tau, tau_next = k / num_steps, (k + 1) / num_steps
        delta = tau_next - tau
        sigma = a_noise * ((1 - tau) / (tau if tau > 0 else tau_next)) ** 0.5
        v = v_mirror(x, torch.full((x.shape[0],), tau, dtype=x.dtype))
        score = -(x - tau * v) / (1 - tau)
        mean = x + delta * (v + 0.5 * sigma**2 * score)
        x = mean + sigma * delta**0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    return x


@pytest.mark.parametrize("a_noise", [0.0, 0.5])
def test_mirrored_convention_gives_the_same_samples(a_noise):
    num_steps = 10
    noise = torch.randn(256, 4, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    reference = mirrored_flow_sde_sampler(mirrored_gaussian_velocity, num_steps, a_noise, noise,
                                          torch.Generator().manual_seed(6))
    chain = sample(openpi_velocity_from_mirrored(mirrored_gaussian_velocity), DenoiseGrid.uniform(num_steps),
                   SDERule(a_noise), "all", noise=noise, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(chain.actions, reference, rtol=0, atol=1e-12)
    # and the mirrored field is the openpi closed form with the sign and time mapped
    tau = torch.rand(256, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    torch.testing.assert_close(openpi_velocity_from_mirrored(mirrored_gaussian_velocity)(noise, 1 - tau),
                               gaussian_field(noise, 1 - tau), rtol=0, atol=1e-12)
    # using the mirrored field unconverted (the classic bug) gives different samples
    wrong = sample(mirrored_gaussian_velocity, DenoiseGrid.uniform(num_steps), SDERule(a_noise), "all",
                   noise=noise, generator=torch.Generator().manual_seed(6))
    assert (wrong.actions - reference).abs().max() > 0.1


@pytest.mark.parametrize("num_steps", [4, 10])
def test_noise_before_the_last_step_is_denoised_away_for_a_near_deterministic_policy(num_steps):
    """Why `sampler.mask_low=-1` exists (bench/results/noise_propagation.md).

    Same initial noise, one stochastic step at index k (noise std_k * xi), the rest ODE. gain_k is the
    regression slope of the final sample on std_k * xi. For near-point-mass data (a confident policy) every Euler step
    after k contracts the perturbation towards the mode, so gain_k ~ 0 for k < K-1 (that sample's
    outcome barely depends on the noise its log-prob is taken on), and gain_{K-1} = 1 exactly. For
    broad data the early noise survives."""
    grid = DenoiseGrid.uniform(num_steps)
    batch = 4000
    x0 = torch.randn(batch, 1, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def gains(var):
        field = lambda x, t: gaussian_velocity(x, t, DATA_MEAN, var)  # noqa: E731
        ode = sample(field, grid, ODERule(), "none", noise=x0).actions
        out = []
        for k in range(num_steps):
            mask = torch.zeros(batch, num_steps, dtype=torch.bool)
            mask[:, k] = True
            chain = sample(field, grid, SDERule(0.5), mask, noise=x0, generator=torch.Generator().manual_seed(k + 1))
            std = chain.stds.flatten()
            xi = (chain.latents[:, k + 1].flatten() - chain.means.flatten()) / std
            shift = (chain.actions - ode).flatten()
            out.append((torch.mean(shift * xi) / (std[0] * torch.mean(xi * xi))).item())
        return out

    confident = gains(1e-4)
    assert max(confident[:-1]) < 0.01, confident
    assert confident[-1] == pytest.approx(1.0, abs=0.05)  # the last step's noise is the action noise
    broad = gains(1.0)
    assert min(broad) > 0.5, broad  # a wide policy keeps early noise: the mask choice matters less
