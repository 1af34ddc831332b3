"""ManiSkill3 through the batched VLA env API, on the real (CPU) simulator."""
import os
import time

import numpy as np
import pytest

import mani_skill  # noqa: F401  (a missing simulator is an install failure, not a skip)

from envs.base import ActionError  # noqa: E402
from envs.config import ManiSkillConfig  # noqa: E402
from envs.maniskill import AssetsMissingError, ManiSkillSingleEnv, make_maniskill_env  # noqa: E402

pytestmark = pytest.mark.sim

LIMIT = 6  # short episodes: chunks of 4 cross an episode end in the 2nd chunk


STATE_ENV = dict(task="PickCube-v1", num_envs=2, obs_mode="state", max_episode_steps=LIMIT,
                 reward_mode="normalized_dense", seed=11)


@pytest.fixture(scope="module")
def state_env():
    env = make_maniskill_env(dict(STATE_ENV, envs_per_process=1))  # one process per env
    yield env
    env.close()


@pytest.fixture(scope="module")
def shared_process_env():
    env = make_maniskill_env(dict(STATE_ENV, envs_per_process=2))  # both envs in one process
    yield env
    env.close()


def _random_chunks(n_chunks, batch, horizon, dims, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, size=(n_chunks, batch, horizon, dims)).astype(np.float32)


def test_state_episode_contract(state_env):
    env = state_env
    assert env.spec.action_dim == 7 and env.spec.cameras == {}
    assert env.spec.state_dim == len(env.spec.state_names) == 42
    obs = env.reset(seed=11)
    assert obs["state"].shape == (2, 42) and obs["state"].dtype == np.float32
    assert obs["images"] == {}
    assert obs["prompt"] == ["pick up the red cube and move it to the goal position"] * 2
    # padded action dims (32 > 7) are cut by the env
    chunks = _random_chunks(2, 2, 5, 32)
    obs, reward, term, trunc, info = env.step_chunk(chunks[0], n_exec=4)
    assert reward.shape == (2,) and reward.dtype == np.float32 and (reward > 0).all()  # dense reward
    assert not (term | trunc).any()
    np.testing.assert_array_equal(info["episode_length"], [4, 4])
    assert info["exec_mask"].all()


def test_chunk_semantics_match_single_env_reference(state_env):
    """Rewards are the sum over executed steps, nothing runs after the episode end inside the
    chunk, and the finished env is auto-reset with its next seed (seed + num_envs)."""
    env = state_env
    chunks = _random_chunks(2, 2, 5, 7, seed=1)
    env.reset(seed=11)
    _, r1, _, _, info1 = env.step_chunk(chunks[0], n_exec=4)
    obs2, r2, term2, trunc2, info2 = env.step_chunk(chunks[1], n_exec=4)
    # Episode limit 6: the 2nd chunk executes 2 of its 4 actions, then the env is truncated.
    np.testing.assert_array_equal(info2["exec_mask"], [[True, True, False, False]] * 2)
    assert trunc2.all() and not term2.any() and info2["done"].all()
    np.testing.assert_array_equal(info2["episode_length"], [LIMIT, LIMIT])

    cfg = ManiSkillConfig(task="PickCube-v1", obs_mode="state", max_episode_steps=LIMIT,
                          reward_mode="normalized_dense")
    ref = ManiSkillSingleEnv(cfg)
    try:
        for i in range(2):
            ref.reset(11 + i, hard=True)
            step_rewards = []
            for k in range(LIMIT):
                action = (chunks[0] if k < 4 else chunks[1])[i, k % 4]
                obs, rew, term, trunc, _ = ref.step(action)
                step_rewards.append(rew)
            assert trunc  # the reference ends exactly where the API stopped executing
            np.testing.assert_allclose(r1[i], sum(step_rewards[:4]), rtol=1e-5)
            np.testing.assert_allclose(r2[i], sum(step_rewards[4:]), rtol=1e-5)
            np.testing.assert_allclose(info2["episode_return"][i], sum(step_rewards), rtol=1e-5)
            np.testing.assert_allclose(info2["final_obs"]["state"][i], obs["state"], atol=1e-5)
            # auto-reset: episode 1 of env i has seed 11 + i + 1 * num_envs
            reset_obs, _ = ref.reset(11 + i + 2, hard=True)
            np.testing.assert_allclose(obs2["state"][i], reset_obs["state"], atol=1e-5)
    finally:
        ref.close()
    # the new episodes start counting from zero
    _, _, _, _, info3 = env.step_chunk(chunks[0], n_exec=1)
    np.testing.assert_array_equal(info3["episode_length"], [1, 1])


