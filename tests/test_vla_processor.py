"""Processor: images, prompts, normalisation; from an env observation to model inputs and back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vla.config import tiny
from vla.processor import (
    NormStats,
    Processor,
    build_test_tokenizer,
    discretize_state,
    load_norm_stats,
    normalize,
    resize_with_pad,
    save_norm_stats,
    unnormalize,
)
from vla.testing import tiny_policy


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return build_test_tokenizer(tmp_path_factory.mktemp("tok"))


def _stats(rng, d=7):
    return {"state": NormStats.from_data(rng.normal(2.0, 3.0, (500, 6))), "actions": NormStats.from_data(rng.uniform(-2, 4, (500, d)))}


def test_resize_with_pad_keeps_aspect_and_pads_black():
    img = np.zeros((1, 20, 40, 3), dtype=np.uint8)
    img[..., 0] = 255  # a red 20x40 image
    out = resize_with_pad(torch.from_numpy(img), 32)
    assert out.shape == (1, 3, 32, 32)
    # 40 wide -> 32 wide, 20 high -> 16 high, centred: rows 8..23 are the image, the rest is -1.
    assert torch.all(out[:, :, :8] == -1) and torch.all(out[:, :, 24:] == -1)
    assert torch.allclose(out[0, 0, 8:24], torch.ones(16, 32)) and torch.allclose(out[0, 1, 8:24], -torch.ones(16, 32))
    with pytest.raises(ValueError, match="uint8"):
        resize_with_pad(torch.zeros(1, 8, 8, 3), 32)


@pytest.mark.parametrize("mode", ["zscore", "quantile"])
def test_normalisation_round_trip(mode):
    rng = np.random.default_rng(0)
    data = rng.normal(1.0, 2.0, (1000, 5))
    stats = NormStats.from_data(data)
    x = data[:50]
    if mode == "quantile":
        x = np.clip(x, stats.q01, stats.q99)  # the quantile map clips outside [q01, q99]
    y = normalize(x, stats, mode)
    if mode == "quantile":
        assert y.min() >= -1 and y.max() <= 1
    else:
        assert abs(normalize(data, stats, mode).mean()) < 1e-6
    np.testing.assert_allclose(unnormalize(y, stats, mode), x, atol=1e-5)
    with pytest.raises(ValueError, match="does not match"):
        normalize(np.zeros((2, 4)), stats, mode)


def test_norm_stats_file_round_trip(tmp_path):
    stats = _stats(np.random.default_rng(1))
    save_norm_stats(stats, tmp_path / "n.json")
    back = load_norm_stats(tmp_path / "n.json")
    for k in stats:
        np.testing.assert_array_equal(back[k].std, stats[k].std)


def test_discretize_state_bins():
    assert discretize_state(np.array([-1.0, -0.999, 0.0, 0.999, 1.0, 3.0, -3.0]), 256).tolist() == [0, 0, 128, 255, 255, 255, 0]


def test_tokenizer_pi0_and_pi05_prompts(tokenizer):
    ids = tokenizer.encode("pick_up the cube")
    assert ids[0] == tokenizer.sp.bos_id() and ids[-1] == tokenizer.sp.encode("\n")[-1]
    assert tokenizer.sp.decode(ids[1:]).strip() == "pick up the cube"
    with_state = tokenizer.encode("pick up the cube", np.array([3, 250]))
    assert "State: 3 250;" in tokenizer.sp.decode(with_state)
    tokens, masks = tokenizer(["lift the peg", "push"], max_len=12)
    assert tokens.shape == (2, 12) and masks[0].sum() > masks[1].sum() > 0
    assert torch.all(tokens[~masks] == 0)
    with pytest.raises(ValueError, match="max_token_len"):
        tokenizer(["insert the peg into the hole on the side " * 4], max_len=12)


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_observation_to_inputs_and_actions_back(tokenizer, variant):
    cfg = tiny(variant)
    rng = np.random.default_rng(2)
    proc = Processor(cfg, tokenizer, _stats(rng))
    assert proc.norm_mode == ("quantile" if variant == "pi05" else "zscore")
    obs = {
        "images": {"base_0_rgb": rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)},  # wrist camera missing
        "state": rng.normal(2.0, 3.0, (3, 6)).astype(np.float32),
        "prompt": ["pick up the red cube", "lift the peg upright", "push the cube"],
    }
    inputs = proc(obs)
    inputs.validate(2, cfg.vision.image_size, cfg.max_token_len, cfg.action_dim)
    assert inputs.image_masks.tolist() == [[True, False]] * 3
    assert torch.all(inputs.images[:, 1] == -1)
    assert torch.all(inputs.state[:, 6:] == 0)
    tiny_policy(0, variant).sample_actions(inputs)  # the model accepts them
    # Actions: env units -> normalised padded chunk -> env units.
    env_actions = rng.uniform(-1, 3, (3, cfg.action_horizon, 7))
    chunk = proc.normalize_actions(env_actions)
    assert chunk.shape == (3, cfg.action_horizon, cfg.action_dim) and np.all(chunk[..., 7:] == 0)
    np.testing.assert_allclose(proc.unnormalize_actions(torch.from_numpy(chunk)), env_actions, atol=1e-4)
    assert proc.dim_mask().tolist() == [True] * 7 + [False]


def test_processor_rejects_bad_observations(tokenizer):
    proc = Processor(tiny(), tokenizer, _stats(np.random.default_rng(3)))
    good = {"images": {"base_0_rgb": np.zeros((1, 8, 8, 3), np.uint8)}, "state": np.zeros((1, 6), np.float32), "prompt": ["push"]}
    with pytest.raises(KeyError, match="unknown camera"):
        proc({**good, "images": {"left_wrist": good["images"]["base_0_rgb"]}})
    with pytest.raises(KeyError, match="lacks 'prompt'"):
        proc({k: v for k, v in good.items() if k != "prompt"})
    with pytest.raises(ValueError, match="prompts for a batch"):
        proc({**good, "prompt": ["a", "b"]})
    with pytest.raises(ValueError, match="does not match"):
        proc({**good, "state": np.zeros((1, 4), np.float32)})
    with pytest.raises(ValueError, match="padded width"):
        Processor(tiny(), proc.tokenizer, {"state": proc.norm_stats["state"], "actions": NormStats.from_data(np.zeros((3, 12)))})


def test_camera_map_routes_env_cameras(tokenizer):
    rng = np.random.default_rng(4)
    proc = Processor(tiny(), tokenizer, _stats(rng), camera_map={"wrist_0_rgb": "hand_camera"})
    frames = rng.integers(0, 256, (1, 32, 32, 3), dtype=np.uint8)
    inputs = proc({"images": {"hand_camera": frames, "other": frames}, "state": np.zeros((1, 6), np.float32),
                   "prompt": ["push"]})
    assert inputs.image_masks.tolist() == [[False, True]]
    torch.testing.assert_close(inputs.images[0, 1], resize_with_pad(torch.from_numpy(frames), 32)[0])
    with pytest.raises(KeyError, match="camera_map names"):
        Processor(tiny(), tokenizer, _stats(rng), camera_map={"nope": "hand_camera"})
