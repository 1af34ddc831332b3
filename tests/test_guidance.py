"""Test-time guidance (METHODS.md §5) against closed forms, on the exact velocity of a 1-D mixture.

Data: 0.5 N(-1.5, 0.2^2) + 0.5 N(+1.5, 0.2^2), so the plain ODE puts half its mass on each mode and
the critic's preference is the only thing that can move it. Every statistical test has a negative
control that the same assertion would catch (a flipped sign, plain sampling, shared candidates).
"""
import math

import pytest
import torch

from pirl.flow import DenoiseGrid, ODERule, euler_step, sample, sample_chain
from pirl.flow.sampler import evaluate_velocity
from pirl.flow.toy import gaussian_mixture_velocity
from pirl.guidance import (
    GuidanceConfig,
    GuidanceStats,
    JacobianGuidedVelocity,
    OODGuidance,
    QGFGuidance,
    best_of_n_index,
    bptt_direction,
    gradstep_ascent,
    guided_sample,
    jacobian_direction,
    qgf_direction,
    tile_q,
)
from pirl.guidance.config import METHODS, VELOCITY_GUIDED

MODES, MODE_VAR = (-1.5, 1.5), 0.04
GRID = DenoiseGrid.uniform(10)
NUM_SAMPLES = 8000


def mixture_field(x, t):
    return gaussian_mixture_velocity(x, t, (0.5, 0.5), MODES, (MODE_VAR, MODE_VAR))


def q_good_mode(actions):
    """Q = -(a - 1.5)^2 summed over the chunk: the +1.5 mode is the good one."""
    return -((actions - 1.5) ** 2).sum(dim=(1, 2))


def q_spurious_bump(actions):
    """A critic error: a tall narrow bump at a = 0, between the modes, where no data lies."""
    return (3.0 * torch.exp(-actions**2 / (2 * 0.3**2))).sum(dim=(1, 2))


def toy_noise(num=NUM_SAMPLES, seed=0, candidates=None, dtype=torch.float32):
    shape = (num, 1, 1) if candidates is None else (candidates, num, 1, 1)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def plain_actions(noise):
    return sample(mixture_field, GRID, ODERule(), "none", noise=noise).actions


def good_mass(actions):
    return float((actions > 0).float().mean())


def run(cfg, q_fn=q_good_mode, noise=None):
    return guided_sample(mixture_field, None, q_fn, cfg, grid=GRID, noise=toy_noise() if noise is None else noise)


