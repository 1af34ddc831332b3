"""The pieces of one RL iteration, as functions of (agent, data, config): no processes, no placement.

    collect_rollout   envs + policy copy -> TrajectoryBatch            (runs in a rollout worker;
                      pipelined over env groups when the envs live in several processes)
    compute_advantages  GAE (PPO) or group-relative success (GRPO)     (METHODS.md §4)
    ppo_update        PPO epochs over minibatches on one learner       (METHODS.md §2-4)
    evaluate          ODE sampling, fixed seeds -> success table

`pirl.train.rl` places these on Ray workers and DeepSpeed learners; tests call them directly. The env
and the learner's step they take are typed in `pirl.train.protocols` (`ChunkEnv`, `TrainStep`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from pirl.algos.config import GAEConfig, GRPOConfig, PPOConfig, ValueLossConfig
from pirl.algos.gae import gae
from pirl.algos.grpo import grpo_advantages, grpo_filter
from pirl.algos.ppo import approx_kl_early_stop, ppo_policy_loss, value_loss
from pirl.algos.stats import explained_variance, wilson_interval
from pirl.critic.value import ValueHead
from pirl.flow.chain import Chain
from pirl.flow.grid import DenoiseGrid
from pirl.flow.likelihood import LogProbReduction, element_mask, reduce_chain_log_prob
from pirl.flow.masks import step_index_range
from pirl.flow.noise_head import NoiseHead
from pirl.flow.policy import chain_log_prob, sample_chain
from pirl.flow.steps import FixedNoiseRule, LearnedNoiseRule, SDERule
from pirl.train.batch import TrajectoryBatch, stack_inputs
from pirl.train.logger import progress_bar
from pirl.train.protocols import ChunkEnv, TrainStep
from vla.inputs import ModelInputs
from vla.policy import FlowPolicy
from vla.normalize import NormStats, raw_to_normalized_std
from vla.processor import Processor


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How the flow policy is made stochastic for RL (METHODS.md §2-3)."""

    kind: Literal["flow_sde", "flow_noise"] = "flow_sde"
    """Flow-SDE (ODE -> SDE with the same marginals) or Flow-Noise (a learned noise head)."""
    num_steps: int = 4
    """K denoising steps during RL (πRL: 4 for π0, 3-5 for π0.5); evaluation uses the same K."""
    a_noise: float = 0.5
    """Flow-SDE noise level (RLinf 0.5; 0.3 for some π0.5 LIBERO suites), in normalised action units:
    how far that moves the robot depends on each dim's demo std (METHODS.md §2)."""
    explore_std: tuple[float, ...] = ()
    """Exploration in the env's units: every stochastic step is the Euler step plus Gaussian noise of
    this std in the env's raw action units, one value for all dims or one per action dim
    (pd_ee_delta_pose: 1.0 = 0.1 m or 0.1 rad per step, so 0.05 is 5 mm per step). Converted per dim
    through the policy's norm stats; replaces a_noise's schedule (and its drift correction, see
    `pirl.flow.steps.FixedNoiseRule`). With `mask_low=-1` the executed action is the ODE action plus
    exactly this noise. Empty = a_noise (πRL)."""
    mask: Literal["hybrid", "window", "all"] = "hybrid"
    """Which denoising steps are stochastic: one per sample (πRL's hybrid), a window, or all."""
    mask_low: int = 0
    mask_high: int | None = None
    """Hybrid/window indices are drawn uniformly from [mask_low, mask_high) (None = K; negative values
    count from the end). `mask_low=-1` puts the one stochastic step last: with a near-deterministic SFT
    policy, noise injected earlier is mostly denoised away again, so only last-step noise moves the
    executed action (bench/results/noise_propagation.md)."""
    window: int = 1
    noise_std_min: float = 0.08
    noise_std_max: float = 0.16
    """Flow-Noise std bounds (πRL: 0.08-0.16, normalised units)."""
    noise_bounds_units: Literal["normalized", "raw"] = "normalized"
    """Units of noise_std_min / max: normalised (πRL), or the env's raw action units (converted per dim)."""
    log_prob_granularity: Literal["chunk", "action", "element"] = "chunk"
    """One PPO ratio per chunk, per action step, or per element (advantage broadcast; METHODS.md §4).
    A chunk ratio multiplies the ratios of all its n_exec x D elements, so the clip stops the update
    once the mean has moved by about clip/sqrt(n_exec*D) noise stds; per element it moves ~sqrt(35)x
    further per iteration for a 5x7 sub-chunk."""
    log_prob_reduce: Literal["sum", "mean"] = "sum"
    """Sum (exact log-likelihood) or mean over executed steps x real dims (RLinf-style scaling)."""
    include_initial: bool = False
    """Flow-Noise: add log N(x_0; 0, I) to the chain log-likelihood (it cancels in the ratio)."""
    step_reduce: Literal["sum", "mean"] = "sum"
    """Across stochastic steps: sum (joint likelihood) or mean (RLinf averages over K+1 terms)."""

    def __post_init__(self) -> None:
        if self.kind not in ("flow_sde", "flow_noise"):
            raise ValueError(f"sampler.kind must be flow_sde or flow_noise, got {self.kind!r}")
        if self.num_steps < 1:
            raise ValueError("sampler.num_steps must be >= 1")
        if any(not s > 0 for s in self.explore_std):
            raise ValueError(f"sampler.explore_std must be positive, got {list(self.explore_std)}")
        if self.explore_std and self.kind != "flow_sde":
            raise ValueError("sampler.explore_std is a Flow-SDE setting; Flow-Noise uses noise_std_min / max "
                             "with noise_bounds_units=raw")
        if self.noise_bounds_units not in ("normalized", "raw"):
            raise ValueError(f"sampler.noise_bounds_units must be normalized or raw, got {self.noise_bounds_units!r}")
        if self.mask in ("hybrid", "window"):
            width = self.window if self.mask == "window" else 1
            try:
                step_index_range(self.num_steps, self.mask_low, self.mask_high, width)
            except ValueError as err:
                raise ValueError(f"sampler.mask_low / mask_high / window: {err}") from None

    @property
    def reduction(self) -> LogProbReduction:
        return LogProbReduction(reduce=self.log_prob_reduce, granularity=self.log_prob_granularity,
                                include_initial=self.include_initial, step_reduce=self.step_reduce)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """PPO update: epochs, minibatches, learning rates, loss weights (METHODS.md §4)."""

    update_epochs: int = 4
    minibatch_size: int = 128
    policy_lr: float = 5e-6
    """πRL LIBERO: 5e-6 for the action expert (the tiny CPU default uses much more)."""
    value_lr: float = 1e-4
    noise_head_lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    max_grad_norm: float = 1.0
    value_coef: float = 1.0
    entropy_coef: float = 0.005
    """Entropy bonus of the noise head (Flow-Noise only; Flow-SDE stds are fixed)."""
    trainable: str = "expert"
    """"expert" (πRL: VLM frozen; expert, projections, heads) or "all"."""
    lr_schedule: str = "constant"
    """"constant", or "linear": every learning rate falls linearly from its value at iteration 0 to
    `lr_final_fraction` of it at the last iteration (CleanRL's annealing), so late iterations refine
    the policy instead of moving it as far as early ones."""
    lr_final_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.lr_schedule not in ("constant", "linear"):
            raise ValueError(f"optim.lr_schedule must be constant or linear, got {self.lr_schedule!r}")
        if not 0.0 <= self.lr_final_fraction <= 1.0:
            raise ValueError(f"optim.lr_final_fraction must be in [0, 1], got {self.lr_final_fraction}")

    def lr_scale(self, iteration: int, iterations: int) -> float:
        """The factor on every base learning rate at `iteration` of `iterations` (0-based): 1 at the
        first, `lr_final_fraction` at the last."""
        if self.lr_schedule == "constant" or iterations <= 1:
            return 1.0
        progress = min(max(iteration, 0), iterations - 1) / (iterations - 1)
        return 1.0 - (1.0 - self.lr_final_fraction) * progress


