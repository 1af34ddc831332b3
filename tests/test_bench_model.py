"""`bench/model.py --part real --dry-run`: the real-shape CPU benchmark's code path at toy width and depth 1 / 2
(latency, transformers' PI0, PPO step, profile and the old-vs-new layer loop) runs end to end, every table
is filled, and the layer loop kept for the before/after timing still gives the current loop's outputs."""
from __future__ import annotations

import json
import math

import pytest
import torch

from bench.model import layer_loop, main
from vla.testing import random_inputs, tiny_policy


def test_real_shape_benchmark_dry_run(tmp_path):
    out = tmp_path / "model"
    tiny = {"config": "tiny", "device": "cpu", "dtype": "fp32", "batch": 4, "steps": 10, "cached_ms_median": 65.9,
            "recompute_ms_median": 168.1, "speedup_cached_vs_recompute": 2.55, "peak_memory_mb": 409.0,
            "peak_memory_kind": "process max RSS"}
    (tmp_path / "model.json").write_text(json.dumps(tiny))  # the file as the tiny-only benchmark wrote it
    results = main(["--part", "real", "--dry-run", "--out", str(out)])
    assert results["tiny"] == tiny  # the other part's entry is kept
    r = json.loads((tmp_path / "model.json").read_text())["real_shapes"]
    assert r["dry_run"] and r["settings"]["depths"] == [1, 2]

    for key in ("latency_pi0", "latency_pi05"):
        lat = r[key]
        assert [c["K"] for c in lat["chunks"]] == [4, 10]
        for c in lat["chunks"]:
            assert c["max_abs_diff"] < 1e-5  # the cached chunk equals K joint forwards
            assert c["cached_ms"] > 0 and c["recompute_ms"] > 0
            assert all(math.isfinite(c[f"model_{x}"]["speedup"]) for x in ("d1", "d2", "full"))
        assert set(lat["parts_ms"]) == {"vision", "prefix", "prefix_kv", "expert_step", "joint_step",
                                        "prefix_kv_absent", "expert_step_absent", "prefix_kv_libero",
                                        "expert_step_libero"}
        assert lat["libero_prefix_tokens"] < lat["absent_prefix_tokens"] < lat["prefix_tokens"]
        for case in ("absent_camera_chunks", "libero_chunks"):
            assert all(math.isfinite(c["ratio"]) for c in lat[case].values())
    assert r["latency_pi0"]["suffix_tokens"] == r["latency_pi05"]["suffix_tokens"] + 1  # π0's state token

    hf = r["transformers_pi0"]
    assert hf["max_abs_diff_fp32_depth1"] < 1e-4  # same weights, inputs and noise
    assert [row["depth"] for row in hf["rows"]] == [1, 2, "full"]
    assert hf["max_abs_diff_fp32_depth1_absent_camera"] < 1e-4  # the third camera absent: still the same model
    assert [row["depth"] for row in hf["absent_camera_rows"]] == [1, 2, "full"]
    assert hf["absent_prefix_tokens"] < hf["prefix_tokens"]

    ppo = r["ppo_pi0"]
    assert {(row["vlm"], row["mask"]) for row in ppo["rows"]} == {
        (v, m) for v in ("frozen", "trainable") for m in ("hybrid", "all")}
    pairs = {row["mask"]: row["stochastic_pairs"] for row in ppo["rows"]}
    assert pairs == {"hybrid": 2, "all": 8}  # minibatch 2, K = 4
    assert [(x["minibatch"], x["stochastic_pairs"]) for x in ppo["recompute"]] == [(2, 2), (2, 8), (4, 4), (4, 16)]
    assert ppo["embedding_row_ms"] > 0  # the dry run cuts the vocabulary too
    assert all(math.isfinite(v) for v in ppo["hybrid_over_all"].values())

    prof = r["profile_pi0"]
    assert prof["outputs_equal"] and all(prof["outputs_equal"].values())  # before and after: same actions
    assert prof["aten_calls"]["current"] < prof["aten_calls"]["legacy"]
    assert set(prof["current_over_legacy"]) == {"d1", "d2", "full"}
    assert abs(sum(c["share"] for c in prof["categories"].values()) - 1) < 1e-6
    assert set(r["targets"]) == {"prefix_cache_speedup_k10_pi0", "latency_vs_transformers_pi0",
                                 "latency_vs_transformers_pi0_third_camera_absent",
                                 "hybrid_vs_all_recompute_k4_mb2", "hybrid_vs_all_recompute_k4_mb4"}

    md = (tmp_path / "model.md").read_text()
    for title in ("Prefix cache, π0 ", "Prefix cache, π0.5", "transformers' PI0", "One PPO minibatch step",
                  "Profile of one cached π0 chunk", "Targets", "## Tiny config", "The third camera absent"):
        assert title in md, title


@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_prefix_without_hidden_states_has_the_same_cache(variant):
    """`embed_prefix(hidden=False)` (what `sample_actions` uses) stops the VLM's last layer at its keys and
    values: the cache is bit-identical to the full pass and to the layer loop before the change, the
    sampled actions too; only `hidden` is missing, and reading it says why."""
    policy = tiny_policy(7, variant)
    inputs = random_inputs(policy, 3, seed=7)
    with torch.no_grad():
        full, kv_only = policy.embed_prefix(inputs), policy.embed_prefix(inputs, hidden=False)
        with layer_loop("legacy"):
            legacy = policy.embed_prefix(inputs)
            legacy_actions = policy.sample_actions(inputs, noise=torch.zeros(3, 10, 8), num_steps=3)
        actions = policy.sample_actions(inputs, noise=torch.zeros(3, 10, 8), num_steps=3)
    assert kv_only.hidden is None and torch.equal(full.hidden, legacy.hidden)
    for (k, v), (k1, v1), (k2, v2) in zip(full.kv, kv_only.kv, legacy.kv, strict=True):
        assert torch.equal(k, k1) and torch.equal(v, v1) and torch.equal(k, k2) and torch.equal(v, v2)
    assert torch.equal(actions, legacy_actions)
    assert kv_only.select(torch.tensor([2, 0, 2])).hidden is None
    with pytest.raises(ValueError, match="hidden=False"):
        kv_only.pooled()