# -- config ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(method="cfg"), "method must be one of"),
    (dict(method="qgf", weight=-0.5), "weight must be finite and >= 0"),
    (dict(method="qgf", weight=float("nan")), "weight must be finite"),
    (dict(method="best_of_n", n=0), "n must be an integer >= 1"),
    (dict(method="best_of_n", weight=0.5), "does not use weight"),
    (dict(method="qgf", n=4), "does not use n"),
    (dict(method="gradstep", gradstep_size=-1.0), "gradstep_size must be"),
    (dict(method="qgf", weight=1.0, clip=(1.0, -1.0)), "clip must be None or finite"),
])
def test_config_rejects_bad_or_ignored_fields_in_one_line(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        GuidanceConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_config_accepts_every_method_with_its_own_fields():
    for method in METHODS:
        GuidanceConfig(method)
    assert GuidanceConfig("qgf", weight=0.5, clip=[-2, 2]).clip == (-2.0, 2.0)
    assert GuidanceConfig("qgf_best_of_n", weight=0.5, n=4).num_candidates == 4
    assert GuidanceConfig("qgf", weight=0.5, clip=None).clip is None


def test_guidance_without_a_critic_is_refused():
    with pytest.raises(ValueError, match="needs a q_fn"):
        run(GuidanceConfig("qgf", weight=0.5), q_fn=None)


# -- QGF moves mass to the high-Q mode (METHODS.md §5 reference: 0.50 -> 0.90) --------------------

def test_qgf_moves_the_high_q_modes_mass_from_half_to_about_ninety_percent():
    plain = good_mass(run(GuidanceConfig("qgf", weight=0.0)).actions)
    guided = good_mass(run(GuidanceConfig("qgf", weight=0.5)).actions)
    assert 0.47 <= plain <= 0.53, plain
    assert 0.85 <= guided <= 0.95, guided


def test_qgf_with_the_sign_flipped_moves_mass_the_wrong_way():
    """Negative control: v + w g (the mirrored-convention sign bug) must fail the band above."""
    stats = GuidanceStats(batch_size=NUM_SAMPLES)
    flipped = QGFGuidance(q_good_mode, -0.5, (-1.0, 1.0), stats)
    mass = good_mass(sample(mixture_field, GRID, ODERule(), "none", noise=toy_noise(),
                            velocity_transforms=[flipped]).actions)
    assert mass < 0.3, mass  # measured 0.20


# -- w = 0 is the plain sampler, bit for bit ------------------------------------------------------

@pytest.mark.parametrize("method", VELOCITY_GUIDED)
def test_zero_weight_is_the_plain_sampler_bit_for_bit(method):
    cfg = GuidanceConfig(method, weight=0.0, n=3) if "best_of_n" in method else GuidanceConfig(method)
    if "best_of_n" in method:  # w = 0 QGF + best-of-N is best-of-N: candidate 0 is the plain chain
        noise = toy_noise(500, candidates=3)
        out = run(cfg, noise=noise)
        plain = torch.stack([plain_actions(noise[j]) for j in range(3)])
        best = q_good_mode(plain.flatten(0, 1)).reshape(3, 500).argmax(0)
        assert torch.equal(out.actions, plain[best, torch.arange(500)])
        return
    noise = toy_noise(500)
    out = run(cfg, noise=noise)
    assert torch.equal(out.actions, plain_actions(noise))
    assert out.stats.q_rows == 0 and out.stats.ratios == []


@pytest.mark.parametrize("transform", ["qgf", "ood", "jacobian"])
def test_zero_weight_guided_velocity_arithmetic_changes_nothing(transform):
    """The guided velocities themselves with w = 0 (critic called, w g = 0) leave the chain untouched."""
    noise, stats = toy_noise(500), GuidanceStats(batch_size=500)
    field, transforms = mixture_field, []
    if transform == "qgf":
        transforms = [QGFGuidance(q_good_mode, 0.0, (-1.0, 1.0), stats)]
    elif transform == "ood":
        transforms = [OODGuidance(q_good_mode, 0.0, stats)]
    else:
        field = JacobianGuidedVelocity(mixture_field, q_good_mode, 0.0, (-1.0, 1.0), stats)
    chain = sample(field, GRID, ODERule(), "none", noise=noise, velocity_transforms=transforms)
    assert torch.equal(chain.actions, plain_actions(noise))
    assert len(stats.ratios) == GRID.num_steps and all(float(r.max()) == 0.0 for r in stats.ratios)


# -- the OOD gradient follows a critic bump off the data; QGF does not ----------------------------

def test_ood_gradient_follows_a_spurious_bump_off_the_data_and_qgf_does_not():
    def mass_near_bump(actions):
        return float((actions.abs() < 0.5).float().mean())

    plain = mass_near_bump(run(GuidanceConfig("none"), q_fn=None).actions)
    qgf = mass_near_bump(run(GuidanceConfig("qgf", weight=1.0), q_fn=q_spurious_bump).actions)
    ood = mass_near_bump(run(GuidanceConfig("ood", weight=1.0), q_fn=q_spurious_bump).actions)
    assert plain < 0.02, plain  # negative control: the data has no mass at 0
    assert qgf < 0.05, qgf  # QGF scores clean estimates, which sit on the modes
    assert ood > 0.5, ood  # the noisy latent starts near 0 and is pulled into the bump


# -- best-of-N: P(best candidate in the good mode) = 1 - 0.5^N ------------------------------------

@pytest.mark.parametrize("n", [1, 2, 4, 8])
def test_best_of_n_matches_its_closed_form(n):
    num = 4000
    out = run(GuidanceConfig("best_of_n", n=n), noise=toy_noise(num, seed=n, candidates=n))
    expected = 1 - 0.5**n
    tolerance = 4 * math.sqrt(expected * (1 - expected) / num) + 0.01
    assert abs(good_mass(out.actions) - expected) <= tolerance, (good_mass(out.actions), expected)
    assert torch.equal(out.chain.actions, out.actions) and torch.equal(out.q, q_good_mode(out.actions))
    assert out.stats.per_chunk() == {"velocity_evals": 10.0 * n, "velocity_backwards": 0.0,
                                     "q_evals": float(n), "q_backwards": 0.0}


def test_best_of_n_with_identical_candidates_gains_nothing():
    """Negative control: N copies of the same noise are one sample; the closed form above must fail."""
    shared = toy_noise(4000, seed=3).expand(4, 4000, 1, 1).contiguous()
    mass = good_mass(run(GuidanceConfig("best_of_n", n=4), noise=shared).actions)
    assert abs(mass - 0.5) < 0.04, mass


def test_qgf_plus_best_of_n_beats_either_alone():
    noise = toy_noise(4000, seed=5, candidates=2)
    both = good_mass(run(GuidanceConfig("qgf_best_of_n", weight=0.5, n=2), noise=noise).actions)
    assert both > 0.95, both  # QGF alone ~0.91, best-of-2 alone 0.75


# -- gradients against finite differences (float64) -----------------------------------------------

H, D = 3, 2
MIXING = torch.tensor([[0.9, -0.4, 0.3, 0.2, -0.7, 0.5],
                       [0.1, 0.8, -0.6, 0.4, 0.3, -0.2],
                       [-0.5, 0.2, 0.7, -0.3, 0.6, 0.4],
                       [0.3, -0.6, 0.2, 0.9, -0.1, 0.5],
                       [0.6, 0.3, -0.2, -0.5, 0.8, 0.1],
                       [-0.2, 0.5, 0.4, 0.1, -0.3, 0.7]], dtype=torch.float64)
TARGET = torch.linspace(-0.8, 0.9, H * D, dtype=torch.float64).reshape(1, H, D)


def coupled_field(x, t):
    """A nonlinear field that mixes every element of the chunk, so J is far from the identity."""
    t = t.reshape(-1, 1)
    return (torch.tanh(x.flatten(1) @ MIXING) * (0.5 + t) + x.flatten(1) * t).reshape(x.shape)


def coupled_q(actions):
    return -(((actions - TARGET) ** 2).sum(dim=(1, 2))) + 0.3 * actions[:, 0, 0] * actions[:, 2, 1]


def central_difference(f, x, eps=1e-6):
    grad = torch.zeros_like(x)
    for i in range(x[0].numel()):
        step = torch.zeros_like(x).flatten(1)
        step[:, i] = eps
        step = step.reshape(x.shape)
        grad.flatten(1)[:, i] = (f(x + step) - f(x - step)) / (2 * eps)
    return grad


@pytest.mark.parametrize("field, q_fn, shape", [(coupled_field, coupled_q, (4, H, D)),
                                                 (mixture_field, q_good_mode, (4, 1, 1))])
@pytest.mark.parametrize("t_value", [0.9, 0.5, 0.2])
def test_jacobian_direction_equals_finite_differences(field, q_fn, shape, t_value):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.5
    t = torch.full((shape[0],), t_value, dtype=torch.float64)
    g, v = jacobian_direction(field, q_fn, x, t, clip=None)
    fd = central_difference(lambda z: q_fn(z - t_value * field(z, t)), x)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=1e-7)
    assert torch.equal(v, field(x, t))
    # Negative control: plain QGF (J = I) is a different direction whenever v depends on x.
    assert not torch.allclose(qgf_direction(q_fn, x, t, v, clip=None), fd, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("field, q_fn, shape", [(coupled_field, coupled_q, (4, H, D)),
                                                 (mixture_field, q_good_mode, (4, 1, 1))])
@pytest.mark.parametrize("step", [0, 2, 4])
def test_bptt_direction_equals_finite_differences(field, q_fn, shape, step):
    grid = DenoiseGrid.uniform(5)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    g, v = bptt_direction(field, q_fn, x, grid, step)
    rest = DenoiseGrid.from_times(grid.times[step:])  # the sampler itself runs the remaining steps
    fd = central_difference(lambda z: q_fn(sample(field, rest, ODERule(), "none", noise=z).actions), x)
    torch.testing.assert_close(g, fd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(v, field(x, torch.full((shape[0],), grid.times[step], dtype=torch.float64)))
    if step < grid.num_steps - 1:  # negative control: stopping after one step is not the same gradient
        one_step = DenoiseGrid.from_times(grid.times[step:step + 2])
        short = central_difference(lambda z: q_fn(sample(field, one_step, ODERule(), "none", noise=z).actions), x)
        assert not torch.allclose(short, fd, rtol=1e-3, atol=1e-4)


# -- GradStep -------------------------------------------------------------------------------------

def test_gradstep_increases_q_and_a_zero_step_changes_nothing():
    noise = toy_noise(500)
    plain = plain_actions(noise)
    # The toy's modes (+-1.5) lie outside the (-1, 1) box, so the monotone check runs unprojected.
    out = run(GuidanceConfig("gradstep", gradstep_steps=3, gradstep_size=0.1, clip=None), noise=noise)
    assert (q_good_mode(out.actions) > q_good_mode(plain)).all()
    assert float(q_good_mode(out.actions).mean()) > float(q_good_mode(plain).mean()) + 0.5
    assert torch.equal(out.chain.actions, plain)  # the chain is the plain one; the ascent came after
    assert out.stats.per_chunk()["q_backwards"] == 3.0
    projected = run(GuidanceConfig("gradstep", gradstep_steps=3, gradstep_size=0.1), noise=noise)
    assert projected.actions.abs().max() <= 1.0 and plain.abs().max() > 1.0
    zero = run(GuidanceConfig("gradstep", gradstep_steps=3, gradstep_size=0.0), noise=noise)
    assert torch.equal(zero.actions, plain)


# -- compute accounting and the logged ratio ------------------------------------------------------

def test_compute_per_chunk_and_logged_ratio():
    k = GRID.num_steps
    expected = {
        "qgf": (k, 0, k, k),
        "ood": (k, 0, k, k),
        "qgf_jacobian": (k, k, k, k),
        "bptt": (k * (k + 1) / 2, k * (k + 1) / 2, k, k),
    }
    for method, counts in expected.items():
        out = run(GuidanceConfig(method, weight=0.5), noise=toy_noise(100))
        per_chunk = out.stats.per_chunk()
        assert tuple(per_chunk.values()) == tuple(float(c) for c in counts), (method, per_chunk)
        assert len(out.stats.ratio_per_step()) == k
    # The logged ratio is ||w g|| / ||v|| of the step actually taken.
    x, t = toy_noise(100), torch.full((100,), 0.7)
    v = mixture_field(x, t)
    stats = GuidanceStats(batch_size=100)
    v_guided = QGFGuidance(q_good_mode, 0.5, (-1.0, 1.0), stats)(x, t, v)
    torch.testing.assert_close(stats.ratios[0], (v_guided - v).flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1))


# -- the real policies: tiny π0 / π0.5 on CPU, full π0 / π0.5 on `meta` -----------------------------

def executed_chunk_q(state):
    """A critic stand-in bound to the observations: prefers the first 5 steps near tanh(state)."""
    def q(actions):
        target = torch.tanh(state[:, None, : actions.shape[-1]])
        return -((actions[:, :5] - target) ** 2).sum(dim=(1, 2))

    return q


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_every_method_runs_on_a_tiny_policy_with_the_prefix_computed_once(variant):
    from vla.testing import random_inputs, tiny_policy

    policy = tiny_policy(seed=0, variant=variant)
    batch, cfg_model = 3, policy.config
    inputs = random_inputs(policy, batch, seed=1)
    with torch.no_grad():
        prefix = policy.embed_prefix(inputs)
    q_fn = executed_chunk_q(inputs.state)
    noise = torch.randn(batch, cfg_model.action_horizon, cfg_model.action_dim, generator=torch.Generator().manual_seed(0))
    plain = sample_chain(policy, prefix=prefix, rule=ODERule(), step_mask="none", noise=noise).actions

    with torch.no_grad():  # how `act` and `pirl eval` call it
        zero = guided_sample(policy, prefix, q_fn, GuidanceConfig("qgf", weight=0.0), noise=noise)
        assert torch.equal(zero.actions, plain)
        configs = [GuidanceConfig("qgf", weight=2.0), GuidanceConfig("qgf_jacobian", weight=2.0),
                   GuidanceConfig("ood", weight=2.0), GuidanceConfig("bptt", weight=0.2),
                   GuidanceConfig("gradstep", gradstep_steps=2, gradstep_size=0.05),
                   GuidanceConfig("best_of_n", n=3), GuidanceConfig("qgf_best_of_n", weight=2.0, n=3)]
        for cfg in configs:
            n = cfg.num_candidates
            x0 = noise if n == 1 else torch.cat([noise[None], torch.randn(n - 1, *noise.shape)])
            out = guided_sample(policy, prefix, q_fn, cfg, noise=x0)
            assert out.actions.shape == plain.shape and torch.isfinite(out.actions).all(), cfg.method
            assert not torch.equal(out.actions, plain), cfg.method
            assert out.stats.per_chunk()["velocity_evals"] >= cfg_model.num_steps * n
    assert not any(p.grad is not None for p in policy.parameters())  # guidance never touches weights
    qgf = guided_sample(policy, prefix, q_fn, GuidanceConfig("qgf", weight=2.0), noise=noise)
    assert float(q_fn(qgf.actions).mean()) > float(q_fn(plain).mean())


@pytest.mark.parametrize("name", ["pi0", "pi05"])
def test_guided_sample_runs_end_to_end_on_the_full_configs_on_meta(name):
    """Shapes only, no memory: `guided_sample` itself, every method but BPTT, on the published sizes
    (π0 / π0.5 built on `meta`). BPTT reads the step index off t's value, which meta cannot give."""
    from vla.config import get_config
    from vla.policy import FlowPolicy
    from vla.testing import random_inputs

    with torch.device("meta"):
        policy = FlowPolicy(get_config(name))
    batch, cfg_model = 2, policy.config
    inputs = random_inputs(policy, batch).to("meta")
    prefix = policy.embed_prefix(inputs)
    q_fn = executed_chunk_q(inputs.state)
    methods = [GuidanceConfig("qgf", weight=0.5), GuidanceConfig("ood", weight=0.5),
               GuidanceConfig("qgf_jacobian", weight=0.5),
               GuidanceConfig("gradstep", gradstep_steps=2, gradstep_size=0.1),
               GuidanceConfig("best_of_n", n=2), GuidanceConfig("qgf_best_of_n", weight=0.5, n=2)]
    for cfg in methods:
        out = guided_sample(policy, prefix, q_fn, cfg, grid=DenoiseGrid.uniform(2))  # shapes need few steps
        assert out.actions.is_meta and out.actions.shape == (batch, cfg_model.action_horizon,
                                                             cfg_model.action_dim), cfg.method
        assert out.chain.latents.shape[:2] == (batch, 3), cfg.method