def raw_std_to_policy_units(raw_std: float | tuple[float, ...], action_stats: NormStats | None, action_dim: int) -> Tensor:
    """A std in the env's raw action units (one value or one per real dim) -> normalised units per padded
    dim [D] (METHODS.md §2). Padded dims, which nothing executes, get the smallest real dim's value."""
    if action_stats is None:
        raise ValueError("a std in raw action units needs the policy's action norm stats")
    std = raw_to_normalized_std(raw_std, action_stats)
    out = torch.full((action_dim,), float(std.min()))
    out[: len(std)] = torch.as_tensor(std, dtype=torch.float32)
    return out


class Agent(nn.Module):
    """Everything a learner trains and a rollout worker runs: policy, value head, noise head.

    `explore_std` [D]: the per-dim step std in normalised units when the sampler sets it in raw units
    (`sampler.explore_std`, a `FixedNoiseRule`), else None (a_noise's schedule).
    """

    def __init__(self, policy: FlowPolicy, value_head: ValueHead, noise_head: NoiseHead | None = None,
                 explore_std: Tensor | None = None):
        super().__init__()
        self.policy = policy
        self.value_head = value_head
        self.noise_head = noise_head
        self.explore_std = explore_std

    @classmethod
    def build(cls, policy: FlowPolicy, sampler: SamplerConfig, action_stats: NormStats | None = None) -> "Agent":
        cfg = policy.config
        noise_head = None
        if sampler.kind == "flow_noise":
            bounds = (sampler.noise_std_min, sampler.noise_std_max)
            if sampler.noise_bounds_units == "raw":
                bounds = tuple(raw_std_to_policy_units(b, action_stats, cfg.action_dim) for b in bounds)
            noise_head = NoiseHead(cfg.action_dim, hidden_dim=cfg.expert.width, std_min=bounds[0], std_max=bounds[1])
        explore_std = None
        if sampler.explore_std:
            explore_std = raw_std_to_policy_units(sampler.explore_std, action_stats, cfg.action_dim)
        return cls(policy, ValueHead.for_policy(policy), noise_head, explore_std)

    def rule(self, sampler: SamplerConfig):
        if sampler.kind == "flow_noise":
            assert self.noise_head is not None
            return LearnedNoiseRule(self.noise_head)
        if self.explore_std is not None:
            return FixedNoiseRule(self.explore_std)
        return SDERule(sampler.a_noise)


def mask_exec(horizon: int, n_exec: int) -> Tensor:
    return torch.arange(horizon) < n_exec


