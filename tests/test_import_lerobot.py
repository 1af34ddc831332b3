"""`pirl import` of a LeRobot 0.5+ directory: norm stats from its processor files, the home framework's
image convention (no antialiasing), and pirl's own checkpoints unaffected."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pirl.cli import main
from pirl.train.common import load_bundle
from vla.checkpoint import load_policy, read_lerobot_processor_stats
from vla.normalize import NormStats
from vla.processor import build_test_tokenizer, resize_with_pad
from vla.testing import tiny_policy

REPO = Path(__file__).resolve().parents[1]


def _lerobot_dir(directory: Path, variant: str, rng) -> dict:
    """Tiny random weights in LeRobot's layout plus its pre/post-processor files; returns the stats."""
    policy = tiny_policy(21, variant)
    directory.mkdir()
    state = {"model." + k: v.contiguous() for k, v in policy.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"type": variant, "chunk_size": policy.config.action_horizon}))
    mode = "MEAN_STD" if variant == "pi0" else "QUANTILES"
    stats = {f"observation.state.{s}": rng.normal(size=7).astype(np.float32) for s in ("mean", "q01", "min")}
    stats |= {f"action.{s}": rng.normal(size=6).astype(np.float32) for s in ("mean", "q01", "min")}
    for feature, d in (("observation.state", 7), ("action", 6)):
        stats[f"{feature}.std"] = rng.uniform(0.5, 2.0, size=d).astype(np.float32)
        stats[f"{feature}.q99"] = stats[f"{feature}.q01"] + rng.uniform(1.0, 3.0, size=d).astype(np.float32)
        stats[f"{feature}.max"] = stats[f"{feature}.min"] + 5.0
    features = {"observation.state": {"type": "STATE", "shape": [7]}, "action": {"type": "ACTION", "shape": [6]},
                "observation.images.base_0_rgb": {"type": "VISUAL", "shape": [3, 224, 224]}}
    norm_map = {"VISUAL": "IDENTITY", "STATE": mode, "ACTION": mode}
    pre_state = "policy_preprocessor_step_3_normalizer_processor.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in stats.items()}, str(directory / pre_state))
    (directory / "policy_preprocessor.json").write_text(json.dumps({"name": "policy_preprocessor", "steps": [
        {"registry_name": "rename_observations_processor", "config": {"rename_map": {}}},
        {"registry_name": "to_batch_processor", "config": {}},
        {"registry_name": "normalizer_processor", "config": {"eps": 1e-8, "features": features, "norm_map": norm_map},
         "state_file": pre_state}]}))
    post_state = "policy_postprocessor_step_0_unnormalizer_processor.safetensors"
    save_file({k: torch.from_numpy(v) for k, v in stats.items() if k.startswith("action.")}, str(directory / post_state))
    (directory / "policy_postprocessor.json").write_text(json.dumps({"name": "policy_postprocessor", "steps": [
        {"registry_name": "unnormalizer_processor", "config": {"eps": 1e-8, "features": {"action": features["action"]},
                                                               "norm_map": norm_map}, "state_file": post_state},
        {"registry_name": "device_processor", "config": {"device": "cpu"}}]}))
    return stats


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_cli_import_of_a_lerobot_dir_carries_its_processor_stats(tmp_path, variant, capsys):
    stats = _lerobot_dir(tmp_path / "lerobot", variant, np.random.default_rng(0))
    build_test_tokenizer(tmp_path / "tok")
    model = "tiny" if variant == "pi0" else "tiny_pi05"
    assert main(["import", str(tmp_path / "lerobot"), str(tmp_path / "out"), "--model", model,
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    assert "antialias=False" in capsys.readouterr().out
    policy, processor = load_bundle(tmp_path / "out")
    assert policy.config.image_resize_antialias is False
    for ours, theirs in (("state", "observation.state"), ("actions", "action")):
        entry = processor.norm_stats[ours]
        assert entry.mode == ("zscore" if variant == "pi0" else "quantile")
        for stat in ("mean", "std", "q01", "q99", "min", "max"):
            np.testing.assert_array_equal(getattr(entry, stat), stats[f"{theirs}.{stat}"].astype(np.float64))
    obs = {"images": {"base_0_rgb": np.random.default_rng(1).integers(0, 255, (2, 48, 64, 3), dtype=np.uint8)},
           "state": np.stack([stats["observation.state.q01"]] * 2), "prompt": ["open the drawer"] * 2}
    actions = processor.unnormalize_actions(policy.sample_actions(processor(obs), num_steps=2))
    assert actions.shape == (2, policy.config.action_horizon, 6) and np.isfinite(actions).all()


def test_reader_returns_none_without_processor_files(tmp_path):
    assert read_lerobot_processor_stats(tmp_path) is None


def test_resize_without_antialias_equals_plain_bilinear():
    """Imported checkpoints: the 480x640 camera downscaled as openpi's PyTorch port / LeRobot do."""
    images = torch.from_numpy(np.random.default_rng(2).integers(0, 256, (2, 480, 640, 3), dtype=np.uint8))
    out = resize_with_pad(images, 224, antialias=False)
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    ref = F.interpolate(x, size=(168, 224), mode="bilinear", align_corners=False, antialias=False).clamp(-1, 1)
    torch.testing.assert_close(out[:, :, 28:196], ref, rtol=0, atol=0)
    assert (out[:, :, :28] == -1).all() and (out[:, :, 196:] == -1).all()
    assert (resize_with_pad(images, 224, antialias=True) - out).abs().max() > 0.1  # the conventions differ
    up = torch.from_numpy(np.random.default_rng(3).integers(0, 256, (1, 100, 100, 3), dtype=np.uint8))
    torch.testing.assert_close(resize_with_pad(up, 224, antialias=False), resize_with_pad(up, 224, antialias=True))
    same = torch.from_numpy(np.random.default_rng(4).integers(0, 256, (1, 224, 224, 3), dtype=np.uint8))
    torch.testing.assert_close(resize_with_pad(same, 224, antialias=False),
                               same.permute(0, 3, 1, 2).float() / 127.5 - 1.0)


@pytest.mark.parametrize("name", ["pickcube_tiny_sft", "pickcube_tiny_sft_v3", "pickcube_tiny_sft_18k_step6k"])
def test_shipped_checkpoints_keep_pirls_convention_and_record_their_rollout(name):
    from vla.checkpoint import read_rollout

    policy, _ = load_policy(REPO / "assets" / name)
    assert policy.config.image_resize_antialias is True
    rollout = read_rollout(REPO / "assets" / name)
    assert rollout["env"]["max_episode_steps"] == 100 and rollout["num_steps"] == 4 and rollout["n_exec"] == 5


def test_cli_import_of_an_openpi_export_carries_its_stats_and_acts(tmp_path, capsys):
    """An openpi-layout export (model.safetensors + assets/<id>/norm_stats.json) through `pirl import`:
    the stats come over exactly, the resize follows openpi (no antialiasing), and the policy acts with the
    weights it was exported with."""
    from vla.checkpoint import export_openpi
    from vla.testing import tiny_policy

    policy = tiny_policy(21)
    rng = np.random.default_rng(2)
    stats = {key: NormStats(mean=rng.normal(size=7), std=rng.uniform(0.5, 2, 7), q01=-rng.uniform(1, 2, 7),
                            q99=rng.uniform(1, 2, 7)) for key in ("state", "actions")}
    export_openpi(tmp_path / "openpi", policy, stats, asset_id="robot", include_unused=True)
    build_test_tokenizer(tmp_path / "tok")
    assert main(["import", str(tmp_path / "openpi"), str(tmp_path / "out"), "--model", "tiny",
                 "--tokenizer", str(tmp_path / "tok")]) == 0
    assert "openpi checkpoint" in capsys.readouterr().out
    imported, processor = load_bundle(tmp_path / "out")
    assert imported.config.image_resize_antialias is False
    for key in ("state", "actions"):
        np.testing.assert_allclose(processor.norm_stats[key].mean, stats[key].mean, rtol=0, atol=1e-6)
        np.testing.assert_allclose(processor.norm_stats[key].std, stats[key].std, rtol=0, atol=1e-6)
    for (name, a), b in zip(policy.state_dict().items(), imported.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
