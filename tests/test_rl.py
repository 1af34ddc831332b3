"""The RL trainer end to end on ManiSkill PickCube with the tiny π0: local and Ray + DeepSpeed.

Real simulator, real Ray, real DeepSpeed; a random-init tiny policy (learning itself is measured in
bench/learning.py, not here).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal

import numpy as np
import pytest
import torch

from pirl.train.rl import RLConfig, train
from pirl.train.rl_core import SamplerConfig
from vla.checkpoint import load_policy, save_policy
from vla.config import tiny
from vla.policy import FlowPolicy
from vla.processor import NormStats, build_test_tokenizer

pytestmark = pytest.mark.sim

STATE_DIM = 42  # PickCube-v1 "state" observation
# Metrics that a repeated (resumed, rebuilt) iteration must reproduce.
DETERMINISTIC = ("reward_per_chunk", "policy_loss", "value_loss", "approx_kl", "env_steps", "success_once")


@pytest.fixture(scope="module")
def init_checkpoint(tmp_path_factory):
    from envs.config import MANISKILL_TASKS

    root = tmp_path_factory.mktemp("rl")
    cfg = tiny("pi0").replace(state_dim=STATE_DIM, camera_names=("base_0_rgb",))
    torch.manual_seed(0)
    build_test_tokenizer(root / "tok", extra_corpus=list(MANISKILL_TASKS.values()))
    rng = np.random.default_rng(0)
    stats = {"state": NormStats.from_data(rng.normal(size=(200, STATE_DIM))),
             "actions": NormStats.from_data(rng.normal(scale=0.3, size=(200, 7)))}
    save_policy(root / "init", FlowPolicy(cfg), stats, tokenizer_file=root / "tok" / "tokenizer.model")
    return str(root / "init")


def _config(init, out, **over):
    data = {
        "run": {"init_checkpoint": init, "iterations": 2, "num_chunks": 3, "n_exec": 5, "eval_every": 0,
                "checkpoint_every": 1, "output_dir": str(out), "seed": 3},
        "env": {"simulator": "maniskill", "task": "PickCube-v1", "obs_mode": "state", "max_episode_steps": 10},
        "sampler": {"kind": "flow_sde", "num_steps": 3},
        "optim": {"minibatch_size": 6, "update_epochs": 2, "policy_lr": 1e-3, "value_lr": 1e-3, "trainable": "all"},
        "cluster": {"use_ray": False, "envs_per_worker": 2},
    }
    for section, values in over.items():
        data[section] = {**data.get(section, {}), **values}
    return RLConfig.from_dict(data)


def _weights(path):
    policy, _ = load_policy(path)
    return {k: v.clone() for k, v in policy.state_dict().items()}


def test_local_training_then_resume_repeats_the_uninterrupted_run(init_checkpoint, tmp_path):
    full = train(_config(init_checkpoint, tmp_path / "full"))["history"]
    assert [h["iteration"] for h in full] == [0, 1]
    for h in full:
        assert h["env_steps"] > 0 and np.isfinite(h["policy_loss"]) and np.isfinite(h["value_loss"])
        # Unchanged weights on the first minibatch: recomputed and rollout log-probs agree.
        assert h["first_log_ratio"] < 1e-4
    # Episodes of 10 steps = 2 chunks: 3 chunks per iteration end at least one episode per env.
    assert full[0]["episodes"] >= 2

    half = train(_config(init_checkpoint, tmp_path / "half", run={"iterations": 1}))["history"]
    assert {k: half[0][k] for k in DETERMINISTIC} == {k: full[0][k] for k in DETERMINISTIC}
    # Resume in the same directory, as after a kill that came after the last checkpoint: the file
    # holds a record of the iteration that will be repeated, and a torn line.
    with open(tmp_path / "half" / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"iteration": 1, "env_steps": 999}) + "\n" + '{"iteration": 1, "env_st')
    resumed = train(_config(init_checkpoint, tmp_path / "half",
                            run={"resume": str(tmp_path / "half" / "checkpoints" / "iter_000000")}))["history"]
    assert [h["iteration"] for h in resumed] == [0, 1]  # history carried over from the checkpoint
    logged = [json.loads(line) for line in (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    full_logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in logged] == [0, 1]  # the stale and torn records are gone
    assert [r["env_steps_total"] for r in logged] == [r["env_steps_total"] for r in full_logged]
    for key in DETERMINISTIC:
        assert resumed[1][key] == pytest.approx(full[1][key], rel=1e-5, abs=1e-7), key
    a = _weights(tmp_path / "full" / "checkpoints" / "iter_000001")
    b = _weights(tmp_path / "half" / "checkpoints" / "iter_000001")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    start = _weights(init_checkpoint)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training did move the weights


def test_failed_reset_seeds_are_replayed_and_a_resumed_run_plans_the_same(init_checkpoint, tmp_path):
    """run.replay_failures: a random policy fails every 10-step episode, so from iteration 1 on half
    of the envs restart from a seed an earlier iteration failed; the plan is part of the checkpoint."""
    over = {"run": {"iterations": 3, "replay_failures": 0.5}, "cluster": {"envs_per_worker": 4}}
    full = train(_config(init_checkpoint, tmp_path / "full", **over))["history"]
    assert all(ok == 0 for h in full for _, ok in h["resets"])  # the negative premise: nothing succeeds
    seen = [s for s, _ in full[0]["resets"]]
    assert full[0]["replayed_envs"] == 0 and len(set(seen)) == 4
    for h in full[1:]:
        assert h["replayed_envs"] == 2
        replayed = [s for s, _ in h["resets"][:2]]
        assert set(replayed) <= set(seen) and len(set(replayed)) == 2  # earlier failures, no repeats
        assert not set(s for s, _ in h["resets"][2:]) & set(seen)  # the rest fresh
        seen += [s for s, _ in h["resets"]]
    resumed = train(_config(init_checkpoint, tmp_path / "full", run={
        "iterations": 3, "replay_failures": 0.5, "resume": str(tmp_path / "full" / "checkpoints" / "iter_000001")},
        cluster={"envs_per_worker": 4}))["history"]
    assert resumed[2]["resets"] == full[2]["resets"]
    assert resumed[2]["reward_per_chunk"] == pytest.approx(full[2]["reward_per_chunk"], rel=1e-5, abs=1e-7)


def test_replay_share_is_checked():
    with pytest.raises(ValueError, match="replay_failures"):
        RLConfig.from_dict({"run": {"replay_failures": -0.1}, "env": {"simulator": "toy"}})


def test_an_evaluation_file_reads_back_seed_by_seed(tmp_path):
    """The in-loop evaluation files and `pirl eval`'s results.json are what bench/paired.py and
    bench/heldout.py compare: the reader returns exactly the written outcomes, from the file or its folder."""
    from pirl.train.rl import load_episode_outcomes, save_episodes
    rows = [{"seed": 10_000 + i, "success": i % 3 == 0, "return": 0.5, "length": 100} for i in range(7)]
    save_episodes(tmp_path / "evals" / "iter_000009.json", {"successes": 3, "per_episode": rows})
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"per_episode": rows[::-1]}))
    expected = {10_000 + i: i % 3 == 0 for i in range(7)}
    assert load_episode_outcomes(tmp_path / "evals" / "iter_000009.json") == expected
    assert load_episode_outcomes(tmp_path / "eval") == expected


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
    yield
    ray.shutdown()


def _signal_learner_in_update(monkeypatch, update: int, before_step: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send ``sig`` to learner rank 0's process (SIGKILL: a crash, for real; SIGSTOP: a hang) just
    before optimizer step ``before_step`` of the ``update``-th PPO update (0-based, counted over the
    run). The fault is placed from the driver, at an exact point of the loop, so the test does not
    race the (milliseconds-long) learner call it aims at. Returns the list the signalled pid goes in."""
    from pirl.train import rl

    real_update, signalled, updates = rl.ppo_update, [], [0]

    def update_with_fault(agent, train_step, *args, **kwargs):
        index, updates[0] = updates[0], updates[0] + 1
        if index != update or signalled:
            return real_update(agent, train_step, *args, **kwargs)
        group, steps = train_step.__self__, [0]  # the LearnerGroup whose bound train_step this is

        def step_with_fault(minibatch, loss_fn):
            if steps[0] == before_step and not signalled:
                pid = group.pids()[0]
                os.kill(pid, sig)
                signalled.append(pid)
            steps[0] += 1
            return train_step(minibatch, loss_fn)

        return real_update(agent, step_with_fault, *args, **kwargs)

    monkeypatch.setattr(rl, "ppo_update", update_with_fault)
    return signalled