@torch.no_grad()
def act(agent: Agent, processor: Processor, obs: dict, sampler: SamplerConfig, generator: torch.Generator,
        deterministic: bool = False):
    """One chunk for a batch of observations: (inputs, chain, value [B], env actions [B, H, d])."""
    inputs = processor(obs).to(next(agent.parameters()).device)
    prefix = agent.policy.embed_prefix(inputs)
    grid = DenoiseGrid.uniform(sampler.num_steps)
    chain = sample_chain(
        agent.policy, prefix=prefix, rule=agent.rule(sampler), grid=grid,
        step_mask="none" if deterministic else sampler.mask, mask_low=sampler.mask_low,
        mask_high=sampler.mask_high, window=sampler.window, generator=generator,
    )
    value = agent.value_head.value(agent.policy, prefix)
    return inputs, chain, value, processor.unnormalize_actions(chain.actions)


@torch.no_grad()
def state_value(agent: Agent, processor: Processor, obs: dict) -> Tensor:
    """V(obs) for bootstrapping: prefix and value head only."""
    inputs = processor(obs).to(next(agent.parameters()).device)
    return agent.value_head.value(agent.policy, agent.policy.embed_prefix(inputs))


def collect_rollout(agent: Agent, processor: Processor, env: ChunkEnv, obs: dict, num_chunks: int, n_exec: int,
                    sampler: SamplerConfig, generator: torch.Generator, weight_version: int = 0,
                    pipeline: bool = True):
    """Steps `env` for `num_chunks` chunks from `obs`; returns (TrajectoryBatch, next obs).

    Truncated episodes get V(final obs) for bootstrapping; terminated ones bootstrap nothing.

    With `pipeline` and an env whose envs live in >= 2 worker processes (`pipeline_groups`), the envs
    are split in two groups and the model computes one group's next chunk while the other group's
    processes step, instead of leaving every process idle while it runs (bench/rl_throughput.py, layout pipe).
    Each group draws its noise from its own generator, seeded from `generator`, so the batch is as
    reproducible as without pipelining (the same seeds give the same batch) but its noise differs
    from the unpipelined rollout's; env seeds, env order and everything else are as without it.
    Without `pipeline`, or with one group, every chunk is computed for all envs at once.
    """
    agent.eval()
    cfg = agent.policy.config
    if not 1 <= n_exec <= cfg.action_horizon:
        raise ValueError(f"n_exec must be in [1, {cfg.action_horizon}], got {n_exec}")
    groups = pipeline_groups(env.step_groups(), env.num_envs) if pipeline else None
    if groups is None:
        steps = []
        for _ in range(num_chunks):
            inputs, chain, value, actions = act(agent, processor, obs, sampler, generator)
            outcome = env.step_chunk(actions[:, :n_exec], n_exec)
            obs = outcome[0]
            steps.append(_chunk_step(agent, processor, (inputs, chain, value), outcome))
        last_value = state_value(agent, processor, obs).float().cpu()
    else:
        steps, last_value, obs = _collect_pipelined(agent, processor, env, obs, groups, num_chunks, n_exec,
                                                    sampler, group_generators(generator, len(groups)))
    batch = TrajectoryBatch(
        inputs=stack_inputs([s.inputs for s in steps]), chain=Chain.cat([s.chain for s in steps]),
        rewards=torch.stack([s.reward for s in steps]), terminated=torch.stack([s.terminated for s in steps]),
        truncated=torch.stack([s.truncated for s in steps]), values=torch.stack([s.value for s in steps]),
        truncated_values=torch.stack([s.truncated_value for s in steps]), last_value=last_value,
        success=torch.stack([s.success for s in steps]),
        episode_returns=[e[0] for s in steps for e in s.episodes],
        episode_lengths=[e[1] for s in steps for e in s.episodes],
        episode_success=[e[2] for s in steps for e in s.episodes],
        env_steps=sum(s.env_steps for s in steps), weight_version=weight_version,
        mask_exec=mask_exec(cfg.action_horizon, n_exec), mask_dims=processor.dim_mask(),
    )
    return batch, obs


@dataclasses.dataclass
class _ChunkStep:
    """One chunk of a batch of envs, as the TrajectoryBatch keeps it (CPU tensors, one row per env)."""

    inputs: ModelInputs  # [B]
    chain: Chain  # [B]
    reward: Tensor  # [B]
    terminated: Tensor  # [B] bool
    truncated: Tensor  # [B] bool
    value: Tensor  # [B]
    truncated_value: Tensor  # [B]: V(final obs) where truncated, else 0
    success: Tensor  # [B] bool, success_once
    env_steps: int
    episodes: list[tuple[float, int, bool]]  # (return, length, success_once) per episode ended, by env

    @staticmethod
    def cat(parts: list[_ChunkStep]) -> _ChunkStep:
        """The same chunk of consecutive env groups, joined in group order."""
        cat = lambda name: torch.cat([getattr(p, name) for p in parts])  # noqa: E731
        return _ChunkStep(inputs=stack_inputs([p.inputs for p in parts]), chain=Chain.cat([p.chain for p in parts]),
                          reward=cat("reward"), terminated=cat("terminated"), truncated=cat("truncated"),
                          value=cat("value"), truncated_value=cat("truncated_value"), success=cat("success"),
                          env_steps=sum(p.env_steps for p in parts), episodes=[e for p in parts for e in p.episodes])


