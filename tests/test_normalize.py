"""Normalisation that cannot explode, one NormStats, exploration set in the env's raw units (METHODS.md §2)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pirl.flow.steps import FixedNoiseRule, sde_sigma, sde_step
from vla.normalize import NormStats, load_norm_stats, normalize, raw_to_normalized_std, save_norm_stats, unnormalize

ROOT = Path(__file__).resolve().parents[1]


def demo_like_state(n=2000, seed=0):
    """Three informative dims (std ~0.1) and one that is constant up to 1e-4 (a cube's tilt in demos)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.1, size=(n, 4))
    x[:, 3] = 0.0005 + 1e-4 * rng.normal(size=n)
    return x


@pytest.mark.parametrize("mode", ["zscore", "quantile"])
def test_a_dim_constant_in_the_data_cannot_leave_the_clip(mode):
    data = demo_like_state()
    off_demo = np.array([[0.0, 0.0, 0.0, 0.03]])  # a 3-degree tilt: 300 data stds away
    plain = NormStats.from_data(data, mode=mode)
    robust = plain.robust(floor_frac=0.25, clip=3.0)
    # negative control: without the floor the z-score of the tilt is in the hundreds
    if mode == "zscore":
        assert abs(normalize(off_demo, plain)[0, 3]) > 100
    z = normalize(off_demo * np.array([1, 1, 1, 1e3]), robust)  # even absurd raw values stay inside the clip
    assert np.all(np.abs(z) <= 3.0 + 1e-12)
    # the floor alone keeps the small tilt moderate: 0.03 / (0.25 * ~0.1) ~ 1.2 (z-score)
    assert abs(normalize(off_demo, robust)[0, 3]) < 3.0
    # informative dims are untouched by the floor (their std is the median)
    inside = data[:5] * 0.1  # well inside q01..q99, where the quantile clip of the plain stats does not act
    np.testing.assert_allclose(normalize(inside, robust)[:, :3], normalize(inside, plain)[:, :3], atol=1e-12)


def test_near_constant_dims_are_dropped_and_fed_as_zero():
    data = demo_like_state()
    stats = NormStats.from_data(data, mode="zscore").robust(floor_frac=0.25, drop_frac=0.05, clip=3.0)
    assert stats.drop == (3,)
    z = normalize(np.array([[0.1, -0.1, 0.2, 5.0]]), stats)
    assert z[0, 3] == 0.0 and z[0, 0] != 0.0


def test_stats_round_trip_through_json(tmp_path):
    stats = {"state": NormStats.from_data(demo_like_state(), mode="zscore").robust(floor_frac=0.25, drop_frac=0.05, clip=3.0),
             "actions": NormStats.from_data(np.random.default_rng(1).normal(size=(100, 7)), mode="zscore")}
    save_norm_stats(stats, tmp_path / "norm_stats.json")
    loaded = load_norm_stats(tmp_path / "norm_stats.json")
    x = demo_like_state(7, seed=3) * 5
    for key in stats:
        assert loaded[key].to_json() == stats[key].to_json()
    np.testing.assert_array_equal(normalize(x, loaded["state"]), normalize(x, stats["state"]))
    assert loaded["state"].drop == (3,) and loaded["state"].clip == 3.0 and loaded["state"].mode == "zscore"


@pytest.mark.parametrize("checkpoint", ["pickcube_tiny_sft", "pickcube_tiny_sft_18k_step6k"])
def test_an_old_norm_stats_file_loads_and_normalises_as_before(checkpoint):
    path = ROOT / "assets" / checkpoint / "norm_stats.json"
    raw = json.loads(path.read_text())["norm_stats"]
    stats = load_norm_stats(path)
    rng = np.random.default_rng(0)
    for key in ("state", "actions"):
        mean, std = np.asarray(raw[key]["mean"]), np.asarray(raw[key]["std"])
        q01, q99 = np.asarray(raw[key]["q01"]), np.asarray(raw[key]["q99"])
        x = mean + std * rng.normal(size=(16, len(mean))) * 3
        # the formulas these files were written for: z-score without clip, quantile clipped to [-1, 1]
        np.testing.assert_allclose(normalize(x, stats[key], "zscore"), (x - mean) / (std + 1e-6), rtol=1e-12)
        expect_q = np.clip(2.0 * (x - q01) / (q99 - q01 + 1e-6) - 1.0, -1, 1)
        np.testing.assert_allclose(normalize(x, stats[key], "quantile"), expect_q, rtol=1e-9, atol=1e-12)
        z = rng.normal(size=(4, len(mean)))
        np.testing.assert_allclose(unnormalize(z, stats[key], "zscore"), z * (std + 1e-6) + mean, rtol=1e-12)


@pytest.mark.parametrize("mode", ["zscore", "quantile"])
def test_normalize_inverts_and_matches_its_mode(mode):
    values = np.random.default_rng(2).uniform(-3, 5, size=(1000, 3))
    stats = NormStats.from_data(values, mode=mode)
    wide = NormStats.from_data(values, mode=mode, clip=100.0)  # no clip acts: the map inverts exactly
    np.testing.assert_allclose(unnormalize(normalize(values, wide), wide), values, rtol=1e-9, atol=1e-9)
    normed = normalize(values, stats)
    if mode == "quantile":  # q01 -> -1, q99 -> +1; the 2% outside is clipped to the bounds
        assert np.mean(np.abs(normed) < 1) == pytest.approx(0.98, abs=0.01)
    else:
        np.testing.assert_allclose(normed.mean(0), 0, atol=1e-6)
        np.testing.assert_allclose(normed.std(0), 1, atol=1e-5)


def test_lerobot_action_key_and_entries_without_quantiles_load(tmp_path):
    (tmp_path / "stats.json").write_text(json.dumps({"state": {"mean": [0.0, 1.0], "std": [1.0, 2.0]},
                                                     "action": {"mean": [0.5], "std": [0.25]}}))
    stats = load_norm_stats(tmp_path / "stats.json")
    assert set(stats) == {"state", "actions"}
    np.testing.assert_allclose(stats["state"].q99, [2.326, 1.0 + 2 * 2.326])


def test_raw_std_converts_by_each_dims_scale():
    stats = NormStats(mean=np.zeros(3), std=np.array([0.05, 0.1, 0.5]), q01=-np.ones(3), q99=np.ones(3))
    np.testing.assert_allclose(raw_to_normalized_std(0.01, stats, "zscore"), 0.01 / (np.array([0.05, 0.1, 0.5]) + 1e-6))
    np.testing.assert_allclose(raw_to_normalized_std([0.1, 0.2, 0.3], stats, "quantile"), np.array([0.1, 0.2, 0.3]) / (1 + 5e-7))
    with pytest.raises(ValueError, match="one per action dim"):
        raw_to_normalized_std([0.1, 0.2], stats, "zscore")


@pytest.mark.parametrize("k,num_steps", [(0, 4), (2, 4), (3, 4), (9, 10)])
def test_fixed_noise_step_is_the_euler_step_plus_the_set_std(k, num_steps):
    """Every stochastic step's std is the configured one, centred on the Euler step; Flow-SDE's drift
    correction at that std would move the mean by std^2 / (2 t) times the noise estimate instead."""
    torch.manual_seed(0)
    t, dt = 1.0 - k / num_steps, 1.0 / num_steps
    x, v = torch.randn(5, 3, 4), torch.randn(5, 3, 4)
    step_std = torch.tensor([0.02, 0.05, 0.1, 1.0])
    out = FixedNoiseRule(step_std).step(x, v, t, dt)
    torch.testing.assert_close(out.std, step_std.expand(5, 3, 4))
    torch.testing.assert_close(out.mean, x - dt * v)
    rows = FixedNoiseRule(step_std).step(x, v, torch.full((5,), t), torch.full((5,), dt))  # per-row times
    torch.testing.assert_close(rows.mean, out.mean)
    torch.testing.assert_close(rows.std, out.std)
    # what the drift-corrected step would do with the same std (a_noise giving std 1 at this step)
    a_noise = 1.0 / (float(sde_sigma(t, dt, 1.0)) * math.sqrt(dt))
    shift = (sde_step(x, v, t, dt, a_noise).mean - (x - dt * v)).abs().mean()
    assert shift > 0.3 * 1.0 / (2 * t)  # ~ std^2 / (2 t) * |e_hat|: a displacement as big as the noise or more


def test_agent_explores_with_the_configured_raw_std_in_env_units(tmp_path):
    """Closed form: last-step noise of raw std r moves the executed, un-normalised action by exactly r
    per dim (the sample's std is r / scale in normalised units, and un-normalising multiplies by scale)."""
    from pirl.train.rl_core import Agent, SamplerConfig, act
    from vla.config import get_config
    from vla.policy import FlowPolicy
    from vla.processor import Processor, build_test_tokenizer

    torch.manual_seed(0)
    cfg = get_config("tiny")
    policy = FlowPolicy(cfg).eval()
    d = 5
    actions = NormStats(mean=np.linspace(-0.1, 0.1, d), std=np.array([0.06, 0.07, 0.13, 0.012, 0.26]),
                        q01=-np.ones(d), q99=np.ones(d), mode="zscore")
    state = NormStats(mean=np.zeros(3), std=np.ones(3), q01=-np.ones(3), q99=np.ones(3))
    processor = Processor(cfg, build_test_tokenizer(tmp_path / "tok"), {"state": state, "actions": actions})
    raw = (0.01, 0.02, 0.03, 0.005, 0.1)
    sampler = SamplerConfig(num_steps=4, explore_std=raw, mask="hybrid", mask_low=-1)
    agent = Agent.build(policy, sampler, actions)
    n = 512
    obs = {"images": {}, "state": np.zeros((n, 3), np.float32), "prompt": ["pick up the red cube"] * n}
    _, chain, _, env_actions = act(agent, processor, obs, sampler, torch.Generator().manual_seed(1))
    assert chain.stds.shape[0] == n  # one stochastic (last) step per sample
    scale = torch.tensor(actions.std + 1e-6, dtype=torch.float32)
    torch.testing.assert_close(chain.stds[:, :, :d] * scale, torch.tensor(raw).expand(n, cfg.action_horizon, d),
                               rtol=1e-5, atol=1e-7)
    moved = env_actions - processor.unnormalize_actions(chain.means)  # the executed action minus its mean
    np.testing.assert_allclose(moved.reshape(-1, d).std(0), raw, rtol=0.08)  # Monte Carlo, 512 x H draws


def test_flow_noise_bounds_in_raw_units_bound_every_step_in_env_units(tmp_path):
    from pirl.train.rl_core import Agent, SamplerConfig, act
    from vla.config import get_config
    from vla.policy import FlowPolicy
    from vla.processor import Processor, build_test_tokenizer

    torch.manual_seed(0)
    cfg = get_config("tiny")
    d = 4
    actions = NormStats(mean=np.zeros(d), std=np.array([0.05, 0.1, 0.2, 0.4]), q01=-np.ones(d), q99=np.ones(d))
    state = NormStats(mean=np.zeros(3), std=np.ones(3), q01=-np.ones(3), q99=np.ones(3))
    processor = Processor(cfg, build_test_tokenizer(tmp_path / "tok"), {"state": state, "actions": actions})
    sampler = SamplerConfig(kind="flow_noise", num_steps=4, mask="all", noise_std_min=0.005, noise_std_max=0.02,
                            noise_bounds_units="raw")
    agent = Agent.build(FlowPolicy(cfg).eval(), sampler, actions)
    torch.nn.init.normal_(agent.noise_head.out.weight, std=3.0)  # spread the stds over the whole range
    obs = {"images": {}, "state": np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32),
           "prompt": ["pick up the red cube"] * 64}
    _, chain, _, _ = act(agent, processor, obs, sampler, torch.Generator().manual_seed(0))
    raw = chain.stds[..., :d] * torch.tensor(actions.std + 1e-6, dtype=torch.float32)
    assert raw.min() >= 0.005 * (1 - 1e-5) and raw.max() <= 0.02 * (1 + 1e-5)
    assert raw.min() < 0.006 and raw.max() > 0.018
    with pytest.raises(ValueError, match="Flow-SDE setting"):
        SamplerConfig(kind="flow_noise", explore_std=(0.01,))


