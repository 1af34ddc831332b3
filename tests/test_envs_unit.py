"""envs/ pieces that need no simulator: configs, reward shaping, datasets, stats, video."""
import functools
import json
import os

import numpy as np
import pytest

from envs.config import ConfigError, LiberoConfig, ManiSkillConfig
from envs.dataset import Episode, LeRobotReader, SFTChunkDataset, write_lerobot_dataset
from envs.rewards import DifferencedPotential, DifferencedShapedReward


# ---- configs ------------------------------------------------------------------------------
def test_config_unknown_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown key.*obs_mod"):
        ManiSkillConfig.from_dict({"task": "PickCube-v1", "obs_mod": "rgb"})
    with pytest.raises(ConfigError, match="unknown key"):
        LiberoConfig.from_dict({"suite": "libero_10", "max_steps": 3})


def test_config_validates_values_and_types():
    with pytest.raises(ConfigError, match="reward_mode"):
        ManiSkillConfig(reward_mode="dense_ish")
    with pytest.raises(ConfigError, match="expected an int"):
        ManiSkillConfig.from_dict({"num_envs": "2"})
    with pytest.raises(ConfigError, match="suite"):
        LiberoConfig(suite="libero_100")
    with pytest.raises(ConfigError, match="record_video_envs"):
        ManiSkillConfig(num_envs=2, record_video_envs=(2,))
    with pytest.raises(ConfigError, match="no built-in instruction"):
        ManiSkillConfig(task="PickSingleYCB-v1")
    cfg = ManiSkillConfig.from_dict({"image_size": [64, 96], "cameras": ["base_camera"]})
    assert cfg.image_size == (64, 96) and cfg.cameras == ("base_camera",)
    with pytest.raises(Exception):
        cfg.num_envs = 3  # frozen


def test_make_env_needs_a_simulator():
    from envs import make_env

    with pytest.raises(ConfigError, match="simulator"):
        make_env({"task": "PickCube-v1"})
    with pytest.raises(ConfigError, match="unknown key"):
        make_env({"simulator": "libero", "suite": "libero_goal", "taskid": 1})


def test_libero_episode_limits_per_suite():
    limits = {s: LiberoConfig(suite=s).episode_limit
              for s in ("libero_spatial", "libero_object", "libero_goal", "libero_10", "libero_90")}
    assert limits == {"libero_spatial": 220, "libero_object": 280, "libero_goal": 300,
                      "libero_10": 520, "libero_90": 400}
    assert LiberoConfig(max_episode_steps=7).episode_limit == 7


# ---- reward shaping -----------------------------------------------------------------------
def test_differenced_shaped_reward_telescopes():
    shaper = DifferencedShapedReward()
    grasped = [False, True, True, True, False, True, True]
    success = [False, False, False, True, False, False, True]
    rewards = [shaper(g, s) for g, s in zip(grasped, success)]
    # grasp +0.1, still grasped +0.1, success +1.0, drop all (-1.2), regrasp +0.1, hold+success +1.1
    np.testing.assert_allclose(rewards, [0.0, 0.1, 0.1, 1.0, -1.2, 0.1, 1.1], atol=1e-9)
    np.testing.assert_allclose(sum(rewards), 1.2)  # = phi at the last step


def test_differenced_shaped_reward_batched_reset_mask():
    shaper = DifferencedShapedReward()
    shaper(np.array([True, True]), np.array([False, False]))
    shaper(np.array([True, True]), np.array([False, False]))
    shaper.reset(np.array([True, False]))
    rewards = shaper(np.array([True, True]), np.array([False, False]))
    np.testing.assert_allclose(rewards, [0.1, 0.0])  # env 0 starts over: only the grasp bonus


def test_differenced_potential_batched_reset_mask():
    differ = DifferencedPotential()
    np.testing.assert_allclose(differ(np.array([0.2, 0.3])), [0.2, 0.3])  # phi before step 0 is 0
    np.testing.assert_allclose(differ(np.array([0.5, 0.1])), [0.3, -0.2])
    differ.reset(np.array([False, True]))
    np.testing.assert_allclose(differ(np.array([0.6, 0.4])), [0.1, 0.4])  # env 1 starts over