def _ray_config(init, out, **over):
    cluster = {"use_ray": True, "zero_stage": 2, **over.pop("cluster", {})}
    return _config(init, out, cluster=cluster, **over)


@pytest.fixture(scope="module")
def ray_reference(init_checkpoint, tmp_path_factory, ray_cluster):
    """An uninterrupted 2-iteration Flow-SDE run through Ray and DeepSpeed ZeRO-2: what a run that
    loses a worker or a learner must reproduce."""
    out = tmp_path_factory.mktemp("ray_reference")
    history = train(_ray_config(init_checkpoint, out))["history"]
    assert history[-1]["worker_restarts"] == 0 and history[-1]["learner_restarts"] == 0
    return history, _weights(out / "checkpoints" / "iter_000001")


def _assert_same_run(history, ckpt, reference):
    ref_history, ref_weights = reference
    assert [h["iteration"] for h in history] == [0, 1]
    for h, r in zip(history, ref_history):
        for key in DETERMINISTIC:
            assert h[key] == pytest.approx(r[key], rel=1e-5, abs=1e-7), (h["iteration"], key)
    weights = _weights(ckpt)
    assert all(torch.allclose(weights[k], ref_weights[k], atol=1e-6) for k in ref_weights)


@pytest.mark.parametrize("kind", ["flow_sde", "flow_noise"])
def test_ray_deepspeed_training(init_checkpoint, tmp_path, ray_cluster, ray_reference, kind, monkeypatch):
    """2 PPO iterations through Ray workers and a DeepSpeed learner; the Flow-SDE run also loses its
    rollout worker (SIGKILL, as iteration 0's rollouts are handed out), carries on with a
    replacement, and ends where the uninterrupted run does."""
    killed: list[int] = []
    if kind == "flow_sde":
        import ray
        from rollout.worker import WorkerPool

        real_map = WorkerPool.map

        def map_losing_worker_0(pool, fn, *args, **kwargs):
            if not killed:
                killed.append(ray.get(pool.workers[0].pid.remote()))
                os.kill(killed[0], signal.SIGKILL)
            return real_map(pool, fn, *args, **kwargs)

        monkeypatch.setattr(WorkerPool, "map", map_losing_worker_0)
    cfg = _config(init_checkpoint, tmp_path / kind, sampler={"kind": kind},
                  cluster={"use_ray": True, "zero_stage": 2 if kind == "flow_sde" else 0})
    history = train(cfg)["history"]
    assert [h["iteration"] for h in history] == [0, 1]
    assert all(h["first_log_ratio"] < 1e-4 for h in history)
    ckpt = tmp_path / kind / "checkpoints" / "iter_000001"
    if kind == "flow_sde":
        assert killed, "the rollout worker was never seen running"
        assert history[-1]["worker_restarts"] == 1
        _assert_same_run(history, ckpt, ray_reference)
    else:
        assert history[-1]["worker_restarts"] == 0
    assert (ckpt / "value_head.safetensors").exists()
    assert (ckpt / "noise_head.safetensors").exists() == (kind == "flow_noise")
    assert (tmp_path / kind / "checkpoints" / "iter_000001.deepspeed").is_dir()
    # The saved policy is the learners' latest weights, not the initial ones.
    start, end = _weights(init_checkpoint), _weights(ckpt)
    assert any(not torch.equal(start[k], end[k]) for k in start)


