"""SFT on a LeRobot dataset, the shipped default policy, and the `pirl` command line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from envs.dataset import Episode, write_lerobot_dataset
from pirl.cli import REPO, compose, main
from pirl.train.common import load_bundle
from pirl.train.sft import SFTConfig, train_sft

SHIPPED = REPO / "assets" / "pickcube_tiny_sft_v3"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Episodes whose actions are a fixed function of the state and of the prompt (two tasks), with a
    wrist camera: a model that reads its inputs can fit them, one that does not cannot."""
    rng = np.random.default_rng(0)
    episodes = []
    for i in range(12):
        prompt = "push the cube" if i % 2 else "lift the peg"
        length = int(rng.integers(15, 25))
        # State = position on a straight line and the line's velocity, so a whole chunk of future
        # actions is predictable from the current state (and the prompt, which flips the sign).
        start, velocity = rng.normal(size=3), rng.normal(size=3)
        position = start + velocity * np.arange(length)[:, None] / length
        state = np.concatenate([position, velocity[None].repeat(length, 0)], 1).astype(np.float32)
        sign = 1.0 if i % 2 else -1.0
        actions = np.tanh(position * sign * 2.0) * np.array([0.5, 1.0, 2.0])
        images = rng.integers(0, 255, (length, 24, 24, 3), dtype=np.uint8)
        episodes.append(Episode(prompt=prompt, state=state, actions=actions, images={"wrist": images}))
    root = tmp_path_factory.mktemp("data") / "toy"
    write_lerobot_dataset(str(root), episodes, fps=10)
    return str(root)


def _model_section(**changes):
    from vla.config import tiny

    data = tiny("pi0").replace(**changes).to_dict()
    data["camera_names"] = list(data["camera_names"])
    return data


def test_sft_fits_a_dataset_and_writes_a_self_contained_policy(dataset, tmp_path):
    cfg = SFTConfig(dataset=dataset, model=_model_section(state_dim=8), cameras={"wrist_0_rgb": "wrist"},
                    output_dir=str(tmp_path / "sft"), steps=150, batch_size=32, lr=3e-3, warmup_steps=10,
                    log_every=50, save_every=100)
    final = train_sft(cfg)
    meta = json.loads((final / "config.json").read_text())
    assert meta["metadata"]["sft_step"] == 150
    assert (tmp_path / "sft" / "checkpoints" / "step_0000100").is_dir()
    policy, processor = load_bundle(final)
    # The final loss on the data is far below the loss of the untrained model.
    from envs.dataset import SFTChunkDataset

    ds = SFTChunkDataset(dataset, policy.config.action_horizon, cameras=["wrist"])
    batch = ds.get_batch(range(64))
    obs = {"images": {"wrist_0_rgb": batch["images"]["wrist"]}, "state": batch["state"], "prompt": batch["prompt"]}
    inputs = processor(obs)
    actions = torch.from_numpy(processor.normalize_actions(batch["actions"]))
    mask = torch.from_numpy(batch["action_valid"])
    g = torch.Generator().manual_seed(0)
    noise, t = torch.randn(actions.shape, generator=g), torch.rand(64, generator=g) * 0.9 + 0.05
    with torch.no_grad():
        trained = policy.flow_matching_loss(inputs, actions, processor.dim_mask(), mask, noise=noise, t=t)
        from vla.policy import FlowPolicy

        torch.manual_seed(0)
        untrained = FlowPolicy(policy.config).flow_matching_loss(inputs, actions, processor.dim_mask(), mask,
                                                                 noise=noise, t=t)
    assert trained < 0.5 * untrained, (float(trained), float(untrained))