def select_obs(obs: dict, rows) -> dict:
    """Rows `rows` (indices) of a batched observation."""
    return {"images": {k: np.asarray(v)[rows] for k, v in obs["images"].items()},
            "state": np.asarray(obs["state"])[rows], "prompt": [obs["prompt"][i] for i in rows]}


def cat_obs(parts: list[dict]) -> dict:
    """Batched observations one after the other (the inverse of splitting a batch into groups)."""
    return {"images": {k: np.concatenate([p["images"][k] for p in parts]) for k in parts[0]["images"]},
            "state": np.concatenate([p["state"] for p in parts]), "prompt": [x for p in parts for x in p["prompt"]]}


def _chunk_step(agent: Agent, processor: Processor, sampled: tuple, outcome: tuple) -> _ChunkStep:
    """What one chunk leaves in the batch: `sampled` = act's (inputs, chain, value), `outcome` = the
    env's step_chunk; truncated envs get V(final obs) to bootstrap from."""
    inputs, chain, value = sampled
    _, reward, terminated, truncated, info = outcome
    terminated, truncated = np.asarray(terminated, bool), np.asarray(truncated, bool)
    tv = torch.zeros(len(reward))
    cut = np.flatnonzero(truncated & ~terminated)
    if len(cut):
        tv[torch.from_numpy(cut)] = state_value(agent, processor, select_obs(info["final_obs"], cut)).cpu()
    ended = np.flatnonzero(terminated | truncated)
    return _ChunkStep(
        inputs=inputs.to("cpu"), chain=chain.to("cpu"), reward=torch.as_tensor(np.asarray(reward), dtype=torch.float32),
        terminated=torch.from_numpy(terminated), truncated=torch.from_numpy(truncated), value=value.float().cpu(),
        truncated_value=tv, success=torch.as_tensor(np.asarray(info["success_once"]), dtype=torch.bool),
        env_steps=int(np.sum(info["exec_mask"])),
        episodes=[(float(info["episode_return"][i]), int(info["episode_length"][i]), bool(info["success_once"][i]))
                  for i in ended])


def pipeline_groups(process_groups: list[list[int]], num_envs: int) -> list[list[int]] | None:
    """The env groups of a pipelined rollout: the worker processes (`env.step_groups()`) in two
    halves of consecutive processes, as even in envs as they allow; None (no pipelining) for one
    process, or for groups that are not consecutive runs of the batch (its rows keep env order).

    Two groups, not one per process: one hides the model behind the other's env steps, and more
    would only shrink the model's batches (LIBERO runs one process per env: 16 model calls of one
    row per chunk)."""
    if len(process_groups) < 2 or [i for g in process_groups for i in g] != list(range(num_envs)):
        return None
    sizes = np.cumsum([len(g) for g in process_groups])
    split = 1 + int(np.argmin([max(s, num_envs - s) for s in sizes[:-1]]))
    return [[i for g in process_groups[:split] for i in g], [i for g in process_groups[split:] for i in g]]


def group_generators(generator: torch.Generator, num_groups: int) -> list[torch.Generator]:
    """One noise generator per env group of a pipelined rollout, seeded from `generator`: a group's
    noise is the same whatever order the groups' chunks are computed in."""
    seeds = torch.randint(0, 2**62, (num_groups,), generator=generator)
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def _collect_pipelined(agent: Agent, processor: Processor, env: ChunkEnv, obs: dict, groups: list[list[int]],
                       num_chunks: int, n_exec: int, sampler: SamplerConfig, generators: list[torch.Generator]):
    """collect_rollout's loop with one chunk in flight per env group: as soon as a group's chunk is
    back, its next one is sampled and sent, then the finished one is recorded; the other group's
    processes step meanwhile. Returns (chunk steps over all envs, last value [B], next obs)."""
    group_obs = [select_obs(obs, g) for g in groups]
    steps: list[list[_ChunkStep]] = [[] for _ in groups]
    sampled: list[tuple] = [()] * len(groups)
    in_flight: dict[int, Any] = {}

    def launch(g: int) -> None:
        inputs, chain, value, actions = act(agent, processor, group_obs[g], sampler, generators[g])
        sampled[g] = (inputs, chain, value)
        in_flight[g] = env.begin_chunk(groups[g], actions[:, :n_exec], n_exec)

    try:
        for g in range(len(groups)):
            launch(g)
        for t in range(num_chunks):
            for g in range(len(groups)):
                outcome, done_sampled = env.finish_chunk(in_flight[g]), sampled[g]
                del in_flight[g]
                group_obs[g] = outcome[0]
                if t + 1 < num_chunks:
                    launch(g)
                steps[g].append(_chunk_step(agent, processor, done_sampled, outcome))
    finally:
        for pending in in_flight.values():  # an error stopped the rollout: read what is still owed
            env.abandon_chunk(pending)
    last_value = torch.cat([state_value(agent, processor, o).float().cpu() for o in group_obs])
    return [_ChunkStep.cat(parts) for parts in zip(*steps)], last_value, cat_obs(group_obs)


def exploration_std_raw(chain: Chain, mask_dims: Tensor, action_scale: np.ndarray) -> list[float]:
    """Mean std of the stochastic steps per real action dim, in the env's raw units (METHODS.md §2)."""
    if chain.stds.numel() == 0:
        return [0.0] * len(action_scale)
    per_dim = chain.stds[..., mask_dims].reshape(-1, int(mask_dims.sum())).float().mean(0)
    return (per_dim.numpy() * action_scale).tolist()


