"""ManiSkill demonstrations: generated with ManiSkill's motion planners, converted to the training
controller, written as a LeRobot dataset, read back for SFT, and replayed open loop through the API."""
import json
import os

import numpy as np
import pytest

import mani_skill  # noqa: F401  (a missing simulator is an install failure, not a skip)

from envs.dataset import LeRobotReader, SFTChunkDataset  # noqa: E402
from envs.demos import main as demos_main  # noqa: E402
from envs.maniskill import make_maniskill_env  # noqa: E402

pytestmark = pytest.mark.sim
NUM_DEMOS = 3


@pytest.fixture(scope="module")
def pickcube_demos(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("demos") / "pickcube")
    rc = demos_main(["--task", "PickCube-v1", "-n", str(NUM_DEMOS), "--out", root, "--obs-mode", "state",
                     "--control-mode", "pd_ee_delta_pose", "--seed", "0"])
    assert rc == 0
    return root


def test_demos_written_in_lerobot_layout(pickcube_demos):
    info = json.load(open(os.path.join(pickcube_demos, "meta", "info.json")))
    assert info["codebase_version"] == "v3.0" and info["total_episodes"] == NUM_DEMOS
    assert info["features"]["action"]["shape"] == [7]
    assert info["pirl"]["control_mode"] == "pd_ee_delta_pose"
    reader = LeRobotReader(pickcube_demos)
    assert len(reader.episodes) == NUM_DEMOS and len(reader) == info["total_frames"]
    assert reader.tasks == {0: "pick up the red cube and move it to the goal position"}
    # converted delta-pose actions stay inside the controller's normalised range
    assert np.abs(reader.actions).max() <= 1.0 + 1e-6
    ds = SFTChunkDataset(pickcube_demos, horizon=8, action_pad_dim=32)
    last = reader.episodes[0]["to"] - 1
    batch = ds.get_batch([0, last])
    assert batch["action_valid"][0].all() and batch["action_valid"][1].sum() == 1
    assert batch["actions"].shape == (2, 8, 32) and batch["state"].shape == (2, 42)


def test_demos_all_succeed_when_replayed_open_loop(pickcube_demos):
    reader = LeRobotReader(pickcube_demos)
    seeds = json.load(open(os.path.join(pickcube_demos, "meta", "info.json")))["pirl"]["seeds"]
    lengths = [ep["length"] for ep in reader.episodes]
    horizon = 8
    padded_len = -(-max(lengths) // horizon) * horizon
    actions = np.zeros((NUM_DEMOS, padded_len, 32), np.float32)  # padded dims: the env cuts them
    for i, ep in enumerate(reader.episodes):
        actions[i, : ep["length"], :7] = reader.actions[ep["from"]:ep["to"]]
    env = make_maniskill_env(dict(task="PickCube-v1", num_envs=NUM_DEMOS, obs_mode="state",
                                  max_episode_steps=max(lengths) + 20, reward_mode="shaped_diff"))
    try:
        obs = env.reset(seed=seeds)
        np.testing.assert_allclose(obs["state"], reader.state[[ep["from"] for ep in reader.episodes]], atol=1e-5)
        finished = np.zeros(NUM_DEMOS, bool)
        success = np.zeros(NUM_DEMOS, bool)
        ep_len = np.zeros(NUM_DEMOS, int)
        ep_ret = np.zeros(NUM_DEMOS)
        for start in range(0, padded_len, horizon):
            _, _, term, _, info = env.step_chunk(actions[:, start:start + horizon], n_exec=horizon)
            new = info["done"] & ~finished
            success[new] = info["success_once"][new] & term[new]
            ep_len[new] = info["episode_length"][new]
            ep_ret[new] = info["episode_return"][new]
            finished |= info["done"]
        assert success.all(), f"replayed demos failed: {success}"
        np.testing.assert_array_equal(ep_len, lengths)  # success exactly at the recorded last step
        np.testing.assert_allclose(ep_ret, 1.2, atol=1e-6)  # shaped: grasp + still grasped + success
    finally:
        env.close()


def test_after_success_keeps_the_planners_approach_to_the_exact_goal(pickcube_demos, tmp_path):
    """--after-success N extends a demo by the planner's next steps (up to N): the first frames are the
    plain demo's, and the cube ends closer to the goal than at the first success."""
    root = str(tmp_path / "tail")
    assert demos_main(["--task", "PickCube-v1", "-n", "1", "--out", root, "--obs-mode", "state",
                       "--control-mode", "pd_ee_delta_pose", "--seed", "0", "--after-success", "5"]) == 0
    plain, tail = LeRobotReader(pickcube_demos), LeRobotReader(root)
    n, m = plain.episodes[0]["length"], tail.episodes[0]["length"]
    assert n < m <= n + 5
    np.testing.assert_array_equal(tail.actions[:n], plain.actions[:n])
    np.testing.assert_array_equal(tail.state[:n], plain.state[:n])
    goal_distance = np.linalg.norm(tail.state[:, -3:], axis=1)  # PickCube's state ends with goal - cube
    assert goal_distance[m - 1] < goal_distance[n - 1] - 0.003
    assert json.load(open(os.path.join(root, "meta", "info.json")))["pirl"]["after_success"] == 5


def test_success_once_latches_after_success_is_lost(pickcube_demos):
    """With terminate_on_success off, moving the arm after the demo ends breaks PickCube's success
    (it needs a static robot) while success_once stays set."""
    reader = LeRobotReader(pickcube_demos)
    seed = json.load(open(os.path.join(pickcube_demos, "meta", "info.json")))["pirl"]["seeds"][0]
    ep = reader.episodes[0]
    demo = reader.actions[ep["from"]:ep["to"]]
    env = make_maniskill_env(dict(task="PickCube-v1", num_envs=1, obs_mode="state", terminate_on_success=False,
                                  max_episode_steps=ep["length"] + 40))
    try:
        env.reset(seed=seed)
        info = None
        for start in range(0, len(demo), 8):
            chunk = demo[None, start:start + 8]
            _, _, term, _, info = env.step_chunk(chunk, n_exec=chunk.shape[1])
            assert not term.any()
        assert info["success"][0] and info["success_once"][0]
        jerk = np.zeros((1, 4, 7), np.float32)
        jerk[0, :, 0] = 1.0  # move the hand fast along x
        _, _, _, _, info = env.step_chunk(jerk)
        assert not info["success"][0] and info["success_once"][0]
    finally:
        env.close()


@pytest.mark.slow
def test_rgb_demo_with_video_frames(tmp_path):
    root = str(tmp_path / "rgb")
    assert demos_main(["--task", "PickCube-v1", "-n", "1", "--out", root, "--obs-mode", "rgb",
                       "--image-size", "64", "64", "--image-mode", "video", "--seed", "4"]) == 0
    ds = SFTChunkDataset(root, horizon=4)
    assert ds.cameras == ["base_camera"]
    batch = ds.get_batch([0, len(ds) - 1])
    image = batch["images"]["base_camera"]
    assert image.shape == (2, 64, 64, 3) and image.std() > 10
    assert batch["state"].shape == (2, 16)
