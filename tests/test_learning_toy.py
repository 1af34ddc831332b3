"""Every RL method must learn a task that a correct policy-gradient setup cannot fail to learn.

The toy env (envs/toy.py, experiment toy_sanity) succeeds iff the mean of action dim 0 over a 5-step
episode exceeds a threshold; at threshold 0 the shipped SFT policy succeeds about half the time. The
full trainer (`pirl.train.rl.train`: rollout, GAE or GRPO advantages, PPO epochs on the exact chain
likelihood) must raise that by a wide margin within ten iterations. A sign error in the advantage or the log-ratio, a
ratio taken over the wrong elements, or a sampler whose likelihood does not match what it sampled
shows up here as a flat or falling curve, in seconds, where PickCube would need an hour to tell.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from envs import make_env
from pirl.cli import compose_train
from pirl.train import rl
from pirl.train.rl import RLConfig, build_agent, processor_for, train
from pirl.train.rl_core import evaluate

ENV = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "env" / "toy.yaml").read_text())
PROMPT = ENV["prompt"]

METHODS = {
    "flow_sde_ppo": ["sampler=flow_sde", "algo=ppo"],
    "flow_noise_ppo": ["sampler=flow_noise", "algo=ppo"],
    "flow_sde_grpo": ["sampler=flow_sde", "algo=grpo"],
}


def _config(out: Path, method: str) -> RLConfig:
    return compose_train(["experiment=toy_sanity", *METHODS[method], f"run.output_dir={out}"])


def _initial_ode_eval(cfg: RLConfig) -> dict:
    sft = cfg.run.init_checkpoint
    agent = build_agent(sft, cfg.sampler, cfg.optim.trainable)
    with make_env({**cfg.env, "num_envs": cfg.run.eval_episodes, "seed": 0}) as env:
        return evaluate(agent, processor_for(sft, {}), env, cfg.run.eval_episodes, cfg.run.n_exec,
                        cfg.sampler.num_steps, cfg.run.eval_seed)


def _initial_ode_success(cfg: RLConfig) -> float:
    return _initial_ode_eval(cfg)["success_rate"]


@pytest.mark.parametrize("method", list(METHODS))
def test_rl_method_learns_the_toy_task(method, tmp_path):
    cfg = _config(tmp_path, method)
    before = _initial_ode_success(cfg)
    assert 0.2 <= before <= 0.8, f"the toy threshold should start the SFT policy near 50%, got {before}"
    history = train(cfg)["history"]
    rollout = np.array([h["success_once"] for h in history])
    print(f"{method}: ODE success {before:.2f} -> {history[-1]['eval_success_rate']:.2f}; rollouts {rollout.round(2)}")
    after = history[-1]["eval_success_rate"]
    # Deterministic (ODE) evaluation on the same seeds, and the stochastic rollouts, both rise.
    assert after >= before + 0.25, f"{method}: ODE success {before:.2f} -> {after:.2f}; rollouts {rollout.round(2)}"
    assert rollout[-3:].mean() >= rollout[:2].mean() + 0.2, f"{method}: rollouts {rollout.round(2)}"
    # The first minibatch is scored under the weights the chains were sampled with: ratio exactly 1.
    assert max(h["first_log_ratio"] for h in history) < 1e-3


def _cued_config(out: Path, seed: int = 0) -> RLConfig:
    return compose_train(["experiment=toy_cued", f"run.output_dir={out}", f"run.seed={seed}"])


def test_ppo_learns_to_read_a_per_chunk_cue_and_mispaired_rewards_teach_nothing(tmp_path, monkeypatch):
    """The cued task (experiment toy_cued): each of an episode's two chunks is paid for putting action
    dim 0 on the side of the threshold that a state cue, redrawn per chunk, points to. A policy blind
    to its state earns at most 0.5 per episode (the return is the fraction of steps paid), so a
    return well above it means the gradient reached the state input and each chunk was credited
    with its own reward. The same run with every env's rewards handed to its neighbour (a pairing
    bug) must stay at the start: that is what shows this test can tell such a bug apart."""
    cfg = _cued_config(tmp_path / "paired")
    before = _initial_ode_eval(cfg)["mean_return"]
    assert 0.4 <= before <= 0.65, f"the cue dim and threshold should start the shipped policy near 0.5, got {before}"
    after = train(cfg)["history"][-1]["eval_return"]

    real_advantages = rl.compute_advantages

    def mispaired_advantages(batch, gae_cfg):
        return real_advantages(dataclasses.replace(batch, rewards=batch.rewards.roll(1, dims=1)), gae_cfg)

    monkeypatch.setattr(rl, "compute_advantages", mispaired_advantages)
    control = train(_cued_config(tmp_path / "mispaired"))["history"][-1]["eval_return"]
    print(f"cued toy: ODE return {before:.2f} -> {after:.2f} (mis-paired rewards: {control:.2f})")
    # Run seeds 0-3 measured 0.77-0.83 after, 0.43-0.58 for the control (start 0.57, 256 episodes).
    assert after >= 0.72, f"PPO did not learn to read the cue: ODE return {before:.2f} -> {after:.2f}"
    assert control <= 0.65, f"mis-paired rewards should teach nothing, got {before:.2f} -> {control:.2f}"


def test_toy_env_rewards_the_mean_action_above_the_threshold():
    with make_env({**ENV, "num_envs": 3, "seed": 0}) as env:
        obs = env.reset(0)
        assert obs["state"].shape == (3, 42) and obs["prompt"] == [PROMPT] * 3 and obs["images"] == {}
        actions = np.zeros((3, 10, 7), dtype=np.float32)
        actions[:, :5, 0] = [[0.1] * 5, [-0.1] * 5, [0.2, -0.2, 0.0, 0.0, 0.0]]  # means 0.1, -0.1, 0
        _, reward, terminated, truncated, info = env.step_chunk(actions, n_exec=5)
        assert reward.tolist() == [1.0, 0.0, 0.0] and terminated.all() and not truncated.any()
        assert info["success_once"].tolist() == [True, False, False]
        # A chunk shorter than the episode ends nothing.
        _, reward, terminated, _, _ = env.step_chunk(actions, n_exec=3)
        assert not terminated.any() and reward.sum() == 0


def test_cued_toy_pays_each_step_that_follows_the_cue_it_showed():
    cfg = {**ENV, "num_envs": 2, "seed": 0, "episode_steps": 10, "cue_period": 5, "cue_dim": 3, "cue_scale": 0.5}
    with make_env(cfg) as env:
        obs = env.reset(0)
        cues = [np.sign(obs["state"][:, 3])]
        assert np.all(np.abs(obs["state"][:, 3]) == 0.5)
        actions = np.zeros((2, 10, 7), dtype=np.float32)
        # Env 0 follows its cue in 4 of 5 steps, env 1 goes against it in every step.
        actions[0, :5, 0] = cues[0][0] * np.array([0.1, 0.1, 0.1, 0.1, -0.1])
        actions[1, :5, 0] = -cues[0][1] * 0.1
        obs, reward, terminated, _, _ = env.step_chunk(actions, n_exec=5)
        np.testing.assert_allclose(reward, [0.4, 0.0])
        assert not terminated.any()
        # Over many chunks the redrawn cue takes both signs (it is redrawn, not fixed per episode).
        cues.append(np.sign(obs["state"][:, 3]))
        actions[:, :5, 0] = cues[1][:, None] * 0.1  # both follow the new cue in every step
        _, reward, terminated, _, info = env.step_chunk(actions, n_exec=5)
        np.testing.assert_allclose(reward, [0.5, 0.5])
        assert terminated.all()
        # Success needs >= 3/4 of the steps paid: env 0 has 9 of 10, env 1 has 5 of 10.
        assert info["success_once"].tolist() == [True, False]
    seen = set()
    with make_env({**cfg, "num_envs": 16}) as env:
        obs = env.reset(0)
        for _ in range(2):
            before = np.sign(obs["state"][:, 3])
            obs, *_ = env.step_chunk(np.zeros((16, 10, 7), dtype=np.float32), n_exec=5)
            seen.update((before != np.sign(obs["state"][:, 3])).tolist())
    assert seen == {True, False}
    # With a policy's state statistics the states sit at mean + scale * std, the cue at mean +- std.
    stats_file = Path(__file__).resolve().parents[1] / "assets" / "pickcube_tiny_sft" / "norm_stats.json"
    stats = json.loads(stats_file.read_text())["norm_stats"]["state"]
    mean, std = np.array(stats["mean"]), np.array(stats["std"])
    with make_env({**cfg, "state_scale": 0.0, "cue_scale": 1.0, "state_stats": str(stats_file)}) as env:
        state = env.reset(0)["state"]
    others = np.arange(42) != 3
    np.testing.assert_allclose(state[:, others], np.broadcast_to(mean[others], (2, 41)), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.abs(state[:, 3] - mean[3]), [std[3]] * 2, rtol=1e-5)
    with pytest.raises(ValueError, match="state stats have 42 dims"):
        make_env({**cfg, "state_dim": 8, "state_stats": str(stats_file)})


def test_toy_config_errors():
    from envs import ConfigError

    with pytest.raises(ConfigError, match="action_index"):
        make_env({**ENV, "action_index": 7})
    with pytest.raises(ConfigError, match="unknown key"):
        make_env({**ENV, "goal": 1.0})


def test_progress_bars_on_request_and_hidden_otherwise(tmp_path, monkeypatch, capsys):
    cfg = compose_train(["experiment=toy_sanity", "run.iterations=2", "run.eval_every=2", "run.eval_episodes=8",
                         "cluster.envs_per_worker=8", f"run.output_dir={tmp_path / 'a'}"])
    monkeypatch.setenv("PIRL_PROGRESS", "1")
    evaluated = train(cfg)["history"]
    err = capsys.readouterr().err
    assert "rl: 100%" in err and "2/2" in err and "success" in err  # the iteration bar and its postfix
    assert "eval:" in err  # the evaluation bar (episodes)
    monkeypatch.setenv("PIRL_PROGRESS", "0")
    plain = train(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, output_dir=str(tmp_path / "b"),
                                                                   eval_every=0)))["history"]
    assert "rl:" not in capsys.readouterr().err
    # The start is evaluated before iteration 0 (same seeds as the later evaluations), and evaluating
    # changes nothing in training: the iterations equal those of a run that never evaluates.
    assert evaluated[0]["start_eval_episodes"] == 8 and "start_eval_success_rate" not in plain[0]
    assert "eval_success_rate" in evaluated[1] and "start_eval_success_rate" not in evaluated[1]
    # Every evaluation's episodes are kept for paired comparisons (the layout of pirl eval's results.json).
    kept = (("start", evaluated[0]["start_eval_successes"]), ("iter_000001", evaluated[1]["eval_successes"]))
    for name, successes in kept:
        rows = json.loads((tmp_path / "a" / "evals" / f"{name}.json").read_text())["per_episode"]
        assert [r["seed"] for r in rows] == list(range(cfg.run.eval_seed, cfg.run.eval_seed + 8))
        assert sum(r["success"] for r in rows) == successes
    assert not (tmp_path / "b" / "evals").exists()
    for key in ("return", "success_once", "policy_loss", "value_loss", "approx_kl"):
        assert [h[key] for h in evaluated] == [h[key] for h in plain], key


def test_evaluation_plays_exactly_the_first_episode_of_each_fixed_seed(tmp_path):
    """Seeds seed .. seed + n - 1, once each, and an episode's outcome does not depend on how many envs
    run beside it (each episode's noise comes from its own seed): 7 episodes on 3 envs and on 5 envs
    give the same rows. Counting whichever episodes finish first would depend on both."""
    cfg = _config(tmp_path, "flow_sde_ppo")
    sft = cfg.run.init_checkpoint
    agent = build_agent(sft, cfg.sampler, cfg.optim.trainable)
    processor = processor_for(sft, {})
    runs = []
    for num_envs in (3, 5):
        with make_env({**cfg.env, "num_envs": num_envs, "seed": 0}) as env:
            runs.append(evaluate(agent, processor, env, 7, cfg.run.n_exec, cfg.sampler.num_steps, 500))
    assert [r["seed"] for r in runs[0]["per_episode"]] == list(range(500, 507))
    assert runs[0]["per_episode"] == runs[1]["per_episode"]
    assert runs[0]["episodes"] == 7 and runs[0]["successes"] == sum(r["success"] for r in runs[0]["per_episode"])
    low, high = runs[0]["success_ci95"]
    assert low <= runs[0]["success_rate"] <= high