def test_seeding_reproducible_and_seed_dependent(state_env):
    env = state_env
    chunks = _random_chunks(3, 2, 4, 7, seed=2)

    def rollout(seed):
        states = [env.reset(seed=seed)["state"]]
        rewards = []
        for chunk in chunks:
            obs, reward, *_ = env.step_chunk(chunk, n_exec=2)
            states.append(obs["state"])
            rewards.append(reward)
        return np.stack(states), np.stack(rewards)

    s_a, r_a = rollout(5)
    s_b, r_b = rollout(5)
    np.testing.assert_array_equal(s_a, s_b)
    np.testing.assert_array_equal(r_a, r_b)
    s_c, _ = rollout(6)
    assert not np.allclose(s_a[0], s_c[0])
    np.testing.assert_allclose(s_c[0, 0], s_a[0, 1])  # seed 6 for env 0 == seed 5 + 1 for env 1
    # per-env seeds: a GRPO group shares one initial state
    obs = env.reset(seed=[9, 9])
    np.testing.assert_array_equal(obs["state"][0], obs["state"][1])


def test_bad_actions_rejected_before_the_simulator(state_env):
    env = state_env
    env.reset(seed=1)
    good = np.zeros((2, 4, 7), np.float32)
    bad_nan = good.copy()
    bad_nan[1, 2, 3] = np.nan
    with pytest.raises(ActionError, match="env 1, step 2, dim 3"):
        env.step_chunk(bad_nan, n_exec=4)
    with pytest.raises(ActionError, match="batch"):
        env.step_chunk(np.zeros((3, 4, 7), np.float32))
    with pytest.raises(ActionError, match="dims"):
        env.step_chunk(np.zeros((2, 4, 6), np.float32))
    with pytest.raises(ActionError, match=r"\[B, H, D_pad\]"):
        env.step_chunk(np.zeros((2, 7), np.float32))
    with pytest.raises(ActionError, match="n_exec"):
        env.step_chunk(good, n_exec=5)
    # NaN in a step that is not executed is ignored (it never reaches the simulator)
    _, _, _, _, info = env.step_chunk(bad_nan, n_exec=2)
    np.testing.assert_array_equal(info["episode_length"], [2, 2])  # nothing ran for the bad calls


def test_several_envs_per_process_match_one_env_per_process(state_env, shared_process_env):
    """Same seeds and actions, bit-identical observations, rewards and episode ends (auto-resets
    included), whether each env has its own process or both share one."""
    chunks = _random_chunks(4, 2, 4, 7, seed=5)

    def rollout(env):
        out = [env.reset(seed=[21, 40])["state"]]
        for k, chunk in enumerate(chunks):
            obs, reward, term, trunc, info = env.step_chunk(chunk, n_exec=3 if k % 2 else 2)
            out += [obs["state"], info["final_obs"]["state"], reward, term, trunc, info["exec_mask"],
                    info["success_once"], info["episode_return"]]
        return out

    assert shared_process_env.backend.pool.num_workers == 1 and state_env.backend.pool.num_workers == 2
    separate, shared = rollout(state_env), rollout(shared_process_env)
    assert any(trunc.any() for trunc in separate[5::8])  # an episode ended (auto-reset covered)
    for a, b in zip(separate, shared):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("fixture", ["state_env", "shared_process_env"])
