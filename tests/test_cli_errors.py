"""The CLI's user-facing surface: `--help` on every command, one clear line (exit status 2, no
traceback) for ordinary mistakes, and eval defaults taken from the checkpoint (docs/errors.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pirl.cli import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "assets" / "pickcube_tiny_sft_v3"


@pytest.mark.parametrize("command", ["train", "sft", "eval", "collect", "critic", "serve"])
def test_help_prints_usage_groups_keys_and_examples(command, capsys):
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert f"pirl {command}" in out and "usage:" in out and "examples:" in out and "keys" in out
    if command in ("train", "eval", "collect"):
        assert "maniskill_pickcube_state (default)" in out  # the env group and its options
    assert "Traceback" not in out


def _one_line_error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_missing_checkpoint(capsys, tmp_path):
    line = _one_line_error(capsys, ["eval", f"checkpoint={tmp_path / 'nope'}", "episodes=1"])
    assert "no such directory" in line and "nope" in line


@pytest.mark.parametrize("keep", ["header", "data"])
def test_truncated_weights(capsys, tmp_path, keep):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(SHIPPED, ckpt)
    weights = (ckpt / "model.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(weights[:8], "little")
    cut = header_end // 2 if keep == "header" else (header_end + len(weights)) // 2
    (ckpt / "model.safetensors").write_bytes(weights[:cut])
    line = _one_line_error(capsys, ["eval", f"checkpoint={ckpt}", "episodes=1", f"output_dir={tmp_path / 'out'}"])
    assert "model.safetensors is truncated or corrupt" in line and f"file has {cut} bytes" in line
    assert (f"header ends at byte {header_end}" in line) == (keep == "header")
    assert not (tmp_path / "out").exists()  # nothing written half-way


def test_config_and_weights_mismatch(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(SHIPPED, ckpt)
    meta = json.loads((ckpt / "config.json").read_text())
    meta["model"]["expert"]["mlp_dim"] = 128
    (ckpt / "config.json").write_text(json.dumps(meta))
    line = _one_line_error(capsys, ["eval", f"checkpoint={ckpt}", "episodes=1"])
    assert "does not match the model config" in line and "mis-shaped" in line and "file (" in line


def test_misspelt_override_key_names_the_closest(capsys):
    line = _one_line_error(capsys, ["eval", f"checkpoint={SHIPPED}", "episdoes=3"])
    assert "'episdoes'" in line and "did you mean episodes" in line
    line = _one_line_error(capsys, ["train", "+run.iteratoins=3"])
    assert "'run.iteratoins'" in line and "run.iterations" in line
    # A real key that the chosen option's file does not set: say how to add it, not "did you mean" itself.
    line = _one_line_error(capsys, ["train", "sampler=flow_noise", "sampler.explore_std=[0.01]"])
    assert "+sampler.explore_std=" in line and "did you mean" not in line


def test_unknown_group_option_lists_the_options(capsys):
    line = _one_line_error(capsys, ["eval", f"checkpoint={SHIPPED}", "env=pickcube"])
    assert "unknown env option 'pickcube'" in line and "maniskill_pickcube_state" in line


def test_bad_values(capsys, tmp_path):
    line = _one_line_error(capsys, ["eval", f"checkpoint={SHIPPED}", "num_steps=0", "episodes=1"])
    assert "num_steps must be >= 1" in line
    line = _one_line_error(capsys, ["collect", f"checkpoint={SHIPPED}", f"out={tmp_path / 'c'}", "sampler.a_noise=-1"])
    assert "a_noise must be >= 0" in line
    assert not (tmp_path / "c").exists()


def test_bad_device_settings(capsys):
    line = _one_line_error(capsys, ["serve", f"checkpoint={SHIPPED}", "device=cuda:x", "port=0"])
    assert "device='cuda:x' is not a device" in line
    line = _one_line_error(capsys, ["train", "experiment=maniskill_pickcube_tiny", "cluster=gpu_collocated",
                                    "cluster.worker_device=gpu"])
    assert "cluster.worker_device='gpu' is not a device" in line
    import torch

    if not torch.cuda.is_available():
        for command in (["serve", f"checkpoint={SHIPPED}", "device=cuda", "port=0"],
                        ["critic", f"checkpoint={SHIPPED}", "device=cuda"],
                        ["eval", f"checkpoint={SHIPPED}", "device=cuda", "episodes=1"],
                        ["collect", f"checkpoint={SHIPPED}", "out=/nonexistent/c", "device=cuda"]):
            assert "torch sees no CUDA device here" in _one_line_error(capsys, command)


def test_dataset_without_the_expected_files(capsys, tmp_path):
    (tmp_path / "data").mkdir()
    line = _one_line_error(capsys, ["sft", f"dataset={tmp_path / 'data'}", "steps=1", f"output_dir={tmp_path / 'o'}"])
    assert "meta/info.json" in line and str(tmp_path / "data") in line


def test_exit_status_and_debug_traceback_in_a_real_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PIRL_DEBUG", None)
    argv = [sys.executable, "-m", "pirl.cli", "eval", f"checkpoint={tmp_path / 'nope'}"]
    run = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert run.returncode == 2 and run.stderr.strip().count("\n") == 0 and "Traceback" not in run.stderr
    run = subprocess.run(argv, capture_output=True, text=True, env={**env, "PIRL_DEBUG": "1"}, cwd=REPO, timeout=300)
    assert run.returncode != 0 and "Traceback" in run.stderr


@pytest.mark.sim
def test_eval_takes_episode_length_and_k_from_the_checkpoint(tmp_path, capsys):
    assert main(["eval", f"checkpoint={SHIPPED}", "episodes=2", "num_envs=2", f"output_dir={tmp_path / 'a'}"]) == 0
    assert "rollout.json" in capsys.readouterr().out  # the one line naming the checkpoint's defaults
    result = json.loads((tmp_path / "a" / "results.json").read_text())
    assert result["num_steps"] == 4 and result["max_episode_steps"] == 100 and result["n_exec"] == 5
    assert all(e["length"] <= 100 for e in result["per_episode"])
    assert any(e["length"] > 50 or e["success"] for e in result["per_episode"])
    # overrides win over the checkpoint's settings
    assert main(["eval", f"checkpoint={SHIPPED}", "episodes=2", "num_envs=2", "num_steps=2",
                 "env.max_episode_steps=20", f"output_dir={tmp_path / 'b'}"]) == 0
    result = json.loads((tmp_path / "b" / "results.json").read_text())
    assert result["num_steps"] == 2 and result["max_episode_steps"] == 20
    assert all(e["length"] <= 20 for e in result["per_episode"])


def test_unknown_task_names_the_known_ones(capsys, tmp_path):
    line = _one_line_error(capsys, ["eval", f"checkpoint={SHIPPED}", "env.task=NoSuchTask-v1", "episodes=1",
                                    "num_envs=1", f"output_dir={tmp_path / 'out'}"])
    assert "NoSuchTask-v1" in line and "PickCube-v1" in line
    assert not (tmp_path / "out").exists()  # nothing written half-way


def test_serve_on_a_port_in_use_says_so_in_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "pirl.cli", "serve", f"checkpoint={SHIPPED}", f"port={port}"],
                             capture_output=True, text=True, timeout=300, cwd=REPO,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PIRL_DEBUG": ""})
    assert run.returncode == 2
    err = run.stderr.strip().splitlines()
    assert len(err) == 1 and "address already in use" in err[0] and "port=0" in err[0], run.stderr
    assert "Traceback" not in run.stderr