# ---- datasets -----------------------------------------------------------------------------
def _episodes(rng, lengths=(5, 3), cams=("front",)):
    eps = []
    for i, length in enumerate(lengths):
        eps.append(Episode(prompt=f"task {i % 2}",
                           state=rng.normal(size=(length, 4)).astype(np.float32),
                           actions=rng.normal(size=(length, 3)).astype(np.float32),
                           images={c: rng.integers(0, 255, (length, 8, 10, 3), dtype=np.uint8) for c in cams},
                           seed=i))
    return eps


@pytest.mark.parametrize("image_mode", ["image", "video"])
def test_lerobot_v3_roundtrip(tmp_path, image_mode):
    rng = np.random.default_rng(0)
    eps = _episodes(rng)
    root = str(tmp_path / "ds")
    info = write_lerobot_dataset(root, eps, fps=10, image_mode=image_mode)
    assert info["codebase_version"] == "v3.0" and info["total_frames"] == 8 and info["total_tasks"] == 2
    for rel in ("meta/info.json", "meta/stats.json", "meta/tasks.parquet",
                "meta/episodes/chunk-000/file-000.parquet", "data/chunk-000/file-000.parquet"):
        assert os.path.exists(os.path.join(root, rel)), rel
    reader = LeRobotReader(root)
    np.testing.assert_array_equal(reader.state, np.concatenate([e.state for e in eps]))
    np.testing.assert_array_equal(reader.actions, np.concatenate([e.actions for e in eps]))
    assert [e["length"] for e in reader.episodes] == [5, 3]
    assert reader.prompt(0) == "task 0" and reader.prompt(6) == "task 1"
    assert list(reader.camera_keys) == ["front"]
    img = reader.image("front", 6)  # episode 1, frame 1
    if image_mode == "image":
        np.testing.assert_array_equal(img, eps[1].images["front"][1])  # PNG is lossless
    else:
        assert img.shape == (8, 10, 3)  # lossy codec: shape and frame position only
        assert os.path.exists(os.path.join(root, "videos/observation.images.front/chunk-000/file-000.mp4"))
    with pytest.raises(FileExistsError):
        write_lerobot_dataset(root, eps, fps=10)


def test_several_datasets_read_as_one(tmp_path):
    """SFT on several datasets: the same chunks as each dataset alone, episodes renumbered, tasks merged
    by prompt, and chunks never run from one dataset into the next."""
    rng = np.random.default_rng(3)
    first, second = _episodes(rng, lengths=(5, 3)), _episodes(rng, lengths=(2, 4, 3))
    second[2].prompt = "task 7"
    write_lerobot_dataset(str(tmp_path / "a"), first, fps=10)
    write_lerobot_dataset(str(tmp_path / "b"), second, fps=10)
    both = SFTChunkDataset([str(tmp_path / "a"), str(tmp_path / "b")], horizon=4)
    alone = [SFTChunkDataset(str(tmp_path / n), horizon=4) for n in "ab"]
    assert len(both) == 8 + 9 and both.reader.tasks == {0: "task 0", 1: "task 1", 2: "task 7"}
    assert [e["episode_index"] for e in both.reader.episodes] == [0, 1, 2, 3, 4]
    assert [(e["from"], e["to"]) for e in both.reader.episodes][2:] == [(8, 10), (10, 14), (14, 17)]
    got = both.get_batch(range(len(both)))
    for key in ("actions", "action_valid", "state", "prompt", "frame_index"):
        want = [alone[0].get_batch(range(8))[key], alone[1].get_batch(range(9))[key]]
        want = want[0] + want[1] if key == "prompt" else np.concatenate(want)
        np.testing.assert_array_equal(got[key], want, err_msg=key)
    np.testing.assert_array_equal(got["images"]["front"][8:], alone[1].get_batch(range(9))["images"]["front"])
    np.testing.assert_array_equal(got["episode_index"], [0] * 5 + [1] * 3 + [2] * 2 + [3] * 4 + [4] * 3)
    # Row 7 is the first dataset's last frame: its chunk repeats that frame, not the next dataset's.
    assert got["action_valid"][7].tolist() == [True, False, False, False]
    np.testing.assert_allclose(both.reader.actions, np.concatenate([e.actions for e in first + second]), rtol=1e-6)
    write_lerobot_dataset(str(tmp_path / "c"), _episodes(rng, cams=("wrist",)), fps=10)
    with pytest.raises(ValueError, match="cameras"):
        SFTChunkDataset([str(tmp_path / "a"), str(tmp_path / "c")], horizon=4)