def compute_advantages(batch: TrajectoryBatch, gae_cfg: GAEConfig) -> tuple[Tensor, Tensor]:
    """Chunk-level GAE with truncation bootstrapping; returns (advantages, returns), [T, B].
    Rewards are scaled by `gae_cfg.reward_scale` (the value head predicts scaled returns)."""
    return gae(batch.rewards * gae_cfg.reward_scale, batch.values, batch.terminated, batch.truncated, batch.last_value,
               gamma=gae_cfg.gamma, lam=gae_cfg.lam, truncated_values=batch.truncated_values)


def grpo_episode_advantages(batch: TrajectoryBatch, cfg: GRPOConfig) -> tuple[Tensor, Tensor]:
    """GRPO for one rollout of whole episodes per env, envs grouped by G consecutive indices.

    Each env's first episode (chunks up to and including its first end) gets the group-normalised
    success of that episode; chunks after it and groups without signal are masked out.
    Returns (advantages [T, B], valid mask [T, B]).
    """
    ended = batch.terminated | batch.truncated
    t, b = ended.shape
    if not bool(ended.any(0).all()):
        raise ValueError("GRPO needs every env to finish an episode within the rollout (raise num_chunks)")
    first_end = ended.float().argmax(0)  # [B]
    score = batch.success[first_end, torch.arange(b)].float()
    adv = grpo_advantages(score, cfg.group_size, eps=cfg.eps, unbiased_std=cfg.unbiased_std)
    keep = grpo_filter(score, cfg.group_size, low=cfg.filter_low, high=cfg.filter_high)
    valid = (torch.arange(t)[:, None] <= first_end[None, :]) & keep[None, :]
    return adv[None, :].expand(t, b).clone(), valid


def _minibatches(n: int, size: int, generator: torch.Generator):
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, size):
        yield order[start : start + size]