def test_a_lost_learner_is_rebuilt_from_the_last_checkpoint(init_checkpoint, tmp_path, ray_cluster, ray_reference,
                                                            monkeypatch):
    """SIGKILL the DeepSpeed learner in the middle of iteration 1's PPO update: the run rebuilds the
    learner group and workers from iteration 0's checkpoint, repeats iteration 1, and ends with the
    uninterrupted run's metrics and weights."""
    # 6 samples, minibatch 6, 2 epochs: two optimizer steps per update; die between them.
    killed = _signal_learner_in_update(monkeypatch, update=1, before_step=1)
    history = train(_ray_config(init_checkpoint, tmp_path))["history"]
    assert killed, "the learner was never seen training"
    assert [h["learner_restarts"] for h in history] == [0, 1]
    _assert_same_run(history, tmp_path / "checkpoints" / "iter_000001", ray_reference)
    # Iteration 1 was lost inside its update, before it was logged: each iteration is logged once.
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [0, 1]


def test_a_hung_learner_times_out_and_is_rebuilt(init_checkpoint, tmp_path, ray_cluster, ray_reference, monkeypatch):
    """SIGSTOP the learner inside iteration 1's PPO update (alive but silent, as a rank stuck in a
    collective or on a hung device): past `cluster.learner_call_timeout_s` the group counts as lost,
    is rebuilt from iteration 0's checkpoint, and the run ends as the uninterrupted one."""
    stopped = _signal_learner_in_update(monkeypatch, update=1, before_step=1, sig=signal.SIGSTOP)
    try:
        history = train(_ray_config(init_checkpoint, tmp_path, cluster={"learner_call_timeout_s": 30.0}))["history"]
    finally:
        for pid in stopped:  # the rebuild kills it through Ray; make sure of it either way
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert stopped, "the learner was never seen training"
    assert [h["learner_restarts"] for h in history] == [0, 1]
    _assert_same_run(history, tmp_path / "checkpoints" / "iter_000001", ray_reference)