def test_crashed_worker_is_restarted_and_reported(fixture, request):
    """Killing env 1's process loses every env it hosts (env 1 alone, or envs 0 and 1 when they
    share it): those are rebuilt, reported as crashed and their episodes end as truncated."""
    env = request.getfixturevalue(fixture)
    pool = env.backend.pool
    lost = [i for i in range(2) if pool.worker_of(i) == pool.worker_of(1)]
    restarts = list(pool.restart_counts)
    env.reset(seed=3)
    env.step_chunk(np.zeros((2, 2, 7), np.float32))
    pool.kill_worker(1)
    obs, reward, term, trunc, info = env.step_chunk(np.zeros((2, 2, 7), np.float32))
    np.testing.assert_array_equal(info["crashed"], [i in lost for i in range(2)])
    np.testing.assert_array_equal(trunc, [i in lost for i in range(2)])  # lost episodes end as truncated
    assert env.crash_log[-len(lost):] == lost
    assert [pool.restart_counts[i] - restarts[i] for i in range(2)] == [int(i in lost) for i in range(2)]
    assert obs["state"].shape == (2, 42)
    _, _, _, _, info = env.step_chunk(np.zeros((2, 2, 7), np.float32))
    assert not info["crashed"].any()
    np.testing.assert_array_equal(info["episode_length"], [2 if i in lost else 6 for i in range(2)])


def test_shaped_reward_and_padded_action_dims(tmp_path):
    env = make_maniskill_env(dict(task="PushCube-v1", num_envs=1, obs_mode="state", reward_mode="shaped_diff",
                                  control_mode="pd_joint_delta_pos", max_episode_steps=10))
    try:
        assert env.spec.action_dim == 8  # 7 joints + gripper
        # actions are executed in env units as given; padded dims are cut, only n_exec steps kept
        executed, n_exec = env.validate_actions(np.full((1, 4, 32), 0.5, np.float32), 2)
        assert executed.shape == (1, 2, 8) and n_exec == 2
        np.testing.assert_allclose(executed, 0.5)
        env.reset(seed=0)
        _, reward, *_ = env.step_chunk(np.zeros((1, 3, 8), np.float32))
        assert reward[0] == 0.0  # nothing grasped, no success: no shaped reward
    finally:
        env.close()


def test_dense_diff_reward_is_the_differenced_normalized_dense_reward():
    from envs.config import ManiSkillConfig
    from envs.maniskill import ManiSkillSingleEnv

    def make(mode):
        return ManiSkillSingleEnv(ManiSkillConfig.from_dict(dict(
            task="PickCube-v1", num_envs=1, obs_mode="state", reward_mode=mode, max_episode_steps=50)))

    dense, diff = make("normalized_dense"), make("dense_diff")
    rng = np.random.default_rng(0)
    try:
        for seed in (3, 4):  # the second episode checks that reset restarts the potential at 0
            dense.reset(seed)
            diff.reset(seed)
            potentials, rewards = [0.0], []
            for _ in range(12):
                action = rng.uniform(-1, 1, size=dense.action_dim).astype(np.float32)
                potentials.append(dense.step(action)[1])
                rewards.append(diff.step(action)[1])
            np.testing.assert_allclose(rewards, np.diff(potentials), atol=1e-6)
            assert abs(sum(rewards) - potentials[-1]) < 1e-5  # the return telescopes to phi_last
            assert np.ptp(potentials[1:]) > 1e-3  # random motion does change the reaching term
    finally:
        dense.close()
        diff.close()


def test_shaped_dense_diff_is_the_stage_reward_plus_the_weighted_dense_one():
    from envs.config import ManiSkillConfig
    from envs.maniskill import ManiSkillSingleEnv
    from envs.rewards import DENSE_WEIGHT

    def make(mode):
        return ManiSkillSingleEnv(ManiSkillConfig.from_dict(dict(
            task="PickCube-v1", num_envs=1, obs_mode="state", reward_mode=mode, max_episode_steps=50)))

    envs = {mode: make(mode) for mode in ("shaped_diff", "dense_diff", "shaped_dense_diff")}
    rng = np.random.default_rng(1)
    try:
        for seed in (5, 6):
            for env in envs.values():
                env.reset(seed)
            for _ in range(12):
                action = rng.uniform(-1, 1, size=7).astype(np.float32)
                r = {mode: env.step(action)[1] for mode, env in envs.items()}
                assert r["shaped_dense_diff"] == pytest.approx(r["shaped_diff"] + DENSE_WEIGHT * r["dense_diff"], abs=1e-6)
        assert DENSE_WEIGHT == 0.2
    finally:
        for env in envs.values():
            env.close()