@dataclasses.dataclass
class PPOMinibatch:
    """What one PPO gradient step needs; rows are (chunk step, env) samples."""

    inputs: Any  # ModelInputs
    chain: Any  # Chain
    old_log_probs: Tensor  # [N] rollout log-probs, reduced as the sampler config says
    advantages: Tensor  # [N]
    returns: Tensor  # [N]
    old_values: Tensor  # [N]
    valid: Tensor  # [N] float 0/1 (GRPO drops chunks after an episode end and signal-less groups)
    mask_exec: Tensor  # [H] bool
    mask_dims: Tensor  # [D] bool

    def to(self, device) -> "PPOMinibatch":
        return PPOMinibatch(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def split(self, n: int) -> list["PPOMinibatch"]:
        """n equal shards (one per data-parallel learner)."""
        size = self.valid.shape[0]
        if size % n:
            raise ValueError(f"minibatch of {size} rows does not split into {n} learners")
        parts = torch.arange(size).chunk(n)
        return [PPOMinibatch(inputs=self.inputs.select(i), chain=self.chain.select(i),
                             old_log_probs=self.old_log_probs[i], advantages=self.advantages[i],
                             returns=self.returns[i], old_values=self.old_values[i], valid=self.valid[i],
                             mask_exec=self.mask_exec, mask_dims=self.mask_dims) for i in parts]


def ppo_minibatches(batch: TrajectoryBatch, advantages: Tensor, returns: Tensor, sampler: SamplerConfig,
                    size: int, generator: torch.Generator, valid: Tensor | None = None):
    """One epoch of shuffled minibatches (the last, smaller one is dropped unless it is the only one)."""
    n = batch.rewards.numel()
    old_logp = reduce_chain_log_prob(batch.chain, sampler.reduction, mask_exec=batch.mask_exec,
                                     mask_dims=batch.mask_dims)
    flat_valid = torch.ones(n) if valid is None else valid.reshape(n).float()
    for idx in _minibatches(n, size, generator):
        if len(idx) < size and n >= size:
            continue
        yield PPOMinibatch(inputs=batch.inputs.select(idx), chain=batch.chain.select(idx),
                           old_log_probs=old_logp[idx], advantages=advantages.reshape(n)[idx],
                           returns=returns.reshape(n)[idx], old_values=batch.values.reshape(n)[idx],
                           valid=flat_valid[idx], mask_exec=batch.mask_exec, mask_dims=batch.mask_dims)


def ratio_valid_mask(mb: PPOMinibatch, granularity: str) -> Tensor:
    """Which PPO ratios count: valid chunks [B], and at finer granularity only executed steps [B, H]
    and real action dims [B, H, D] (METHODS.md §4: log-probs only over the executed sub-chunk)."""
    if granularity == "chunk":
        return mb.valid
    horizon, dims = mb.mask_exec.shape[-1], mb.mask_dims.shape[-1]
    elements = element_mask(len(mb.valid), horizon, dims, mb.mask_exec, mb.mask_dims, device=mb.valid.device)
    elements = elements.to(mb.valid.dtype) * mb.valid[:, None, None]
    return elements.amax(-1) if granularity == "action" else elements


def ppo_loss(agent: Agent, mb: PPOMinibatch, sampler: SamplerConfig, optim: OptimConfig, ppo: PPOConfig,
             value_cfg: ValueLossConfig, use_value: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """The PPO loss of one minibatch (METHODS.md §2-4): clipped surrogate on the chain log-prob of
    the stochastic steps only, value loss, and (Flow-Noise) the noise head's entropy bonus.

    The prefix is recomputed without gradient when the VLM is frozen. Same function on one process
    or inside every DeepSpeed learner rank.
    """
    policy = agent.policy
    vlm_frozen = not any(p.requires_grad for p in policy.paligemma_with_expert.paligemma.parameters())
    with torch.set_grad_enabled(torch.is_grad_enabled() and not vlm_frozen):
        prefix = policy.embed_prefix(mb.inputs)
    lp = chain_log_prob(policy, None, mb.chain, agent.rule(sampler), sampler.reduction, prefix=prefix,
                        mask_exec=mb.mask_exec, mask_dims=mb.mask_dims)
    ratio_mask = ratio_valid_mask(mb, sampler.log_prob_granularity)
    pi_loss, metrics = ppo_policy_loss(lp.log_prob, mb.old_log_probs, mb.advantages, ratio_mask,
                                       clip_eps=ppo.clip_eps, dual_clip=ppo.dual_clip,
                                       normalize_advantages=ppo.normalize_advantages, adv_norm_eps=ppo.adv_norm_eps)
    loss = pi_loss
    metrics = {**metrics, "policy_loss": pi_loss.detach(),
               "log_ratio_max_abs": (lp.log_prob.detach() - mb.old_log_probs).abs().max()}
    if use_value:
        v = agent.value_head.value(policy, prefix, detach_features=value_cfg.detach_features)
        v_loss, v_metrics = value_loss(v, mb.old_values, mb.returns, mb.valid, loss_type=value_cfg.loss_type,
                                       huber_delta=value_cfg.huber_delta, clip_eps=value_cfg.clip_eps)
        loss = loss + optim.value_coef * v_loss
        metrics = {**metrics, **v_metrics, "value_loss": v_loss.detach()}
    chunk_entropy = lp.entropy.reshape(lp.entropy.shape[0], -1).sum(-1)  # per chunk at any granularity
    entropy = (chunk_entropy * mb.valid).sum() / mb.valid.sum().clamp_min(1.0)
    if sampler.kind == "flow_noise":
        loss = loss - optim.entropy_coef * entropy
    metrics["entropy"] = entropy.detach()
    return loss, metrics


def ppo_update(
    agent: Agent,
    train_step: TrainStep,
    batch: TrajectoryBatch,
    advantages: Tensor,
    returns: Tensor,
    sampler: SamplerConfig,
    optim: OptimConfig,
    ppo: PPOConfig,
    value_cfg: ValueLossConfig,
    generator: torch.Generator,
    valid: Tensor | None = None,
    use_value: bool = True,
) -> dict[str, float]:
    """PPO epochs (METHODS.md §4): `train_step(minibatch, loss_fn) -> metrics` takes one optimizer
    step (a `LocalLearner` or a DeepSpeed `LearnerGroup`). Stops early on approx-KL > target_kl.

    `first_log_ratio` is the largest |new - old| log-prob of the first minibatch, under the weights
    the chains were sampled with: it must be ~0 (METHODS.md §6), else rollout and training disagree.
    """
    loss_fn = functools.partial(ppo_loss, sampler=sampler, optim=optim, ppo=ppo, value_cfg=value_cfg,
                                use_value=use_value)
    sums: dict[str, list[float]] = {}
    first_log_ratio = None
    epochs_run = skipped = 0
    for _epoch in range(optim.update_epochs):
        epochs_run += 1
        stop = False
        for mb in ppo_minibatches(batch, advantages, returns, sampler, optim.minibatch_size, generator, valid):
            if not bool(mb.valid.any()):
                # Nothing to learn from (e.g. GRPO groups without signal): a step on a zero loss
                # would still move the weights along Adam's momentum.
                skipped += 1
                continue
            metrics = train_step(mb, loss_fn)
            if first_log_ratio is None:
                first_log_ratio = metrics.get("log_ratio_max_abs", float("nan"))
            for k, v in metrics.items():
                sums.setdefault(k, []).append(float(v))
            if approx_kl_early_stop(metrics["approx_kl"], ppo.target_kl):
                stop = True
                break
        if stop:
            break
    out = {k: float(np.mean(v)) for k, v in sums.items() if k not in ("version", "log_ratio_max_abs")}
    out["first_log_ratio"] = float(first_log_ratio) if first_log_ratio is not None else float("nan")
    out["epochs_run"] = epochs_run
    out["minibatches_skipped"] = skipped
    if use_value:
        out["explained_variance"] = float(explained_variance(batch.values.reshape(-1), returns.reshape(-1)))
    return out


class LocalLearner:
    """A one-process stand-in for `rollout.LearnerGroup` (same `train_step` contract)."""

    def __init__(self, agent: Agent, optimizer: torch.optim.Optimizer, max_grad_norm: float):
        self.agent, self.optimizer, self.max_grad_norm = agent, optimizer, max_grad_norm
        self.version = 0

    def train_step(self, mb: PPOMinibatch, loss_fn) -> dict[str, float]:
        self.agent.train()
        device = next(self.agent.parameters()).device
        loss, metrics = loss_fn(self.agent, mb.to(device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        self.optimizer.step()
        self.version += 1
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm),
                **{k: float(v) for k, v in metrics.items()}}


def scale_learning_rates(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Set every param group's lr to `scale` times the lr it was built with (kept as `base_lr`)."""
    for group in optimizer.param_groups:
        group.setdefault("base_lr", group["lr"])
        group["lr"] = group["base_lr"] * scale


def seeded_noise_stream(seed: int, index: int, horizon: int, action_dim: int) -> tuple[torch.Generator, Tensor]:
    """(generator, noise [H, D]): the `index`-th [H, D] draw of a CPU generator seeded with `seed`, and
    that generator after it (a guided sampler draws its extra candidates from it). What `PolicyActor`
    draws for chunk `index` of an episode reset with that seed, and what a served request with
    {"seed": seed, "noise_index": index} gets (`pirl.serve`)."""
    generator = torch.Generator().manual_seed(int(seed))
    for _ in range(index):
        torch.randn(horizon, action_dim, generator=generator)
    return generator, torch.randn(horizon, action_dim, generator=generator)


def seeded_noise(seed: int, index: int, horizon: int, action_dim: int) -> Tensor:
    """The noise of `seeded_noise_stream` alone."""
    return seeded_noise_stream(seed, index, horizon, action_dim)[1]


def ode_sample_fn(policy: FlowPolicy, num_steps: int):
    """The plain policy's sampler for `PolicyActor`: deterministic Euler (ODE) from the given noise."""

    def sample(inputs, noise: Tensor, generators: list[torch.Generator]) -> Tensor:
        return policy.sample_actions(inputs, noise=noise, num_steps=num_steps)

    return sample


class PolicyActor:
    """Env actions from observations with a policy in this process: the one path from an observation batch
    to raw actions that `evaluate` and the policy server (`pirl.serve`) share.

        actions(obs, noise, generators) -> float32 [B, H, d] in the env's raw units
            processor -> sample(inputs, noise, generators) (normalised [B, H, D]) -> unnormalise, cut to d

    `sample` defaults to the ODE sampler (`ode_sample_fn`); a guided sampler plugs in here with the same
    signature (`generators`: one per row, for any extra randomness a sampler needs, e.g. best-of-N).
    As an `evaluate` actor: `reset(seeds)` gives row i a generator seeded seeds[i]; each call draws the
    next [H, D] noise per row (`seeded_noise(seeds[i], k)` for the k-th call).

    Rows are computed batch-invariantly: a row's actions do not depend on what else is in the batch.
    torch's CPU matmul rounds a single row (M = 1) differently from M >= 2, whose rows agree bit for bit
    at every size measured (2-64), so a lone row is computed as a batch of two (itself twice).
    """

    def __init__(self, policy: FlowPolicy, processor: Processor, num_steps: int, sample=None):
        self.policy, self.processor, self.num_steps = policy, processor, num_steps
        self.sample_is_guided = sample is not None
        self.sample = sample or ode_sample_fn(policy, num_steps)
        self.generators: list[torch.Generator] = []

    @property
    def chunk_shape(self) -> tuple[int, int]:
        return self.policy.config.action_horizon, self.policy.config.action_dim

    def actions(self, obs: dict, noise: Tensor, generators: list[torch.Generator] | None = None,
                inpainting=None) -> np.ndarray:
        return self.actions_from_inputs(self.processor(obs), noise, generators, inpainting)

    @torch.no_grad()
    def actions_from_inputs(self, inputs, noise: Tensor, generators: list[torch.Generator] | None = None,
                            inpainting=None) -> np.ndarray:
        """As `actions`, from processed `ModelInputs` (the processor is row-wise: a server processes each
        request on its own and concatenates).

        `inpainting` (`pirl.guidance.sampler.Inpainting`, rows of the current chunks' remaining actions):
        real-time chunking steers each row's new chunk onto them (docs/serve.md); plain sampler only."""
        device = next(self.policy.parameters()).device
        inputs = inputs.to(device)
        b = inputs.batch_size
        generators = list(generators) if generators is not None else [torch.Generator() for _ in range(b)]
        if b == 1:  # batch-invariance: see the class docstring
            pair = torch.tensor([0, 0], device=device)
            inputs = inputs.select(pair)
            noise = noise.expand(2, *noise.shape[1:])
            twin = torch.Generator()
            twin.set_state(generators[0].get_state())
            generators = [generators[0], twin]
            inpainting = inpainting.select(pair.cpu()) if inpainting is not None else None
        if inpainting is None:
            chunk = self.sample(inputs, noise.to(device), generators)[:b]
        else:
            chunk = self._inpainted(inputs, noise.to(device), inpainting.to(device))[:b]
        return self.processor.unnormalize_actions(chunk)

    def _inpainted(self, inputs, noise: Tensor, inpainting) -> Tensor:
        from pirl.flow.grid import DenoiseGrid
        from pirl.guidance.sampler import inpainted_sample

        if self.sample_is_guided:
            raise ValueError("real-time chunking (inpainting onto the current chunk) runs with the plain sampler, "
                             "not with test-time guidance")
        prefix = self.policy.embed_prefix(inputs, hidden=False)
        return inpainted_sample(self.policy, prefix, noise, inpainting,
                                grid=DenoiseGrid.uniform(self.num_steps)).actions

    def reset(self, seeds: list[int]) -> None:
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def __call__(self, obs: dict, remaining: np.ndarray | None = None, delay: int = 0, beta: float | None = None
                 ) -> np.ndarray:
        """The next chunk per env; with `remaining` ([B, L, d] env-unit actions of the current chunks still to
        run, `delay` of them before the new chunk takes over), steered onto them with cap `beta` (real-time
        chunking; default `pirl.guidance.sampler.INPAINT_BETA`)."""
        horizon, dim = self.chunk_shape
        noise = torch.stack([torch.randn(horizon, dim, generator=g) for g in self.generators])
        inpainting = None
        if remaining is not None:
            from pirl.guidance.sampler import Inpainting

            betas = None if beta is None else [beta] * len(remaining)
            inpainting = Inpainting.from_raw(self.processor, list(remaining), [delay] * len(remaining), betas)
        return self.actions(obs, noise, self.generators, inpainting)


@torch.no_grad()
def evaluate(agent: Agent | None, processor: Processor | None, env: ChunkEnv, episodes: int, n_exec: int,
             num_steps: int, seed: int, max_chunks: int = 10_000, actor=None, prefetch_steps: int = 0,
             inpaint: bool = False, inpaint_beta: float | None = None) -> dict[str, Any]:
    """Deterministic (ODE) evaluation of exactly the first episode of each seed in
    [seed, seed + episodes): in rounds of `env.num_envs`, env i of a round starting at s plays seed
    s + i once. Counting whichever episodes finish first instead would favour quick successes. Each
    episode's initial noises come from a generator seeded by its own seed, so an episode's outcome
    does not depend on how many envs run beside it. Returns the success rate with its 95% Wilson
    interval and one row per episode (with its seed).

    `actor` (default: `PolicyActor(agent.policy, processor, num_steps)`) turns observations into raw env
    actions [B, H, d]: `actor.reset(seeds)` at each round, then one call per chunk. A served policy plugs
    in as `pirl.serve.client.RemoteActor`; `agent` and `processor` are then unused.

    `prefetch_steps` (d): act as a robot does behind `pirl.serve.broker.ActionChunkBroker(n_exec,
    prefetch_steps=d)`, which hides the inference latency: every chunk after an episode's first is computed
    from the observation d steps before the current chunk ends and executed from its index d, as if its answer
    took exactly d control steps. What acting on a d-step-old observation costs, measured before a robot pays
    it. d = 0: each chunk from the observation where the last one ended. Needs 0 <= d <= n_exec, n_exec + d <= H.
    `inpaint`: each new chunk is also steered onto the current chunk's actions still to run (real-time
    chunking, docs/serve.md), as `ActionChunkBroker(..., inpaint=True)` asks the server to, the pull capped
    at `inpaint_beta` (default `pirl.guidance.sampler.INPAINT_BETA`).
    """
    if not 0 <= prefetch_steps <= n_exec:
        raise ValueError(f"prefetch_steps must be in [0, n_exec={n_exec}], got {prefetch_steps}")
    if actor is None:
        agent.eval()
        actor = PolicyActor(agent.policy, processor, num_steps)
    per_episode: dict[int, dict] = {}
    bar = progress_bar(episodes, "eval", unit="episode", leave=False)
    for start in range(seed, seed + episodes, env.num_envs):
        obs = env.reset(start)
        actor.reset([start + i for i in range(env.num_envs)])
        pending = set(range(min(env.num_envs, seed + episodes - start)))

        def play(actions: np.ndarray):  # executes these steps; records the episodes that end in them
            obs, _, terminated, truncated, info = env.step_chunk(actions, actions.shape[1])
            for i in sorted(pending & set(np.flatnonzero(np.asarray(terminated) | np.asarray(truncated)).tolist())):
                per_episode[start + i] = {"seed": start + i, "success": bool(info["success_once"][i]),
                                          "return": float(info["episode_return"][i]),
                                          "length": int(info["episode_length"][i])}
                pending.discard(i)
                bar.update(1)
            return obs

        chunk, first = actor(obs), 0  # first: the chunk's index that acts now
        if n_exec + prefetch_steps > chunk.shape[1]:
            raise ValueError(f"n_exec {n_exec} + prefetch_steps {prefetch_steps} > the chunk of {chunk.shape[1]} actions")
        ahead = n_exec - prefetch_steps  # steps executed before the next chunk is asked for
        for _ in range(max_chunks):
            if ahead:
                obs = play(chunk[:, first:first + ahead])
            if not pending:
                break
            upcoming = (actor(obs, remaining=chunk[:, first + ahead:], delay=prefetch_steps, beta=inpaint_beta)
                        if inpaint else actor(obs))
            if prefetch_steps:  # the current chunk's last d steps run while the next one is being computed
                obs = play(chunk[:, first + ahead:first + n_exec])
                if not pending:
                    break
            chunk, first = upcoming, prefetch_steps
    bar.close()
    rows = [per_episode[s] for s in sorted(per_episode)]
    wins = sum(r["success"] for r in rows)
    low, high = wilson_interval(wins, len(rows))
    return {
        "episodes": len(rows),
        "successes": wins,
        "success_rate": wins / len(rows) if rows else 0.0,
        "success_ci95": [low, high],
        "mean_return": float(np.mean([r["return"] for r in rows])) if rows else 0.0,
        "mean_length": float(np.mean([r["length"] for r in rows])) if rows else 0.0,
        "per_episode": rows,
    }
