"""`bench/gpu.sh --dry-run`: the one-command GPU benchmark runs end to end on CPU at tiny sizes, every part
produces rows (none reports an error), and the markdown carries each table."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.sim
def test_gpu_benchmark_dry_run_covers_every_part(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": os.environ.get("PYTHON", "python3")}
    run = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run", str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    model = json.loads((tmp_path / "gpu.json").read_text())
    for part in ("matmul", "latency_pi0", "latency_pi05", "transformers_pi0", "guidance", "ppo"):
        assert "error" not in model[part], (part, model[part])
    assert {r["batch"] for r in model["latency_pi0"]} == {1, 2}
    assert all(r["gflops_per_chunk"] > 0 for r in model["latency_pi0"])  # the FLOP counter saw the model
    assert model["latency_pi0"][-1]["prefix_cache_speedup"] > 0
    for r in model["latency_pi0"] + model["latency_pi05"]:  # the LIBERO layout drops a camera and prompt columns
        assert r["libero_prefix_tokens"] < r["prefix_tokens"] and r["libero_chunk_ms"] > 0
    # graphed chunks (CPU: EagerRecorder) give the eager chunk's actions exactly
    assert all(r["graphs_max_diff"] == 0 and r["graphs_chunk_ms"] > 0 for r in model["latency_pi0"] + model["latency_pi05"])
    assert model["transformers_pi0"][0]["pirl_graphs_ms"] > 0
    assert model["transformers_pi0"][0]["max_action_diff"] < 1e-4  # same weights and noise, fp32
    assert [row["cameras"] for row in model["transformers_pi0"]] == ["all", "third absent"]
    assert model["transformers_pi0"][1]["max_action_diff"] < 1e-4
    assert {r["method"] for r in model["guidance"]} >= {"none", "qgf", "bptt", "best_of_n", "inpaint (RTC, beta 5)"}
    assert all(r["finite"] for r in model["guidance"])
    assert {(r["trainable"], r["mask"]) for r in model["ppo"]} == {("expert", "hybrid"), ("all", "hybrid")}
    md = (tmp_path / "gpu.md").read_text()
    assert "Chunk latency, π0" in md and "The LIBERO layout, eager" in md and "transformers' PI0" in md and "PPO optimizer step" in md
    assert "replayed from CUDA graphs" in md
    for name in ("serve_gpu", "serve_gpu_eager"):  # the server part, CUDA graphs on and off
        served = json.loads((tmp_path / f"{name}.json").read_text())
        assert {(r["mode"], r["clients"]) for r in served["rows"]} == {
            (m, n) for m in ("batching", "one-at-a-time") for n in (1, 2)}
    assert "cuda_graphs=false" in json.loads((tmp_path / "serve_gpu_eager.json").read_text())["meta"]["server_args"]
    envs = json.loads((tmp_path / "gpu_envs.json").read_text())
    assert envs, "the ManiSkill part wrote nothing"