def test_sft_records_robust_state_normalisation_and_trains_with_state_noise(tmp_path):
    """A state dim constant in the demos is dropped, every std is floored and the state clipped; all of
    it is written into norm_stats.json, so RL and evaluation see what SFT saw."""
    from vla.normalize import load_norm_stats

    rng = np.random.default_rng(1)
    episodes = []
    for i in range(6):
        state = np.concatenate([rng.normal(size=(12, 3)), np.full((12, 1), 0.25)], 1).astype(np.float32)
        episodes.append(Episode(prompt="lift the peg", state=state, actions=np.tanh(state[:, :2]), images={}))
    write_lerobot_dataset(str(tmp_path / "data"), episodes, fps=10)
    cfg = SFTConfig(dataset=str(tmp_path / "data"), model=_model_section(state_dim=4), output_dir=str(tmp_path / "sft"),
                    steps=20, batch_size=16, warmup_steps=2, log_every=10, save_every=100, state_noise=0.1,
                    state_clip=None, state_range_margin=0.5)
    final = train_sft(cfg)
    stats = load_norm_stats(final / "norm_stats.json")["state"]
    assert stats.drop == (3,) and stats.clip is None and stats.mode == "zscore"
    np.testing.assert_allclose(stats.std_floor, 0.25 * np.median(stats.std), rtol=1e-5)
    _, processor = load_bundle(final)
    far = processor.normalize_state(np.array([[50.0, -50.0, 0.0, 9.0]], np.float32))
    # clipped to the demos' own range +- 0.5 normalised units; the dropped dim is 0
    np.testing.assert_allclose(far[0], [stats.clip_high[0], stats.clip_low[1], far[0, 2], 0.0], rtol=1e-6)
    assert 1.0 < stats.clip_high[0] < 6.0
    with pytest.raises(ValueError, match="state_noise"):
        train_sft(SFTConfig(dataset=str(tmp_path / "data"), model=_model_section(state_dim=4),
                            output_dir=str(tmp_path / "bad"), steps=1, state_noise=-1.0))


def test_sft_rejects_bad_configs(tmp_path):
    with pytest.raises(ValueError, match="dataset= is required"):
        train_sft(SFTConfig(output_dir=str(tmp_path)))
    with pytest.raises(KeyError, match="unknown config key"):
        compose_and_build_sft(["+stepz=3"])


def compose_and_build_sft(overrides):
    from pirl.config import load_section

    return load_section(SFTConfig, compose("sft", overrides))


def test_every_shipped_experiment_config_is_valid():
    from pirl.train.rl import RLConfig

    names = sorted(p.stem for p in (REPO / "configs" / "experiment").glob("*.yaml"))
    assert "maniskill_pickcube_tiny" in names and "libero_spatial_pi0" in names
    for name in names:
        RLConfig.from_dict(compose("train", [f"experiment={name}", "run.init_checkpoint=x"]))
    with pytest.raises(KeyError, match="unknown config key"):
        RLConfig.from_dict(compose("train", ["+optim.lr=3"]))


@pytest.mark.parametrize("suite", ["10", "goal", "object", "spatial"])
@pytest.mark.parametrize("variant", ["pi0", "pi05"])
def test_libero_experiments_compose_to_the_recipe(suite, variant):
    """configs/experiment/libero_<suite>_<variant>.yaml (composed from experiment/libero/) is exactly the
    recipe each of the eight files spelled out in full before: these group choices and values."""
    sampler = {"pi0": ["sampler.num_steps=4", "sampler.a_noise=0.5"],
               "pi05": ["sampler.num_steps=5", "sampler.a_noise=0.3"]}[variant]
    recipe = [f"env=libero_{suite}", "sampler=flow_sde", "algo=ppo", "cluster=gpu_collocated",
              "run.iterations=300", "run.num_chunks=32", "run.n_exec=5", "run.eval_every=10", "run.eval_episodes=64",
              "+run.camera_map={base_0_rgb: agentview_image, left_wrist_0_rgb: robot0_eye_in_hand_image}",
              f"run.output_dir=runs/libero_{suite}_{variant}", *sampler,
              "optim.policy_lr=5.0e-6", "optim.value_lr=1.0e-4", "optim.minibatch_size=128", "optim.update_epochs=4",
              "optim.trainable=expert", "cluster.num_workers=8", "cluster.envs_per_worker=8"]
    composed = compose("train", [f"experiment=libero_{suite}_{variant}", "run.init_checkpoint=x"])
    assert composed == compose("train", [*recipe, "run.init_checkpoint=x"])


