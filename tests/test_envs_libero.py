"""LIBERO (libero_spatial) through the batched VLA env API, on the real simulator (software EGL)."""
import numpy as np
import pytest

import libero  # noqa: F401  (a missing simulator is an install failure, not a skip)

from envs.libero import NOOP_ACTION, make_libero_env  # noqa: E402

pytestmark = pytest.mark.sim


def test_libero_spatial_init_state_images_and_success():
    env = make_libero_env(dict(suite="libero_spatial", task_ids=(0,), image_size=(64, 64), num_envs=1,
                               num_noop_steps=0, render_backend="egl"))
    pool = env.backend.pool
    try:
        assert env.spec.max_episode_steps == 220 and env.spec.action_dim == 7 and env.spec.state_dim == 8
        obs = env.reset(seed=3)
        assert obs["prompt"] == ["pick up the black bowl between the plate and the ramekin and place it on the plate"]
        # Without no-op steps the simulator state is exactly shipped init state number 3 (seed 3 % 50).
        states, _ = pool.call_many("call", [0], [("get_state", ())])
        shipped = pool.call_many("call", [0], [("init_state_index", (3,))])[0][0]
        assert shipped == 3
        import libero.libero.benchmark as benchmark

        expected = benchmark.get_benchmark_dict()["libero_spatial"]().get_task_init_states(0)[3]
        np.testing.assert_allclose(states[0][1:], np.asarray(expected)[1:], atol=1e-6)  # [0] is sim time

        for cam in ("agentview_image", "robot0_eye_in_hand_image"):
            image = obs["images"][cam]
            assert image.shape == (1, 64, 64, 3) and image.dtype == np.uint8
        # Orientation: flipped upright, the agentview shows the dark back wall at the top and the
        # light wooden table at the bottom (unflipped LIBERO frames are upside down).
        agent = obs["images"]["agentview_image"][0].astype(float)
        assert agent[-16:].mean() > agent[:16].mean() + 20
        assert not (obs["state"] == 0).all() and obs["state"].shape == (1, 8)

        a = np.tile(NOOP_ACTION, (1, 3, 1))
        a[..., 2] = 0.5  # move the arm up a little
        obs2, reward, term, trunc, info = env.step_chunk(a)
        assert reward[0] == 0 and not info["success"][0] and not (term | trunc).any()
        assert obs2["state"][0, 2] > obs["state"][0, 2]  # eef z rose

        # Put the bowl on the plate (the task's goal) and check that success is detected: reward 1,
        # terminated, nothing executed after it, then auto-reset.
        pool.call_many("call", [0], [("place_on", ("akita_black_bowl_1", "plate_1"))])
        obs3, reward, term, trunc, info = env.step_chunk(np.tile(NOOP_ACTION, (1, 6, 1)))
        assert term[0] and not trunc[0] and reward[0] == 1.0
        assert info["success"][0] and info["success_once"][0]
        k = int(info["exec_mask"][0].sum())
        assert 1 <= k < 6 and not info["exec_mask"][0, k:].any()
        assert info["episode_length"][0] == 3 + k
        # auto-reset: the next episode (seed 3 + 1) starts from shipped init state 4
        states, _ = pool.call_many("call", [0], [("get_state", ())])
        expected = benchmark.get_benchmark_dict()["libero_spatial"]().get_task_init_states(0)[4]
        np.testing.assert_allclose(states[0][1:], np.asarray(expected)[1:], atol=1e-6)
    finally:
        env.close()


@pytest.mark.slow
def test_libero_osmesa_backend_renders_same_layout():
    env = make_libero_env(dict(suite="libero_object", task_ids=(2,), image_size=(64, 64), num_envs=1,
                               render_backend="osmesa"))
    try:
        assert env.spec.max_episode_steps == 280
        obs = env.reset(seed=0)
        agent = obs["images"]["agentview_image"][0].astype(float)
        assert agent.shape == (64, 64, 3) and agent.std() > 10
        _, reward, term, trunc, _ = env.step_chunk(np.tile(NOOP_ACTION, (1, 2, 1)))
        assert reward[0] == 0 and not (term | trunc).any()
    finally:
        env.close()
