"""collect_rollout pipelined over env groups (rl_core): the model samples one group's next chunk while
the other group's worker processes step.

The toy env runs in two worker processes of three envs (`envs_per_process`), with 7-step episodes
and 5-step chunks, so episodes end inside chunks and auto-reset. The toy's states and episode ends
depend only on each env's episode seeds, not on the actions: a rollout's observations, dones and
executed steps are the same with and without pipelining, although its noise (hence actions and
rewards) differs. That, and the rollout rebuilt group by group with the unpipelined loop, is what
would catch envs, seeds or bootstrap values mixed up between groups.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from envs import make_env
from pirl.train.batch import TrajectoryBatch
from pirl.train.rl import build_agent, processor_for
from pirl.train.rl_core import SamplerConfig, collect_rollout, group_generators, pipeline_groups, select_obs

ROOT = Path(__file__).resolve().parents[1]
POLICY = str(ROOT / "assets" / "pickcube_tiny_sft")
ENV = {**yaml.safe_load((ROOT / "configs" / "env" / "toy.yaml").read_text()), "num_envs": 6, "seed": 0,
       "episode_steps": 7, "envs_per_process": 3}
CHUNKS, N_EXEC, SEED = 4, 5, 123
SAMPLER = SamplerConfig()


@pytest.fixture(scope="module")
def model():
    agent = build_agent(POLICY, SAMPLER, "expert")
    last = agent.value_head.mlp[-1]  # a fresh head says V = 0 everywhere: give values to tell apart
    torch.nn.init.normal_(last.weight, generator=torch.Generator().manual_seed(0))
    return agent, processor_for(POLICY, {})


@pytest.fixture(scope="module")
def env():
    with make_env(ENV) as env:
        yield env


def _rollout(model, env, pipeline=True, seed=SEED) -> TrajectoryBatch:
    agent, processor = model
    obs = env.reset(seed)
    return collect_rollout(agent, processor, env, obs, CHUNKS, N_EXEC, SAMPLER, torch.Generator().manual_seed(seed),
                           pipeline=pipeline)[0]


class _GroupEnv:
    """Envs `indices` of a VLAEnv as a ChunkEnv of their own, stepped alone (the reference)."""

    def __init__(self, env, indices):
        self.env, self.indices, self.num_envs = env, indices, len(indices)

    def step_groups(self):
        return [list(range(self.num_envs))]

    def step_chunk(self, actions, n_exec=None):
        return self.env.finish_chunk(self.env.begin_chunk(self.indices, actions, n_exec))


def _fields(batch: TrajectoryBatch) -> dict:
    """Every tensor of a batch by name (inputs and chain field by field), and its other fields."""
    out = {}
    for f in dataclasses.fields(batch):
        value = getattr(batch, f.name)
        if dataclasses.is_dataclass(value):
            out.update({f"{f.name}.{g.name}": getattr(value, g.name) for g in dataclasses.fields(value)
                        if isinstance(getattr(value, g.name), torch.Tensor)})
        else:
            out[f.name] = value
    return out


def _assert_same(a: TrajectoryBatch, b: TrajectoryBatch, episodes_in_order: bool = True) -> None:
    fa, fb = _fields(a), _fields(b)
    assert fa.keys() == fb.keys()
    for name in fa:
        x, y = fa[name], fb[name]
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), name
        elif name.startswith("episode_") and not episodes_in_order:
            assert sorted(x) == sorted(y), name
        else:
            assert x == y, name


def test_pipeline_groups_are_two_halves_of_consecutive_processes():
    assert pipeline_groups([[0, 1, 2]], 3) is None  # one process: nothing to overlap
    assert pipeline_groups([[0, 1], [2, 3]], 4) == [[0, 1], [2, 3]]
    assert pipeline_groups([[0, 1], [2, 3], [4]], 5) == [[0, 1], [2, 3, 4]]
    assert pipeline_groups([[i] for i in range(16)], 16) == [list(range(8)), list(range(8, 16))]
    assert pipeline_groups([[2, 3], [0, 1]], 4) is None  # rows would leave env order


def test_pipelined_rollout_is_reproducible_and_equals_its_groups_rolled_out_alone(model, env):
    assert env.step_groups() == [[0, 1, 2], [3, 4, 5]]
    batch = _rollout(model, env)
    _assert_same(batch, _rollout(model, env))
    assert batch.rewards.shape == (CHUNKS, 6) and batch.inputs.batch_size == CHUNKS * 6
    assert batch.terminated.any() and not batch.terminated.all()  # episodes end inside the rollout

    # The reference: each group alone through the unpipelined loop, with the group's generator,
    # joined along the env axis by TrajectoryBatch.cat_envs (as the workers of a Ray pool are).
    agent, processor = model
    obs = env.reset(SEED)
    generators = group_generators(torch.Generator().manual_seed(SEED), 2)
    parts = [collect_rollout(agent, processor, _GroupEnv(env, group), select_obs(obs, group), CHUNKS, N_EXEC,
                             SAMPLER, generator)[0]
             for group, generator in zip(env.step_groups(), generators)]
    # cat_envs lists the finished episodes group by group; the rollout lists them chunk by chunk.
    _assert_same(batch, TrajectoryBatch.cat_envs(parts), episodes_in_order=False)

    # Unpipelined, the noise differs, but what only the env seeds decide does not.
    plain = _rollout(model, env, pipeline=False)
    assert not torch.equal(plain.chain.latents, batch.chain.latents)
    for name in ("terminated", "truncated", "mask_exec"):
        assert torch.equal(getattr(plain, name), getattr(batch, name)), name
    assert (plain.episode_lengths, plain.env_steps) == (batch.episode_lengths, batch.env_steps)
    assert torch.equal(plain.inputs.state, batch.inputs.state)  # the same envs, seeds and order


def test_a_worker_killed_during_a_pipelined_rollout_truncates_its_envs_only(model, env, monkeypatch):
    """Worker 1 (envs 3-5) is killed just before its third chunk is sent: that chunk executes
    nothing, its envs end truncated with V(final obs) to bootstrap from, the process is rebuilt and
    their next episodes start; envs 0-2 roll out exactly as without the crash."""
    intact = _rollout(model, env)
    pool, begin, calls = env.backend.pool, env.begin_chunk, []

    def begin_and_kill(indices, actions, n_exec=None):
        calls.append(list(indices))
        if list(indices) == [3, 4, 5] and calls.count([3, 4, 5]) == 3:
            pool.kill_worker(3)
        return begin(indices, actions, n_exec)

    restarts, crashes = list(pool.restart_counts), len(env.crash_log)
    monkeypatch.setattr(env, "begin_chunk", begin_and_kill)
    batch = _rollout(model, env)
    monkeypatch.undo()
    assert env.crash_log[crashes:] == [3, 4, 5]
    assert [b - a for a, b in zip(restarts, pool.restart_counts)] == [0, 0, 0, 1, 1, 1]
    assert batch.truncated[2].tolist() == [False] * 3 + [True] * 3 and not batch.terminated[2, 3:].any()
    # Nothing executed: the final obs is the chunk's own obs, so the bootstrap value is its value.
    torch.testing.assert_close(batch.truncated_values[2, 3:], batch.values[2, 3:])
    assert batch.truncated_values[2, 3:].abs().min() > 0 and batch.rewards[2, 3:].eq(0).all()
    assert batch.env_steps == intact.env_steps - 3 * 2  # envs 3-5 ran 5+2+0+5 steps, not 5+2+5+2
    for name in ("rewards", "terminated", "truncated", "values", "truncated_values"):
        x, y = getattr(batch, name), getattr(intact, name)
        assert torch.equal(x[:, :3], y[:, :3]) and torch.equal(x[:2], y[:2]), name
    assert torch.equal(batch.chain.latents.view(CHUNKS, 6, -1)[:, :3], intact.chain.latents.view(CHUNKS, 6, -1)[:, :3])
    # The rebuilt envs went on with their third episode (seed + 2 * num_envs) at chunk 3.
    assert not batch.truncated[3].any()
    with make_env({**ENV, "envs_per_process": None}) as plain:
        first = plain.reset([SEED + i + 2 * 6 for i in range(6)])
    expected = model[1](first).state[3:]
    torch.testing.assert_close(batch.inputs.state.view(CHUNKS, 6, -1)[3, 3:], expected, rtol=0, atol=0)


def test_a_rollout_stopped_by_an_error_leaves_no_answer_unread(model, env, monkeypatch):
    finish, calls = env.finish_chunk, []

    def finish_or_fail(pending):
        calls.append(1)
        if len(calls) == 3:  # group 0's second chunk; group 1's is in flight
            raise RuntimeError("stopped")
        return finish(pending)

    monkeypatch.setattr(env, "finish_chunk", finish_or_fail)
    with pytest.raises(RuntimeError, match="stopped"):
        _rollout(model, env)
    monkeypatch.undo()
    assert not env.backend.pool._awaiting
    with pytest.raises(RuntimeError, match="reset"):
        env.step_chunk(np.zeros((6, 5, 7), np.float32))
    _assert_same(_rollout(model, env), _rollout(model, env))