def test_range_clip_keeps_the_datas_own_tails_and_bounds_what_it_never_held():
    """A skewed dim (a cube mostly on the table, sometimes lifted high) keeps its whole data range,
    where a clip at ±3 stds would cut it; a constant dim cannot leave floor-scaled ±margin."""
    rng = np.random.default_rng(0)
    height = np.where(rng.random(5000) < 0.95, 0.02, rng.uniform(0.02, 0.32, 5000))
    data = np.stack([rng.normal(0, 0.1, 5000), height, np.full(5000, 0.7)], 1)
    stats = NormStats.from_data(data, mode="zscore").robust(floor_frac=0.25, range_margin=0.5)
    top = normalize(np.array([[0.0, height.max(), 0.7]]), stats)[0, 1]
    assert top > 3.0  # the highest lift in the data is > 3 stds above the mean height, and kept
    assert normalize(np.array([[0.0, 5.0, 0.7]]), stats)[0, 1] == pytest.approx(top + 0.5)
    far = normalize(np.array([[50.0, -5.0, 9.0]]), stats)[0]
    assert far[2] == pytest.approx(0.5) and far[0] <= normalize(data, stats)[:, 0].max() + 0.5 + 1e-9
    loaded = NormStats.from_json(stats.to_json())
    np.testing.assert_array_equal(normalize(data[:50] * 3, loaded), normalize(data[:50] * 3, stats))
