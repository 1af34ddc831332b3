"""The chunked Q critic of QGF (METHODS.md §5): targets, losses, data windows, training, checkpoints,
the `bind` seam guidance uses, and `pirl collect` on the real simulator."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from envs.dataset import Episode, LeRobotReader, write_lerobot_dataset
from pirl.cli import REPO, main
from pirl.critic.data import NO_NEXT, CriticData, build_critic_data, chunk_windows, step_signals
from pirl.critic.q import (
    ChunkCritic,
    CriticConfig,
    chunk_return_and_discount,
    chunk_td_target,
    expectile_loss,
    load_critic,
    policy_features,
    polyak_update,
)
from pirl.critic.train import CriticTrainConfig, make_optimizer, train_critic, train_step
from pirl.train.common import load_bundle

SHIPPED = REPO / "assets" / "pickcube_tiny_sft_v3"
OTHER_POLICY = REPO / "assets" / "pickcube_tiny_sft"
PROMPT = "pick up the red cube and move it to the goal position"


# -- the math, by hand ----------------------------------------------------------------------------------
def test_chunk_td_target_matches_hand_worked_numbers():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    terminated = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0]], dtype=torch.float32)
    next_value = torch.tensor([10.0, 10.0, 10.0])
    y = chunk_td_target(rewards, terminated, next_value, gamma=0.5)
    # 1 + 0.5*2 + 0.25*3 = 2.75; + 0.125*10 bootstrapped only without a termination.
    assert torch.allclose(y, torch.tensor([4.0, 2.75, 2.75]))
    reward_sum, discount = chunk_return_and_discount(rewards, terminated, 0.5)
    assert torch.allclose(reward_sum, torch.full((3,), 2.75)) and torch.allclose(discount, torch.tensor([0.125, 0, 0]))
    # Negative control: a wrong discount (gamma^(h-1)) would give 2.75 + 0.25*10 = 5.25 for the first.
    assert not torch.isclose(y[0], torch.tensor(5.25))


def test_expectile_loss_hand_numbers_and_its_minimiser():
    diff = torch.tensor([2.0, -1.0])
    assert torch.isclose(expectile_loss(diff, 0.9), torch.tensor((0.9 * 4 + 0.1 * 1) / 2))
    assert torch.isclose(expectile_loss(diff, 0.5), torch.tensor(0.5 * (4 + 1) / 2))  # half the MSE
    # The kappa-expectile of {0, 1} (equal weight) solves kappa (1 - c) = (1 - kappa) c: c = kappa.
    c = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([c], lr=0.5)
    for _ in range(400):
        opt.zero_grad()
        expectile_loss(torch.tensor([0.0, 1.0]) - c, 0.9).backward()
        opt.step()
    assert abs(c.item() - 0.9) < 1e-3  # the plain mean (kappa 0.5) would be 0.5
    with pytest.raises(ValueError, match="kappa"):
        expectile_loss(diff, 1.0)


def test_polyak_update_closed_form():
    online, target = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    t0 = [p.detach().clone() for p in target.parameters()]
    w = [p.detach().clone() for p in online.parameters()]
    for _ in range(7):
        polyak_update(target, online, 0.1)
    for p, a, b in zip(target.parameters(), t0, w):
        assert torch.allclose(p, b + 0.9**7 * (a - b), atol=1e-6)
    polyak_update(target, online, 0.0)  # tau 0: no move
    assert torch.allclose(next(target.parameters()), w[0] + 0.9**7 * (t0[0] - w[0]), atol=1e-6)


# -- windows: crossing an episode end, termination vs truncation ---------------------------------------
def _flags(n, at):
    out = np.zeros(n, bool)
    out[list(at)] = True
    return out


def test_chunk_windows_drop_crossing_chunks_and_bootstrap_truncations_only():
    # Episode 0: rows 0-6, terminates at 6. Episode 1: rows 7-12, truncated, final obs stored.
    # Episode 2: rows 13-18, truncated, no final obs.
    episodes = [(0, 7), (7, 13), (13, 19)]
    term, trunc = _flags(19, [6]), _flags(19, [12, 18])
    start, nxt = chunk_windows(episodes, term, trunc, [False, True, False], horizon=3)
    assert start.tolist() == [0, 1, 2, 3, 4, 7, 8, 9, 10, 13, 14, 15]
    # t=4 ends at the termination (no bootstrap); t=10 at the truncation (episode 1's final obs, -1-1);
    # t=5, 6, 11, 12, 17, 18 cross an end; t=16 ends at a truncation with nothing stored.
    assert nxt.tolist() == [3, 4, 5, 6, NO_NEXT, 10, 11, 12, -2, 16, 17, 18]
    # Negative control: with the final obs of episode 2 stored, its last window comes back.
    start2, nxt2 = chunk_windows(episodes, term, trunc, [False, True, True], horizon=3)
    assert 16 in start2.tolist() and nxt2[start2.tolist().index(16)] == -3
    # An end inside a window (flags mid-episode) drops every window across it.
    s3, _ = chunk_windows([(0, 8)], _flags(8, [2, 7]), _flags(8, []), [False], horizon=3)
    assert s3.tolist() == [0, 3, 4, 5]  # not 1, 2: they cross row 2's end
    # starts="chunks": recorded boundaries, else fixed cuts of h.
    s4, _ = chunk_windows([(0, 7)], term[:7], trunc[:7], [False], 3, chunk_start=_flags(7, [0, 2, 4, 5]),
                          starts="chunks")
    s5, _ = chunk_windows([(0, 7)], term[:7], trunc[:7], [False], 3, starts="chunks")
    assert s4.tolist() == [0, 2, 4] and s5.tolist() == [0, 3]


# -- data from datasets ------------------------------------------------------------------------------
def _rl_episode(rng, length, end, final=True, success_at=None):
    success = np.zeros(length, bool)
    if success_at is not None:
        success[success_at:] = True
    return Episode(prompt=PROMPT, state=rng.normal(size=(length, 42)).astype(np.float32),
                   actions=rng.normal(scale=0.05, size=(length, 7)).astype(np.float32),
                   rewards=np.arange(length, dtype=np.float32) / 10,
                   terminated=_flags(length, [length - 1] if end == "term" else []),
                   truncated=_flags(length, [length - 1] if end == "trunc" else []), step_success=success,
                   chunk_start=np.arange(length) % 5 == 0,
                   final_state=rng.normal(size=42).astype(np.float32) if final else None,
                   success=success_at is not None)


@pytest.fixture(scope="module")
def bundle():
    return load_bundle(SHIPPED)


@pytest.fixture(scope="module")
def rl_dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    episodes = [_rl_episode(rng, 9, "term", success_at=8), _rl_episode(rng, 12, "trunc"),
                _rl_episode(rng, 10, "trunc"), _rl_episode(rng, 11, "term", success_at=10)]
    root = tmp_path_factory.mktemp("critic") / "rl"
    write_lerobot_dataset(str(root), episodes, fps=20)
    return str(root)


def test_step_signals_of_rl_data_and_of_demos(rl_dataset, tmp_path):
    reader = LeRobotReader(rl_dataset)
    r_env, term, trunc = step_signals(reader, "env")
    assert np.allclose(r_env[:9], np.arange(9) / 10) and term[8] and not term[:8].any() and trunc[9 + 11]
    r_succ, _, _ = step_signals(reader, "success")
    assert np.flatnonzero(r_succ).tolist() == [8, 9 + 12 + 10 + 10]  # the first solved step of each success
    # Demos: no reward columns; success at the last frame, terminated there.
    rng = np.random.default_rng(1)
    demos = [Episode(prompt=PROMPT, state=rng.normal(size=(n, 42)), actions=rng.normal(size=(n, 7))) for n in (6, 8)]
    write_lerobot_dataset(str(tmp_path / "demos"), demos, fps=20)
    demo = LeRobotReader(str(tmp_path / "demos"))
    r, term, trunc = step_signals(demo, "success")
    assert np.flatnonzero(r).tolist() == [5, 13] and np.flatnonzero(term).tolist() == [5, 13] and not trunc.any()
    with pytest.raises(ValueError, match="no per-step rewards"):
        step_signals(demo, "env")


def test_critic_data_targets_and_the_bind_seam_agree(bundle, rl_dataset):
    policy, processor = bundle
    data = build_critic_data(policy, processor, [rl_dataset], horizon=5, reward="env", feature_source="expert")
    # Windows: ep0 (9, term) 5; ep1 (12, trunc, final) 8; ep2 (10, trunc, final) 6; ep3 (11, term) 7.
    assert len(data) == 5 + 8 + 6 + 7 and len(data.features) == 42 + 2
    # The truncated episode's last window bootstraps from its final observation (a row after the frames).
    last1 = int(torch.nonzero(data.obs == 9 + 7)[0])
    assert data.next_obs[last1] >= 42 and data.terminated[last1].sum() == 0
    reader = LeRobotReader(rl_dataset)
    final_norm = processor.normalize_state(reader.episode_final_state(1)[None])[0, :42]
    assert np.allclose(data.state[data.next_obs[last1]].numpy(), final_norm, atol=1e-5)
    # The terminal window of episode 0 (t=4): y = sum gamma^i r, no bootstrap.
    term0 = int(torch.nonzero(data.obs == 4)[0])
    y = chunk_td_target(data.rewards[term0:term0 + 1], data.terminated[term0:term0 + 1], torch.tensor([1e6]), 0.9)
    assert torch.isclose(y, torch.tensor([sum(0.9**i * (4 + i) / 10 for i in range(5))]))

    # bind(): features computed from the live observation equal the precomputed ones, and Q agrees.
    torch.manual_seed(0)
    critic = ChunkCritic(CriticConfig(feature_dim=data.features.shape[1], state_dim=42, horizon=5, action_dims=7))
    critic.set_feature_stats(data.features)
    rows = np.array([3, 15])
    obs = {"images": {}, "state": reader.state[rows], "prompt": [PROMPT] * 2}
    prefix = policy.embed_prefix(processor(obs))
    assert torch.allclose(policy_features(policy, prefix, "expert"), data.features[rows], atol=1e-5)
    chunk = torch.from_numpy(processor.normalize_actions(reader.actions[rows[:, None] + np.arange(10)]))  # [2, 10, 8]
    q_fn = critic.bind(policy, prefix)
    expected = critic.q(critic.embed(data.features[rows], data.state[rows]), critic.executed(chunk), target=True)
    assert torch.allclose(q_fn(chunk), expected, atol=1e-5)


def test_q_fn_gradient_lives_on_executed_steps_and_real_dims_only(bundle):
    policy, processor = bundle
    cfg = policy.config
    torch.manual_seed(0)
    critic = ChunkCritic(CriticConfig(feature_dim=cfg.expert.width, state_dim=42, horizon=5, action_dims=7))
    obs = {"images": {}, "state": np.random.default_rng(0).normal(size=(3, 42)).astype(np.float32),
           "prompt": [PROMPT] * 3}
    prefix = policy.embed_prefix(processor(obs))
    q_fn = critic.bind(policy, prefix)
    actions = torch.randn(3, cfg.action_horizon, cfg.action_dim, requires_grad=True)
    with torch.enable_grad():
        q = q_fn(actions)
        (grad,) = torch.autograd.grad(q.sum(), actions)
    assert q.shape == (3,)
    assert (grad[:, :5, :7] != 0).float().mean() > 0.95  # the executed sub-chunk, real dims
    assert (grad[:, 5:] == 0).all() and (grad[:, :, 7:] == 0).all()  # the rest never reaches Q
    # Q is the min over the two target heads, and select() repeats observations without new features.
    emb = q_fn.embedding
    assert torch.allclose(q, critic.q_all(emb, critic.executed(actions), target=True).min(0).values)
    rep = q_fn.select(torch.arange(3).repeat_interleave(2))
    assert torch.allclose(rep(actions.detach().repeat_interleave(2, 0)), q.detach().repeat_interleave(2))
    with pytest.raises(ValueError, match="bound to 3"):
        q_fn(actions[:2])


# -- learning: a toy task with a known best chunk --------------------------------------------------------
def _toy_data(rng, n_obs, per_obs, h=2, d=2, gamma=0.9):
    """One-chunk episodes: obs carries a goal g (state) and distractor features; each step's reward is
    -|a_i - g|. A good chunk stays near g."""
    goals = rng.uniform(-1, 1, size=(n_obs, d)).astype(np.float32)
    feats = rng.normal(size=(n_obs, 4)).astype(np.float32)
    obs = np.repeat(np.arange(n_obs), per_obs)
    actions = (goals[obs][:, None, :] + rng.normal(scale=0.8, size=(len(obs), h, d))).astype(np.float32)
    rewards = -np.linalg.norm(actions - goals[obs][:, None, :], axis=-1).astype(np.float32)
    terminated = np.zeros((len(obs), h), np.float32)
    terminated[:, -1] = 1
    data = CriticData(features=torch.from_numpy(feats), state=torch.from_numpy(goals), obs=torch.from_numpy(obs),
                      next_obs=torch.from_numpy(obs), actions=torch.from_numpy(actions.reshape(len(obs), -1)),
                      rewards=torch.from_numpy(rewards), terminated=torch.from_numpy(terminated),
                      episode=torch.arange(len(obs)))
    returns = (rewards * gamma ** np.arange(h)).sum(-1)
    return data, returns


def _pairwise_accuracy(critic, data, returns, pairs):
    with torch.no_grad():
        q = critic.q(critic.embed(data.features[data.obs], data.state[data.obs]), data.actions, target=True).numpy()
    i, j = pairs
    keep = np.abs(returns[i] - returns[j]) > 0.05  # pairs the true return separates
    return float(np.mean(np.sign(q[i] - q[j])[keep] == np.sign(returns[i] - returns[j])[keep]))


def test_critic_learns_to_rank_good_and_bad_chunks_on_a_toy_task():
    rng = np.random.default_rng(0)
    train, _ = _toy_data(rng, n_obs=256, per_obs=16)
    test, returns = _toy_data(rng, n_obs=64, per_obs=8)
    # Pairs of chunks for the same observation (what guidance / best-of-N compare).
    first = np.repeat(np.arange(64) * 8, 28)
    a, b = np.triu_indices(8, 1)
    pairs = (first + np.tile(a, 64), first + np.tile(b, 64))
    torch.manual_seed(0)
    critic = ChunkCritic(CriticConfig(feature_dim=4, state_dim=2, horizon=2, action_dims=2, hidden=(64, 64)))
    critic.set_feature_stats(train.features)
    untrained = _pairwise_accuracy(critic, test, returns, pairs)
    optimizer = make_optimizer(critic, 3e-3, 0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        train_step(critic, optimizer, train, torch.randint(len(train), (256,), generator=gen), gamma=0.9, kappa=0.9,
                   tau=0.02, grad_clip=10.0)
    trained = _pairwise_accuracy(critic, test, returns, pairs)
    assert untrained < 0.6, untrained  # negative control: a random critic ranks at chance
    assert trained > 0.9, trained
    # V is an upper expectile of Q over the data's chunks: above the mean return of each observation.
    with torch.no_grad():
        v = critic.v(critic.embed(test.features, test.state)).numpy()
    assert np.mean(v > returns.reshape(64, 8).mean(1)) > 0.8


# -- the command: checkpoints, resume, errors -----------------------------------------------------------
def _cfg(data, out, steps, **kw):
    return CriticTrainConfig(checkpoint=str(SHIPPED), data=(data,), out=str(out), steps=steps, batch_size=32,
                             hidden=(32, 32), log_every=10, save_every=10, reward="env", val_fraction=0.25, **kw)


def test_train_resume_and_checkpoint_round_trip(bundle, rl_dataset, tmp_path):
    policy, _ = bundle
    straight = train_critic(_cfg(rl_dataset, tmp_path / "a", 30))
    train_critic(_cfg(rl_dataset, tmp_path / "b", 20))
    resumed = train_critic(_cfg(rl_dataset, tmp_path / "b", 30))  # picks up step_0000020
    a, b = load_critic(straight, policy), load_critic(resumed, policy)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())[-1] == "step_0000030"
    meta = json.loads((straight / "critic.json").read_text())["metadata"]
    assert meta["step"] == 30 and meta["policy_checkpoint"] == str(SHIPPED) and len(meta["policy_ident"]) == 16
    # Round trip: the loaded critic scores like the one in the last checkpoint.
    again = load_critic(straight / "checkpoints" / "step_0000030", policy, policy_checkpoint=SHIPPED)
    emb, chunk = torch.randn(4, a.config.obs_dim), torch.randn(4, a.config.action_in)
    assert torch.equal(a.q_all(emb, chunk), again.q_all(emb, chunk)) and torch.equal(a.v(emb), again.v(emb))
    # Mismatches are one clear error each.
    with pytest.raises(ValueError, match="not on"):
        load_critic(straight, policy, policy_checkpoint=OTHER_POLICY)
    with pytest.raises(ValueError, match="holds a critic of"):
        train_critic(dataclasses_replace(_cfg(rl_dataset, tmp_path / "a", 40), checkpoint=str(OTHER_POLICY)))
    (straight / "critic.safetensors").write_bytes((straight / "critic.safetensors").read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(ValueError, match="does not match critic.json"):
        load_critic(straight, policy)


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(SystemExit, match="pirl critic: no dataset at"):
        main(["critic", f"checkpoint={SHIPPED}", f"data={tmp_path / 'nowhere'}", f"out={tmp_path / 'c'}"])
    with pytest.raises(SystemExit, match="no policy checkpoint"):
        main(["critic", f"checkpoint={tmp_path / 'nope'}", f"data={tmp_path}", f"out={tmp_path / 'c'}"])
    with pytest.raises(SystemExit, match="state/action dims"):
        demo = [Episode(prompt=PROMPT, state=np.zeros((6, 9)), actions=np.zeros((6, 7)))]
        write_lerobot_dataset(str(tmp_path / "small"), demo, fps=20)
        main(["critic", f"checkpoint={SHIPPED}", f"data={tmp_path / 'small'}", f"out={tmp_path / 'c'}"])
    with pytest.raises(SystemExit, match="not set"):
        main(["collect", "episodes=1"])


# -- data parallel: two CPU processes over gloo ---------------------------------------------------------
_DDP_SCRIPT = '''
import hashlib, json, sys
import accelerate
from accelerate.utils import gather_object
import pirl.critic.train as train

seen = {}
class Recording(accelerate.Accelerator):
    def prepare(self, *args):
        seen["loss_fn"], seen["accelerator"] = super().prepare(*args), self
        return seen["loss_fn"]
accelerate.Accelerator = Recording
build = train.build_critic_data
def recording_build(*args, **kw):
    seen["data"] = build(*args, **kw)
    return seen["data"]
train.build_critic_data = recording_build
train.train_critic(train.CriticTrainConfig(**json.loads(sys.argv[1])))

def digest(tensors):
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()
acc, data = seen["accelerator"], seen["data"]
critic = acc.unwrap_model(seen["loss_fn"]).critic
ranks = gather_object([{"features": digest([data.features, data.state]),
                        "weights": digest(critic.state_dict().values())}])
if acc.is_main_process:
    print("RANKS", json.dumps({"wrapper": type(seen["loss_fn"]).__name__, "ranks": ranks}), flush=True)
from pirl.cli import end_rank, leave_process_group  # as `pirl critic` ends: a rank can abort at exit
leave_process_group()
end_rank(0)
'''


def _digest(tensors):
    import hashlib

    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_two_process_critic_shares_the_features_and_keeps_the_ranks_identical(bundle, rl_dataset, tmp_path):
    # torchrun / accelerate launch, gloo on CPU. 4 feature batches (16, 16, 10 frames; 2 final states):
    # rank 0 computes the first two, rank 1 the others; every rank must then hold the single-process
    # table, in order. Each rank draws its own minibatches, so the two critics stay equal only if the
    # gradients are all-reduced through the DDP wrapper.
    import os
    import subprocess
    import sys

    script, out = tmp_path / "ddp_critic.py", tmp_path / "critic"
    script.write_text(_DDP_SCRIPT)
    cfg = {"checkpoint": str(SHIPPED), "data": [rl_dataset], "out": str(out), "steps": 20, "batch_size": 32,
           "hidden": [32, 32], "log_every": 10, "save_every": 10, "reward": "env", "val_fraction": 0.25,
           "feature_source": "expert", "feature_batch": 16}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIRL_PROGRESS": "0"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script), json.dumps(cfg)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RANKS")).split(" ", 1)[1])
    ranks = result["ranks"]

    policy, processor = bundle
    single = build_critic_data(policy, processor, [rl_dataset], horizon=5, reward="env", feature_source="expert",
                               batch_size=16)
    assert [r["features"] for r in ranks] == [_digest([single.features, single.state])] * 2
    cached = torch.load(out / "features.pt", weights_only=True)  # written once, by the main process
    assert torch.equal(cached["features"], single.features) and torch.equal(cached["state"], single.state)

    assert result["wrapper"] == "DistributedDataParallel"
    assert ranks[0]["weights"] == ranks[1]["weights"]
    state = torch.load(out / "checkpoints" / "step_0000010" / "train_state.pt", weights_only=False)
    assert len(state["generators"]) == 2 and not torch.equal(*state["generators"])  # different minibatches
    critic = load_critic(out, policy, policy_checkpoint=SHIPPED)
    assert _digest(critic.state_dict().values()) == ranks[0]["weights"]
    assert json.loads((out / "critic.json").read_text())["metadata"]["processes"] == 2


# -- the real simulator ---------------------------------------------------------------------------------
@pytest.mark.sim
def test_collect_on_pickcube_writes_a_dataset_the_critic_trains_on(tmp_path, capsys):
    out = tmp_path / "rollouts"
    code = main(["collect", f"checkpoint={SHIPPED}", "episodes=2", "num_envs=2", f"out={out}",
                 "env.max_episode_steps=15", "seed=3", "sampler.explore_std=[0.05]", "sampler.mask_low=-1"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["episodes"] == 2
    reader = LeRobotReader(str(out))
    assert len(reader.episodes) == 2 and reader.actions.shape[1] == 7 and reader.state.shape[1] == 42
    assert [reader.episode_meta[e]["seed"] for e in (0, 1)] == [3, 4]
    term, trunc = reader.column("next.terminated", bool), reader.column("next.truncated", bool)
    for ep in reader.episodes:  # each episode ends exactly once, at its last step
        ends = np.flatnonzero((term | trunc)[ep["from"]:ep["to"]])
        assert ends.tolist() == [ep["length"] - 1]
        starts = np.flatnonzero(reader.column("chunk_start", bool)[ep["from"]:ep["to"]])
        assert starts.tolist() == list(range(0, ep["length"], 5))
        if trunc[ep["to"] - 1]:
            assert reader.episode_final_state(ep["episode_index"]).shape == (42,)
    assert np.isfinite(reader.column("next.reward", np.float32)).all()
    critic_dir = train_critic(CriticTrainConfig(checkpoint=str(SHIPPED), data=(str(out),), out=str(tmp_path / "c"),
                                                steps=5, batch_size=16, reward="env", log_every=5))
    assert (critic_dir / "critic.safetensors").exists()