def test_task_needing_asset_download_fails_fast():
    started = time.time()
    with pytest.raises(AssetsMissingError, match="download_asset"):
        make_maniskill_env(dict(task="PickSingleYCB-v1", prompt="pick up the object"))
    assert time.time() - started < 30


def test_rgb_observations_and_video(tmp_path):
    env = make_maniskill_env(dict(task="PickCube-v1", num_envs=1, obs_mode="rgb", image_size=(48, 64),
                                  max_episode_steps=5, record_video_envs=(0,), video_dir=str(tmp_path)))
    try:
        assert env.spec.cameras == {"base_camera": (48, 64)}
        assert env.spec.state_names[:9] == tuple(f"agent/qpos[{j}]" for j in range(9))
        obs = env.reset(seed=0)
        image = obs["images"]["base_camera"]
        assert image.shape == (1, 48, 64, 3) and image.dtype == np.uint8
        assert image.std() > 10  # a rendered scene, not a blank frame
        assert obs["state"].shape == (1, 9 + 7)  # qpos + tcp pose
        obs, _, _, trunc, info = env.step_chunk(np.zeros((1, 5, 7), np.float32))
        assert trunc[0]
        videos = os.listdir(tmp_path)
        assert videos == ["env000_ep0000.mp4"]
        from envs.video import read_mp4

        assert read_mp4(str(tmp_path / videos[0])).shape[0] == 6  # reset frame + 5 steps
    finally:
        env.close()


@pytest.mark.slow
def test_state_mode_video_uses_render_camera(tmp_path):
    env = make_maniskill_env(dict(task="PushCube-v1", num_envs=2, obs_mode="state", max_episode_steps=4,
                                  record_video_envs=(1,), video_dir=str(tmp_path), image_size=(64, 64)))
    try:
        env.reset(seed=0)
        env.step_chunk(np.zeros((2, 4, 7), np.float32))
    finally:
        env.close()
    from envs.video import read_mp4

    assert os.listdir(tmp_path) == ["env001_ep0000.mp4"]  # only the chosen env is recorded
    frames = read_mp4(str(tmp_path / "env001_ep0000.mp4"))
    assert frames.shape == (5, 64, 64, 3) and frames.std() > 10


def test_multitask_batch_gives_each_env_its_task_and_instruction():
    from envs.config import MANISKILL_TASKS

    tasks = ("PickCube-v1", "PushCube-v1")
    env = make_maniskill_env(dict(tasks=list(tasks), num_envs=3, obs_mode="rgb", image_size=(32, 32),
                                  max_episode_steps=LIMIT, reward_mode="sparse", seed=3))
    try:
        obs = env.reset(seed=3)
        # env i runs tasks[i % 2]: the prompts tell them apart, the shapes are shared
        assert obs["prompt"] == [MANISKILL_TASKS[t] for t in (tasks[0], tasks[1], tasks[0])]
        assert obs["images"]["base_camera"].shape == (3, 32, 32, 3)
        _, reward, _, _, info = env.step_chunk(_random_chunks(1, 3, 4, 7)[0], n_exec=4)
        assert reward.shape == (3,) and info["exec_mask"].all()
    finally:
        env.close()


def test_multitask_batch_with_different_state_shapes_is_a_clear_error():
    from envs.config import ConfigError

    with pytest.raises(ValueError, match="state_dim"):
        make_maniskill_env(dict(tasks=["PickCube-v1", "PushCube-v1"], num_envs=2, obs_mode="state"))
    with pytest.raises(ConfigError, match="no built-in instruction"):
        ManiSkillConfig.from_dict(dict(tasks=["PickCube-v1", "NotATask-v0"]))
    with pytest.raises(ConfigError, match="backend 'cpu'"):
        ManiSkillConfig.from_dict(dict(tasks=["PickCube-v1"], backend="gpu"))