def test_learner_restarts_are_bounded(init_checkpoint, tmp_path, ray_cluster, monkeypatch):
    """With no rebuild allowed, a lost learner ends the run with an error that says so."""
    killed = _signal_learner_in_update(monkeypatch, update=0, before_step=0)
    with pytest.raises(RuntimeError, match="learner group was lost 1 times"):
        train(_ray_config(init_checkpoint, tmp_path, run={"iterations": 1}, cluster={"max_learner_restarts": 0}))
    assert killed


def test_unknown_config_keys_are_errors(init_checkpoint, tmp_path):
    with pytest.raises(KeyError, match="unknown config key"):
        _config(init_checkpoint, tmp_path, optim={"polciy_lr": 1e-3})
    with pytest.raises(KeyError, match="unknown config section"):
        RLConfig.from_dict({"optimizer": {}})
    with pytest.raises(Exception, match="num_envz|unknown"):
        _config(init_checkpoint, tmp_path, env={"num_envz": 3})
    assert SamplerConfig().reduction.granularity == "chunk"


def test_sampler_step_range_is_checked_when_the_config_is_built():
    assert SamplerConfig(mask_low=-1).mask_low == -1  # the last step of any K
    with pytest.raises(ValueError, match="sampler.mask_low"):
        SamplerConfig(num_steps=4, mask_low=4)
    with pytest.raises(ValueError, match="sampler.mask_low"):
        SamplerConfig(num_steps=4, mask_low=-5)
    with pytest.raises(ValueError, match="sampler.mask_low / mask_high / window: window width 3 does not fit"):
        SamplerConfig(num_steps=4, mask="window", window=3, mask_low=-2)
    SamplerConfig(num_steps=4, mask="all", mask_low=7)  # the range only matters for hybrid / window


def test_worker_device_is_checked_before_anything_runs():
    from pirl.train.rl import ClusterConfig, place_worker_policy

    with pytest.raises(ValueError, match="is not a device: cpu, cuda or cuda:N"):
        ClusterConfig(worker_device="tpu")
    with pytest.raises(ValueError, match="needs Ray workers with a GPU"):
        ClusterConfig(worker_device="cuda")  # one process: the learner would share the moved agent
    ClusterConfig(use_ray=True, worker_gpus=0.5, worker_device="cuda")  # valid; placed inside the worker

    class Worker:
        index, model = 3, None

    place_worker_policy(Worker(), "cpu")  # nothing to do
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="rollout worker 3 sees no CUDA device"):
            place_worker_policy(Worker(), "cuda")
