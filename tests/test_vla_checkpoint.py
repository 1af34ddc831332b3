"""Checkpoints: own-format round trip, openpi / LeRobot importers, mismatch reports, atomic writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vla.checkpoint import (
    CheckpointMismatch,
    export_openpi,
    import_checkpoint,
    load_policy,
    read_header,
    save_policy,
)
from vla.config import tiny
from vla.processor import NormStats
from vla.testing import random_inputs, tiny_policy


def _stats(dim_state=7, dim_action=7, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "state": NormStats.from_data(rng.normal(size=(100, dim_state))),
        "actions": NormStats.from_data(rng.normal(size=(100, dim_action))),
    }


def _actions(policy, seed=0):
    inputs = random_inputs(policy, 2, seed=seed)
    noise = torch.randn(2, policy.config.action_horizon, policy.config.action_dim, generator=torch.Generator().manual_seed(seed))
    return policy.sample_actions(inputs, noise=noise)


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_save_load_round_trip_is_bit_exact(tmp_path, variant):
    policy = tiny_policy(11, variant)
    head = torch.nn.Linear(4, 3)
    stats = _stats()
    save_policy(tmp_path / "ckpt", policy, stats, extra_modules={"value_head": head}, metadata={"iteration": 3})
    head2 = torch.nn.Linear(4, 3)
    loaded, loaded_stats = load_policy(tmp_path / "ckpt", extra_modules={"value_head": head2})
    assert loaded.config == policy.config
    for (k, a), (k2, b) in zip(policy.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(head.weight, head2.weight)
    assert np.array_equal(loaded_stats["actions"].q99, stats["actions"].q99)
    assert torch.equal(_actions(policy), _actions(loaded))


def test_openpi_layout_import_round_trip_reports_unused_weights(tmp_path):
    policy = tiny_policy(12)
    export_openpi(tmp_path / "openpi", policy, _stats(), asset_id="maniskill", include_unused=True)
    assert (tmp_path / "openpi/assets/maniskill/norm_stats.json").exists()
    imported, stats, report = import_checkpoint(tmp_path / "openpi", tiny("pi0"))
    assert report.format == "openpi"
    assert report.unused_keys == ["paligemma_with_expert.gemma_expert.lm_head.weight"]
    assert report.norm_stats_file.parent.name == "maniskill"
    assert torch.equal(_actions(policy, 1), _actions(imported, 1))
    assert stats["state"].dim == 7


@pytest.mark.parametrize("vision_prefix", ["vision_tower.vision_model.", "vision_tower."])
def test_lerobot_layout_import_both_transformers_generations(tmp_path, vision_prefix):
    """LeRobot files: keys under `model.`, SigLIP with (transformers 4) or without (5) `vision_model`."""
    policy = tiny_policy(13, "pi05")
    state = {}
    for k, v in policy.state_dict().items():
        state["model." + k.replace("vision_tower.vision_model.", vision_prefix)] = v.contiguous()
    # LeRobot ties PaliGemma's token table to its LM head and saves it once, under the head's name.
    table = "model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
    state["model.paligemma_with_expert.paligemma.lm_head.weight"] = state.pop(table)
    directory = tmp_path / "lerobot"
    directory.mkdir()
    save_file(state, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"type": "pi05", "chunk_size": 10}))
    imported, stats, report = import_checkpoint(directory, tiny("pi05"))
    assert report.format == "lerobot" and stats is None
    assert torch.equal(_actions(policy, 2), _actions(imported, 2))


def test_wrong_size_config_fails_before_any_weight_is_read(tmp_path):
    export_openpi(tmp_path / "ck", tiny_policy(14))
    weights = tmp_path / "ck" / "model.safetensors"
    header = read_header(weights)
    # Corrupt every tensor byte after the header: any attempt to read weights would now return garbage
    # or fail; the config check must still report cleanly from the header alone.
    raw = bytearray(weights.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    raw[8 + header_len :] = b"\xff" * (len(raw) - 8 - header_len)
    weights.write_bytes(bytes(raw[: 8 + header_len + 16]))  # and truncate it
    wrong = tiny("pi0").replace(action_dim=16)
    with pytest.raises(CheckpointMismatch) as err:
        import_checkpoint(tmp_path / "ck", wrong)
    message = str(err.value)
    assert "shape mismatch" in message and "action_in_proj.weight: file (32, 8) vs config (32, 16)" in message
    assert len(header) > 10


def test_mismatch_lists_missing_and_unexpected_keys(tmp_path):
    policy = tiny_policy(15)
    state = {k: v.contiguous() for k, v in policy.state_dict().items() if not k.startswith("state_proj")}
    state["some_new_head.weight"] = torch.zeros(3)
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    with pytest.raises(CheckpointMismatch) as err:
        import_checkpoint(tmp_path / "bad", tiny("pi0"))
    message = str(err.value)
    assert "missing (2)" in message and "state_proj.weight" in message and "state_proj.bias" in message
    assert "unexpected (1)" in message and "some_new_head.weight" in message
    # A π0 file into a π0.5 config: the variant difference is spelled out too.
    export_openpi(tmp_path / "pi0", policy)
    with pytest.raises(CheckpointMismatch, match="time_mlp_in.weight"):
        import_checkpoint(tmp_path / "pi0", tiny("pi05"))


def test_stored_config_must_match_requested(tmp_path):
    save_policy(tmp_path / "c", tiny_policy(16))
    with pytest.raises(CheckpointMismatch, match="action_horizon"):
        load_policy(tmp_path / "c", config=tiny("pi0").replace(action_horizon=5))


def test_atomic_save_keeps_the_old_checkpoint_when_writing_fails(tmp_path):
    policy = tiny_policy(17)
    save_policy(tmp_path / "c", policy, metadata={"iteration": 1})

    class Exploding(torch.nn.Module):
        def state_dict(self, *args, **kwargs):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        save_policy(tmp_path / "c", tiny_policy(18), extra_modules={"head": Exploding()}, metadata={"iteration": 2})
    meta = json.loads((tmp_path / "c" / "config.json").read_text())
    assert meta["metadata"]["iteration"] == 1
    loaded, _ = load_policy(tmp_path / "c")
    assert torch.equal(_actions(policy), _actions(loaded))
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary directories left behind


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        import_checkpoint(tmp_path, tiny())
