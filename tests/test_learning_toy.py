"""Every RL method must learn a task that a correct policy-gradient setup cannot fail to learn.

The toy env (envs/toy.py, experiment toy_sanity) succeeds iff the mean of action dim 0 over a 5-step
episode exceeds a threshold; at threshold 0 the shipped SFT policy succeeds about half the time. The
full trainer (`pirl.train.rl.train`: rollout, GAE or GRPO advantages, PPO epochs on the exact chain
likelihood) must raise that by a wide margin within ten iterations. A sign error in the advantage or the log-ratio, a
ratio taken over the wrong elements, or a sampler whose likelihood does not match what it sampled
shows up here as a flat or falling curve, in seconds, where PickCube would need an hour to tell.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from envs import make_env
from pirl.cli import compose, resolve_path
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
    data = compose("train", ["experiment=toy_sanity", *METHODS[method], f"run.output_dir={out}"])
    data["run"]["init_checkpoint"] = resolve_path(data["run"]["init_checkpoint"])
    return RLConfig.from_dict(data)


def _initial_ode_success(cfg: RLConfig) -> float:
    sft = cfg.run.init_checkpoint
    agent = build_agent(sft, cfg.sampler, cfg.optim.trainable)
    with make_env({**cfg.env, "num_envs": cfg.run.eval_episodes, "seed": 0}) as env:
        result = evaluate(agent, processor_for(sft, {}), env, cfg.run.eval_episodes, cfg.run.n_exec,
                          cfg.sampler.num_steps, cfg.run.eval_seed)
    return result["success_rate"]


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


def test_toy_config_errors():
    from envs import ConfigError

    with pytest.raises(ConfigError, match="action_index"):
        make_env({**ENV, "action_index": 7})
    with pytest.raises(ConfigError, match="unknown key"):
        make_env({**ENV, "goal": 1.0})


def test_progress_bars_on_request_and_hidden_otherwise(tmp_path, monkeypatch, capsys):
    data = compose("train", ["experiment=toy_sanity", "run.iterations=2", "run.eval_every=2", "run.eval_episodes=8",
                             "cluster.envs_per_worker=8", f"run.output_dir={tmp_path / 'a'}"])
    data["run"]["init_checkpoint"] = resolve_path(data["run"]["init_checkpoint"])
    monkeypatch.setenv("PIRL_PROGRESS", "1")
    train(RLConfig.from_dict(data))
    err = capsys.readouterr().err
    assert "rl: 100%" in err and "2/2" in err and "success" in err  # the iteration bar and its postfix
    assert "eval:" in err  # the evaluation bar (episodes)
    monkeypatch.setenv("PIRL_PROGRESS", "0")
    data["run"]["output_dir"] = str(tmp_path / "b")
    train(RLConfig.from_dict(data))
    assert "rl:" not in capsys.readouterr().err