def test_cluster_fields_match_the_rollout_configs():
    """`cluster` fields named as a rollout config's field have its default too, and `rollout_configs` takes them
    by name (one source of truth for placement, learner group and worker pool settings)."""
    import dataclasses

    from pirl.train.rl import ClusterConfig, RLConfig, rollout_configs
    from rollout import LearnerConfig, PlacementConfig, WorkerPoolConfig

    cluster = {f.name: f.default for f in dataclasses.fields(ClusterConfig)}
    shared = 0
    for cls in (PlacementConfig, LearnerConfig, WorkerPoolConfig):
        for f in dataclasses.fields(cls):
            if f.name in cluster:
                shared += 1
                assert cluster[f.name] == f.default, f"cluster.{f.name} default differs from {cls.__name__}"
    assert shared >= 8
    cfg = RLConfig.from_dict(compose("train", ["experiment=libero_goal_pi0", "run.init_checkpoint=x",
                                               "run.seed=7", "+cluster.learner_call_timeout_s=9"]))
    placement, learner, pool = rollout_configs(cfg)
    assert placement == PlacementConfig(mode="collocated", num_learners=8, num_workers=8, learner_cpus=1.0,
                                        worker_cpus=1.0, learner_gpus=0.5, worker_gpus=0.5)
    assert (learner.num_learners, learner.zero_stage, learner.seed, learner.grad_clip, learner.call_timeout_s) == \
        (8, 2, 7, cfg.optim.max_grad_norm, 9.0)
    assert (pool.num_workers, pool.seed, pool.call_timeout_s, pool.worker_cpus) == (8, 7, None, 1.0)


def test_shipped_default_policy_loads_and_acts():
    policy, processor = load_bundle(SHIPPED)
    meta = json.loads((SHIPPED / "config.json").read_text())["metadata"]
    assert meta["sft_step"] > 0 and "sft_config" in meta
    state = np.zeros((2, policy.config.state_width), np.float32)
    chunk = policy.sample_actions(processor({"images": {}, "state": state, "prompt": ["pick up the red cube and move it to the goal position"] * 2}),
                                  num_steps=4)
    actions = processor.unnormalize_actions(chunk)
    assert actions.shape == (2, policy.config.action_horizon, 7) and np.isfinite(actions).all()


@pytest.mark.sim
def test_cli_eval_of_the_shipped_policy(tmp_path, capsys):
    code = main(["eval", f"checkpoint={SHIPPED}", "episodes=2", "num_envs=2", "num_steps=4",
                 "env.max_episode_steps=20", f"output_dir={tmp_path}"])
    assert code == 0
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["episodes"] == 2 and 0.0 <= result["success_rate"] <= 1.0
    assert result["per_episode"][0]["seed"] == 10000 and len(result["success_ci95"]) == 2
    assert "| PickCube-v1 | 10000..10001 | 4 |" in (tmp_path / "results.md").read_text()


def test_cli_usage_and_errors(capsys):
    assert main([]) == 2
    assert "pirl train" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="exactly one of checkpoint=DIR or policy="):
        main(["eval"])  # a checkpoint (or a served policy) is required


_DDP_SCRIPT = '''
import json, sys
import accelerate
from accelerate.utils import gather_object
import pirl.train.sft as sft

captured = {}
class Recording(accelerate.Accelerator):
    def prepare(self, *args):
        out = super().prepare(*args)
        captured["model"], captured["accelerator"] = out[0], self
        return out
accelerate.Accelerator = Recording
cfg = sft.SFTConfig(**json.loads(sys.argv[1]))
sft.train_sft(cfg)
acc = captured["accelerator"]
total = float(sum(p.double().sum() for p in acc.unwrap_model(captured["model"]).parameters()))
sums = gather_object([total])
if acc.is_main_process:
    print("RANK_SUMS", json.dumps({"wrapper": type(captured["model"]).__name__, "sums": sums}))
from pirl.cli import end_rank, leave_process_group  # as `pirl sft` ends: without them a rank can abort at exit
leave_process_group()
end_rank(0)
'''