def test_reads_lerobot_v2_layout_with_openpi_keys(tmp_path):
    """A v2.0 dataset as openpi's LIBERO converter writes it: keys image/wrist_image/state/actions,
    one parquet per episode, meta/episodes.jsonl and tasks.jsonl."""
    import io

    import pandas as pd
    from PIL import Image

    rng = np.random.default_rng(1)
    root = tmp_path / "libero_v2"
    (root / "meta").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    lengths = [4, 6]
    frames = {}
    for ep, length in enumerate(lengths):
        imgs = rng.integers(0, 255, (length, 16, 16, 3), dtype=np.uint8)
        frames[ep] = imgs

        def png(a):
            buf = io.BytesIO()
            Image.fromarray(a).save(buf, format="PNG")
            return {"bytes": buf.getvalue(), "path": None}

        pd.DataFrame({
            "image": [png(a) for a in imgs], "wrist_image": [png(a[::-1]) for a in imgs],
            "state": list(rng.normal(size=(length, 8)).astype(np.float32)),
            "actions": list(np.full((length, 7), ep, np.float32)),
            "timestamp": np.arange(length) / 10.0, "frame_index": np.arange(length),
            "episode_index": [ep] * length, "index": np.arange(length) + sum(lengths[:ep]),
            "task_index": [ep] * length,
        }).to_parquet(root / "data" / "chunk-000" / f"episode_{ep:06d}.parquet")
    (root / "meta" / "tasks.jsonl").write_text(
        "\n".join(json.dumps({"task_index": i, "task": f"libero task {i}"}) for i in range(2)))
    (root / "meta" / "episodes.jsonl").write_text(
        "\n".join(json.dumps({"episode_index": i, "tasks": [f"libero task {i}"], "length": n})
                  for i, n in enumerate(lengths)))
    feats = {"image": {"dtype": "image", "shape": [16, 16, 3]}, "wrist_image": {"dtype": "image", "shape": [16, 16, 3]},
             "state": {"dtype": "float32", "shape": [8]}, "actions": {"dtype": "float32", "shape": [7]}}
    (root / "meta" / "info.json").write_text(json.dumps({
        "codebase_version": "v2.0", "fps": 10, "chunks_size": 1000, "total_episodes": 2,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": None, "features": feats}))

    ds = SFTChunkDataset(str(root), horizon=5, action_pad_dim=32)
    assert sorted(ds.cameras) == ["image", "wrist_image"]
    batch = ds.get_batch([2, 4])  # episode 0 frame 2; episode 1 frame 0
    assert batch["actions"].shape == (2, 5, 32)
    assert batch["prompt"] == ["libero task 0", "libero task 1"]
    np.testing.assert_array_equal(batch["action_valid"][0], [True, True, False, False, False])
    assert batch["action_valid"][1].all()
    # Padded steps repeat the episode's last action and never mix in the next episode.
    np.testing.assert_array_equal(batch["actions"][0, :, :7], np.zeros((5, 7)))
    np.testing.assert_array_equal(batch["actions"][1, :, :7], np.ones((5, 7)))
    assert not batch["actions"][:, :, 7:].any() and batch["mask_dims"].sum() == 7
    np.testing.assert_array_equal(batch["images"]["image"][1], frames[1][0])
    np.testing.assert_array_equal(batch["images"]["wrist_image"][0], frames[0][2][::-1])


def test_video_writer_roundtrip(tmp_path):
    from envs.video import VideoRecorder, read_mp4

    rec = VideoRecorder(str(tmp_path), env_index=3, fps=10)
    for t in range(7):
        rec.add(np.full((15, 21, 3), 30 * t, np.uint8))  # odd sizes are padded for yuv420p
    path = rec.finish(success=True)
    assert os.path.basename(path) == "env003_ep0000_success.mp4"
    frames = read_mp4(path)
    assert frames.shape[0] == 7 and frames.shape[1:3] == (16, 22)
    assert abs(float(frames[6].mean()) - 180) < 6  # brightness survives compression


def test_libero_without_config_fails_fast_instead_of_prompting(tmp_path, monkeypatch):
    from envs.libero import LiberoNotInstalledError, make_libero_env

    monkeypatch.setenv("LIBERO_CONFIG_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(LiberoNotInstalledError, match="config.yaml"):
        make_libero_env({"suite": "libero_spatial"})


class _CountingEnv:
    """A picklable single env for the process pool: spec is its index; a negative index fails to build."""

    def __init__(self, index: int):
        if index < 0:
            raise RuntimeError("this env cannot be built")
        self.index = index

    def spec(self):
        return self.index

    def close(self):
        """Holds nothing; the pool calls it on shutdown."""


def _counting_env_factory(index: int):
    return functools.partial(_CountingEnv, index)


class _EnvWithExitHook(_CountingEnv):
    """Registers an interpreter exit handler in its worker that leaves a marker file: stands in for
    the torch/simulator static destructors that hung orphaned workers at exit."""

    def __init__(self, marker: str):
        super().__init__(0)
        import atexit
        import pathlib

        atexit.register(pathlib.Path(marker).write_text, "exit handlers ran")


def test_env_worker_whose_parent_is_gone_exits_at_once_without_exit_handlers(tmp_path):
    from envs.workers import SubprocEnvPool

    marker = tmp_path / "exit_handlers_ran"
    pool = SubprocEnvPool([functools.partial(_EnvWithExitHook, str(marker))], timeout_s=60)
    proc = pool._procs[0]
    pool._conns[0].close()  # what the worker sees when its parent process is killed: EOF
    proc.join(timeout=20)
    assert proc.exitcode == 0, "the worker did not leave after its parent's end of the pipe closed"
    assert not marker.exists(), "the worker ran the interpreter's exit handlers (they can hang)"
    pool.close()


def test_env_pool_starts_workers_in_waves_and_cleans_up_a_failed_start(monkeypatch):
    from envs.workers import EnvWorkerError, SubprocEnvPool

    pool = SubprocEnvPool([_counting_env_factory(i) for i in range(5)], timeout_s=60, start_wave=2)
    try:
        assert pool.specs == [0, 1, 2, 3, 4]
    finally:
        pool.close()
    # The third wave fails: the error names the env, and no worker of the earlier waves is left running.
    started = []
    original = SubprocEnvPool._launch

    def recording_launch(self, index):
        original(self, index)
        started.append(self._procs[index])

    monkeypatch.setattr(SubprocEnvPool, "_launch", recording_launch)
    with pytest.raises(EnvWorkerError, match="could not build"):
        SubprocEnvPool([_counting_env_factory(i) for i in (0, 1, 2, 3, -1)], timeout_s=60, start_wave=2)
    assert len(started) == 5 and not any(p.is_alive() for p in started)


class _ScriptedEnv:
    """A picklable single env for VLAEnv over the process pool, no simulator.

    State = [index, episode seed, step]; reward 1 per step; truncated after `limit` steps. An action
    whose first value is -7 raises; a reset with seed `crash_seed` kills the worker process once (a
    marker file remembers it), standing in for a simulator that segfaults.
    """

    def __init__(self, index: int, limit: int, crash_seed: int = -1, marker: str = ""):
        self.index, self.limit, self.crash_seed, self.marker = index, limit, crash_seed, marker
        self.seed, self.t = 0, 0

    def spec(self):
        from envs.base import EnvSpec

        return EnvSpec(cameras={}, state_dim=3, state_names=("index", "seed", "t"), action_dim=2,
                       max_episode_steps=self.limit, control_mode="scripted")

    def _obs(self):
        return {"images": {}, "state": np.array([self.index, self.seed, self.t], np.float32), "prompt": "p"}

    def reset(self, seed: int, hard: bool = False):
        if seed == self.crash_seed and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os.kill(os.getpid(), 9)
        self.seed, self.t = seed, 0
        return self._obs(), {}

    def step(self, action):
        if action[0] == -7:
            raise ValueError(f"env {self.index} was given the bad action")
        self.t += 1
        return self._obs(), 1.0, False, self.t >= self.limit, {"success": False}

    def close(self):
        """Holds nothing."""


def test_env_pool_hosts_several_envs_per_process_and_restarts_them_together():
    from envs.workers import EnvWorkerError, SubprocEnvPool

    pool = SubprocEnvPool([functools.partial(_ScriptedEnv, i, 100) for i in range(5)], timeout_s=60,
                          envs_per_process=2)
    try:
        assert pool.groups == [[0, 1], [2, 3], [4]] and pool.num_workers == 3
        assert [s.control_mode for s in pool.specs] == ["scripted"] * 5
        assert pool.pid(0) == pool.pid(1) != pool.pid(2) == pool.pid(3) != pool.pid(4)
        # One message per process, results keyed by env index, whatever the order asked.
        results, crashed = pool.call_many("reset", [4, 1, 2], [(40, False), (10, False), (20, False)])
        assert crashed == [] and {i: r[0]["state"][:2].tolist() for i, r in results.items()} == {
            4: [4, 40], 1: [1, 10], 2: [2, 20]}
        # An exception names its env, not its process or its neighbour.
        with pytest.raises(EnvWorkerError, match="env 3 was given") as err:
            pool.call_many("step_chunk", [2, 3], [np.zeros((2, 2)), np.full((2, 2), -7.0)])
        assert err.value.env_index == 3
        # A dead process takes both its envs: both are rebuilt and reported, also the one not called.
        old_pid = pool.pid(2)
        pool.kill_worker(3)
        results, crashed = pool.call_many("step_chunk", [2, 4], [np.zeros((1, 2))] * 2)
        assert crashed == [2, 3] and list(results) == [4]
        assert pool.restart_counts == [0, 0, 1, 1, 0] and pool.pid(2) == pool.pid(3) != old_pid
        results, crashed = pool.call_many("reset", [3], [(30, False)])
        assert crashed == [] and results[3][0]["state"][:2].tolist() == [3, 30]
    finally:
        pool.close()
    # A failed build in a shared process names the env that failed.
    with pytest.raises(EnvWorkerError, match="env 3: could not build"):
        SubprocEnvPool([_counting_env_factory(i) for i in (0, 1, 2, -1)], timeout_s=60, envs_per_process=2)


def test_env_pool_sends_now_and_receives_later_one_pending_command_per_process():
    """send_many / receive_many (what a pipelined rollout uses): commands to different processes
    are in flight together and received in any order; a process cannot take a second command
    before its answer is read; each answer is read once; a dead process is found on receipt."""
    from envs.workers import SubprocEnvPool

    pool = SubprocEnvPool([functools.partial(_ScriptedEnv, i, 100) for i in range(4)], timeout_s=60,
                          envs_per_process=2)
    try:
        first = pool.send_many("reset", [1, 0], [(11, False), (10, False)])
        second = pool.send_many("reset", [3], [(13, False)])
        with pytest.raises(RuntimeError, match="still owe"):
            pool.call_many("reset", [0], [(5, False)])
        results, crashed = pool.receive_many(second)
        assert crashed == [] and {i: r[0]["state"][:2].tolist() for i, r in results.items()} == {3: [3, 13]}
        results, crashed = pool.receive_many(first)
        assert crashed == [] and sorted(results) == [0, 1] and results[1][0]["state"][:2].tolist() == [1, 11]
        assert pool.receive_many(first) == ({}, [])
        pool.kill_worker(2)
        dead = pool.send_many("step_chunk", [2], [np.zeros((1, 2))])
        results, crashed = pool.call_many("step_chunk", [0, 1], [np.zeros((3, 2))] * 2)  # meanwhile
        assert crashed == [] and [len(results[i]) for i in (0, 1)] == [3, 3]
        assert pool.receive_many(dead) == ({}, [2, 3]) and pool.restart_counts == [0, 0, 1, 1]
    finally:
        pool.close()


def _joined(outputs: list) -> tuple:
    """step_chunk outputs of consecutive env groups -> the whole batch's (states, arrays, some info)."""
    obs, reward, term, trunc, info = zip(*outputs)
    return ({"state": np.concatenate([o["state"] for o in obs])}, np.concatenate(reward), np.concatenate(term),
            np.concatenate(trunc), {k: np.concatenate([i[k] for i in info]) for k in info[0] if k != "final_obs"})


def test_toy_env_in_worker_processes_steps_as_in_process_also_group_by_group():
    """The toy in worker processes (envs_per_process) returns what the in-process toy returns, env by
    env, with auto-resets inside chunks; so does each process's group of envs begun together and
    finished in any order (VLAEnv.begin_chunk / finish_chunk)."""
    from envs import make_env

    cfg = {"simulator": "toy", "num_envs": 5, "state_dim": 4, "episode_steps": 7}
    rng = np.random.default_rng(0)
    with make_env(cfg) as plain, make_env({**cfg, "envs_per_process": 2}) as pooled:
        groups = pooled.step_groups()
        assert plain.step_groups() == [[0, 1, 2, 3, 4]] and groups == [[0, 1], [2, 3], [4]]
        np.testing.assert_array_equal(plain.reset(3)["state"], pooled.reset(3)["state"])
        for k in range(4):
            actions = rng.normal(scale=0.1, size=(5, 6, 7)).astype(np.float32)
            want = plain.step_chunk(actions, n_exec=5)
            if k % 2:
                got = pooled.step_chunk(actions, n_exec=5)
            else:
                pending = [pooled.begin_chunk(g, actions[g], n_exec=5) for g in groups]
                finished = {i: pooled.finish_chunk(pending[i]) for i in reversed(range(len(groups)))}
                got = _joined([finished[i] for i in range(len(groups))])
            np.testing.assert_array_equal(want[0]["state"], got[0]["state"])
            for j in (1, 2, 3):
                np.testing.assert_array_equal(want[j], got[j])
            for key in ("episode_length", "exec_mask", "success_once", "done"):
                np.testing.assert_array_equal(want[4][key], got[4][key])
        assert plain.episode_seed(4) == pooled.episode_seed(4) == 3 + 4 + 5 * 2


def test_neighbour_lost_in_a_crash_during_reset_is_reported_at_the_next_chunk(tmp_path):
    """Env 0 ends its episode and its reset kills the process it shares with env 1 (mid-episode):
    env 0 is reset again in the rebuilt process; env 1's episode is lost, so the next chunk reports
    it crashed and truncated without stepping it, and then it starts its next episode."""
    from envs.base import PoolBackend, VLAEnv
    from envs.config import CommonEnvConfig
    from envs.workers import SubprocEnvPool

    crash_seed = 500
    marker = str(tmp_path / "crashed_once")
    factories = [functools.partial(_ScriptedEnv, 0, 2, crash_seed, marker), functools.partial(_ScriptedEnv, 1, 100)]
    env = VLAEnv(PoolBackend(SubprocEnvPool(factories, timeout_s=60, envs_per_process=2)), CommonEnvConfig(num_envs=2))
    try:
        env.reset(seed=[crash_seed - 2, 7])  # env 0's second episode has seed crash_seed
        obs, _, _, trunc, info = env.step_chunk(np.zeros((2, 2, 2), np.float32))
        assert trunc.tolist() == [True, False] and os.path.exists(marker)
        assert env.crash_log == [0, 1] and not info["crashed"].any()
        assert obs["state"].tolist() == [[0, crash_seed, 0], [1, 7, 2]]  # env 0 reset in the new process
        obs, reward, term, trunc, info = env.step_chunk(np.zeros((2, 2, 2), np.float32), n_exec=1)
        assert info["crashed"].tolist() == [False, True] and trunc.tolist() == [False, True]
        assert info["exec_mask"].tolist() == [[True], [False]] and reward.tolist() == [1.0, 0.0]
        assert obs["state"].tolist()[1] == [1, 7 + 2, 0]  # env 1's next episode, seed 7 + num_envs
        assert env.crash_log == [0, 1]  # logged once, when its process died
        _, _, _, _, info = env.step_chunk(np.zeros((2, 2, 2), np.float32), n_exec=1)
        assert not info["crashed"].any() and info["exec_mask"].all()
    finally:
        env.close()


def test_envs_per_process_config():
    cfg = ManiSkillConfig(num_envs=16, envs_per_process=4)
    assert cfg.process_layout() == 4 and cfg.replace(envs_per_process=32).process_layout() == 16
    cores = len(os.sched_getaffinity(0))
    assert ManiSkillConfig(num_envs=16).process_layout() == -(-16 // cores)  # one process per core
    with pytest.raises(ConfigError, match="envs_per_process"):
        ManiSkillConfig(envs_per_process=0)
    # LIBERO: one process per env unless nothing renders (robosuite's GL contexts cannot be shared).
    assert LiberoConfig(num_envs=4).process_layout() == 1
    assert LiberoConfig(num_envs=4, cameras=(), envs_per_process=2).process_layout() == 2
    with pytest.raises(ConfigError, match="one process each"):
        LiberoConfig(num_envs=4, envs_per_process=2)