def test_two_process_sft_keeps_the_ranks_identical(dataset, tmp_path):
    # Data-parallel SFT (torchrun / accelerate launch; gloo on CPU): each rank samples its own batches,
    # so the ranks' weights stay equal only if every gradient is all-reduced through the wrapper.
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_sft.py"
    script.write_text(_DDP_SCRIPT)
    cfg = {"dataset": dataset, "model": _model_section(state_dim=8), "cameras": {"wrist_0_rgb": "wrist"},
           "output_dir": str(tmp_path / "sft"), "steps": 4, "batch_size": 8, "warmup_steps": 0,
           "log_every": 2, "save_every": 1000}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIRL_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           str(script), json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RANK_SUMS"))
    result = json.loads(line.split(" ", 1)[1])
    assert result["wrapper"] == "DistributedDataParallel" and len(result["sums"]) == 2
    assert result["sums"][0] == result["sums"][1], result["sums"]
    assert (tmp_path / "sft" / "final" / "model.safetensors").exists()


def test_two_rank_pirl_sft_command_prints_once_and_exits_zero(dataset, tmp_path):
    """`torchrun -m pirl.cli sft` as a user runs it: both ranks finish and exit 0 (`pirl.cli.end_rank`: a
    rank left to interpreter shutdown can abort in gloo's destructors); the main rank alone prints the
    checkpoint (two ranks printing it interleaved their lines)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "sft"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIRL_PROGRESS": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pirl.cli",
                           "sft", f"dataset={dataset}", "model=tiny", "model.state_dim=8", "+cameras.wrist_0_rgb=wrist",
                           f"output_dir={out}", "steps=2", "batch_size=8", "warmup_steps=0", "save_every=1000"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out / "final") in proc.stdout.splitlines() and proc.stdout.count(str(out / "final")) == 1
    assert (out / "final" / "model.safetensors").exists()


def test_ema_update_matches_its_closed_form():
    from pirl.train.sft import ema_update

    start, target, decay = torch.tensor([1.0, -2.0, 4.0]), torch.tensor([3.0, 0.5, -1.0]), 0.9
    average = [start.clone()]
    for _ in range(7):
        ema_update(average, [target], decay)
    torch.testing.assert_close(average[0], target + decay ** 7 * (start - target))
    with pytest.raises(ValueError, match="ema_decay"):
        ema_update(average, [target], 1.0)


def test_sft_with_ema_writes_the_average_of_the_raw_weights(dataset, tmp_path):
    """Same seed with and without the average: the raw trajectory w1, w2, w3 is the same, and the
    checkpoints of the EMA run must equal d*w0 + (1-d)*w1 and d^3*w0 + (1-d)*(d^2*w1 + d*w2 + w3)."""
    from safetensors.torch import load_file

    common = dict(dataset=dataset, model=_model_section(state_dim=8), cameras={"wrist_0_rgb": "wrist"},
                  batch_size=8, lr=3e-3, warmup_steps=0, log_every=1)
    start = train_sft(SFTConfig(**common, output_dir=str(tmp_path / "start"), steps=1))
    raw_dir, ema_dir, decay = tmp_path / "raw", tmp_path / "ema", 0.5
    train_sft(SFTConfig(**common, init_checkpoint=str(start), output_dir=str(raw_dir), steps=3, save_every=1))
    train_sft(SFTConfig(**common, init_checkpoint=str(start), output_dir=str(ema_dir), steps=3, save_every=1,
                        ema_decay=decay))

    def weights(path):
        return load_file(str(path / "model.safetensors"))

    w0, w1, w2, w3 = (weights(p) for p in (start, raw_dir / "checkpoints" / "step_0000001",
                                         raw_dir / "checkpoints" / "step_0000002", raw_dir / "final"))
    ema1, ema3 = weights(ema_dir / "checkpoints" / "step_0000001"), weights(ema_dir / "final")
    moved = [k for k in w0 if not torch.equal(w0[k], w3[k])]
    assert len(moved) > 10  # the test means something only if training moved the weights
    for key in w0:
        torch.testing.assert_close(ema1[key], decay * w0[key] + (1 - decay) * w1[key], rtol=1e-5, atol=1e-6)
        expected = decay ** 3 * w0[key] + (1 - decay) * (decay ** 2 * w1[key] + decay * w2[key] + w3[key])
        torch.testing.assert_close(ema3[key], expected, rtol=1e-5, atol=1e-6)
    meta = json.loads((ema_dir / "final" / "config.json").read_text())["metadata"]
    assert meta["ema_decay"] == decay
