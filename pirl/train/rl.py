"""Online RL fine-tuning (PPO or GRPO) of a flow VLA policy: the main job of pirl.

The loop, top to bottom (DESIGN.md "One RL iteration"):

    for iteration in range(start, run.iterations):
        1. weights (trainable parameters, versioned) go from the learners to every rollout worker
        2. each worker resets its envs (seeded by iteration) and collects `run.num_chunks` chunks
           with the stochastic sampler (Flow-SDE or Flow-Noise) -> TrajectoryBatch
        3. advantages: chunk-level GAE (PPO) or group-relative success (GRPO)
        4. PPO epochs over minibatches on the learner group (DeepSpeed ZeRO, or one process)
        5. log; evaluate (ODE sampling, fixed seeds) and checkpoint on schedule; a fresh run also
           evaluates its start before iteration 0 (`start_eval_*` in iteration 0's record)

`train` runs the iterations; `rl_iteration` is one of them, the five steps in order. Roles are placed
by `cluster`, once (`start_roles`): `use_ray=false` runs everything in this process (`LocalPool`,
`LocalLearnerGroup`: debugging, tests); `use_ray=true` runs Ray rollout workers and a DeepSpeed
learner group, collocated or disaggregated. Both sides have the interfaces of `pirl.train.protocols`,
so the loop itself has no placement branches.
Envs are reset at the start of every iteration with seeds derived from (seed, iteration, worker), so an
iteration is a function of the weights and its number alone: a resumed run repeats exactly what an
uninterrupted one would have done.

Failures: a dead rollout worker is replaced and its call retried (rollout.worker). A dead learner rank
breaks the whole DeepSpeed group (its ZeRO partitions and the collectives die with it), so the run
rebuilds the learners and workers from its last checkpoint, in this process (`Roles.run`), and repeats the
iterations since (`cluster.max_learner_restarts`); metrics.jsonl then holds those iterations twice,
the later rows with a higher `learner_restarts`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from pirl.algos.config import GAEConfig, GRPOConfig, PPOConfig, ValueLossConfig
from pirl.config import check_device, load_section
from pirl.train.batch import TrajectoryBatch
from pirl.train.common import graphs_on_gpu, set_seed, set_trainable
from pirl.train.curriculum import plan_resets
from pirl.train.logger import MetricLogger, logging_redirect_tqdm, progress_bar
from pirl.train.protocols import LearnerGroup as LearnerGroupProtocol
from pirl.train.protocols import WorkerPool as WorkerPoolProtocol
from pirl.train.rl_core import (
    Agent,
    LocalLearner,
    OptimConfig,
    SamplerConfig,
    collect_rollout,
    compute_advantages,
    evaluate,
    exploration_std_raw,
    grpo_episode_advantages,
    ppo_update,
    scale_learning_rates,
)
from vla.checkpoint import atomic_directory, load_policy, read_metadata, save_policy, tokenizer_path
from vla.config import unknown_keys_message
from vla.processor import Processor, PromptTokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What to train, for how long, where results go."""

    init_checkpoint: str = ""
    """A pirl policy directory (weights, norm stats, tokenizer), e.g. from `pirl sft`."""
    algorithm: Literal["ppo", "grpo"] = "ppo"
    iterations: int = 20
    num_chunks: int = 16
    """Chunk steps each env takes per iteration (the rollout length T)."""
    n_exec: int = 5
    """Actions executed per chunk (of the predicted horizon H)."""
    camera_map: dict = dataclasses.field(default_factory=dict)
    """Model camera name -> env camera name; unmapped model cameras are fed as missing."""
    eval_every: int = 5
    """ODE evaluation every this many iterations, and of the start before iteration 0 (0: never)."""
    eval_episodes: int = 16
    """Evaluation episodes: the first episode of each seed eval_seed, eval_seed + 1, ..."""
    eval_seed: int = 10_000
    checkpoint_every: int = 5
    output_dir: str = "runs/rl"
    seed: int = 0
    replay_failures: float = 0.0
    """Share of each iteration's env resets that replay earlier training seeds instead of fresh
    ones, drawn in proportion to how often each failed (`pirl.train.curriculum`); 0: all fresh."""
    resume: str | None = None
    """A checkpoint directory written by this trainer (`.../checkpoints/iter_XXXXXX`) to continue from."""
    wandb: bool = False
    wandb_project: str = "pirl"

    def __post_init__(self) -> None:
        if not 0.0 <= self.replay_failures <= 1.0:
            raise ValueError(f"run.replay_failures={self.replay_failures}: a share of the resets, in [0, 1]")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """Where the roles run. With `use_ray`, the fields named as in `rollout.PlacementConfig`,
    `rollout.LearnerConfig` and `rollout.WorkerPoolConfig` (same names, same defaults: tests/test_rl.py
    checks it) become those configs (`rollout_configs`)."""

    use_ray: bool = False
    envs_per_worker: int = 4
    # placement (rollout.PlacementConfig)
    mode: Literal["collocated", "disaggregated"] = "collocated"
    num_learners: int = 1
    num_workers: int = 1
    """Rollout workers."""
    learner_cpus: float = 0.25
    worker_cpus: float = 0.25
    learner_gpus: float = 0.0
    worker_gpus: float = 0.0
    worker_device: str = "cpu"
    """Where each Ray rollout worker runs its policy: cpu, or cuda (the GPU Ray gives it: worker_gpus > 0),
    where it replays the policy's inference passes from CUDA graphs (`FlowPolicy.use_cuda_graphs`)."""
    # learner group (rollout.LearnerConfig)
    zero_stage: int = 2
    learner_call_timeout_s: float | None = None
    """A learner-group call running longer counts as a lost learner rank; None waits."""
    # worker pool (rollout.WorkerPoolConfig)
    worker_call_timeout_s: float | None = None
    """A rollout-worker call running longer counts as a dead worker (replaced, call retried)."""
    ray_address: str | None = None
    """Connect to a running cluster (`ray start --head` / SLURM launcher); None starts a local one."""
    max_learner_restarts: int = 2
    """A lost learner rank rebuilds the learner group and the worker pool from the run's last
    checkpoint and goes on from the iteration after it (the iterations since are repeated exactly:
    see the module doc). Past this many rebuilds in one run, the error propagates."""

    def __post_init__(self) -> None:
        check_device(self.worker_device, "cluster.worker_device", here=False)  # the workers' GPUs, not the driver's
        if self.worker_device != "cpu" and not (self.use_ray and self.worker_gpus > 0):
            raise ValueError(f"cluster.worker_device={self.worker_device} needs Ray workers with a GPU "
                             "(cluster.use_ray=true, cluster.worker_gpus > 0)")


@dataclasses.dataclass(frozen=True)
class RLConfig:
    run: RunConfig = RunConfig()
    env: dict = dataclasses.field(default_factory=dict)
    """Simulator config: `simulator: maniskill | libero | toy` plus that adapter's fields."""
    sampler: SamplerConfig = SamplerConfig()
    optim: OptimConfig = OptimConfig()
    gae: GAEConfig = GAEConfig()
    ppo: PPOConfig = PPOConfig()
    value: ValueLossConfig = ValueLossConfig()
    grpo: GRPOConfig = GRPOConfig()
    cluster: ClusterConfig = ClusterConfig()

    @classmethod
    def from_dict(cls, data: dict) -> "RLConfig":
        unknown = unknown_keys_message(data, [f.name for f in dataclasses.fields(cls)], kind="section")
        if unknown:
            raise KeyError(unknown)
        kwargs: dict[str, Any] = {"env": dict(data.get("env") or {})}
        for field in dataclasses.fields(cls):
            if field.name != "env" and field.name in data:
                section_type = type(field.default)  # every other section defaults to its dataclass
                kwargs[field.name] = load_section(section_type, data[field.name], f"{field.name}.")
        cfg = cls(**kwargs)
        validate_env_section(cfg.env)  # fail here, not inside a worker
        return cfg


# -- envs ------------------------------------------------------------------------------------------
def env_section(section: dict, num_envs: int, seed: int) -> dict:
    """The experiment's env section (simulator + adapter fields) for one worker's batch of envs."""
    return {**section, "num_envs": num_envs, "seed": seed}


def validate_env_section(section: dict) -> None:
    """Builds the adapter's typed config (unknown keys raise) without starting a simulator."""
    from envs.config import ConfigError, LiberoConfig, ManiSkillConfig, ToyConfig

    data = env_section(section, 1, 0)
    simulator = data.pop("simulator", None)
    classes = {"maniskill": ManiSkillConfig, "libero": LiberoConfig, "toy": ToyConfig}
    if simulator not in classes:
        raise ConfigError(f"env.simulator must be one of {sorted(classes)}, got {simulator!r}")
    classes[simulator].from_dict(data)


def make_env(section: dict, num_envs: int, seed: int):
    from envs import make_env as build

    return build(env_section(section, num_envs, seed))


# -- building the agent (picklable factories, run inside learners and workers) ---------------------
EXTRA_MODULES = ("value_head", "noise_head")


def build_agent(checkpoint: str, sampler: SamplerConfig, trainable: str, weights: str | None = None) -> Agent:
    """Policy from `checkpoint`, heads fresh or (if `weights` is a trainer checkpoint) restored."""
    source = weights or checkpoint
    meta = read_metadata(source)
    policy, stats = load_policy(source)
    agent = Agent.build(policy, sampler, (stats or {}).get("actions"))
    stored = set(meta.get("pirl_extra_modules", []))
    extras = {k: getattr(agent, k) for k in EXTRA_MODULES if getattr(agent, k) is not None and k in stored}
    if extras:
        load_policy(source, extra_modules=extras)
    set_trainable(agent.policy, trainable)
    for name, module in ((k, getattr(agent, k)) for k in EXTRA_MODULES):
        if module is not None:
            for p in module.parameters():
                p.pirl_group = name  # read by GroupedAdamW: each head has its own learning rate
    return agent


class GroupedAdamW:
    """Optimizer factory for DeepSpeed learners: AdamW with per-module learning rates.

    Parameters arrive as a flat list; each was tagged `pirl_group` by `build_agent`.
    """

    def __init__(self, optim: OptimConfig):
        self.optim = optim

    def __call__(self, params) -> torch.optim.Optimizer:
        lrs = {"policy": self.optim.policy_lr, "value_head": self.optim.value_lr,
               "noise_head": self.optim.noise_head_lr}
        groups: dict[str, list] = {}
        for p in params:
            groups.setdefault(getattr(p, "pirl_group", "policy"), []).append(p)
        return torch.optim.AdamW([{"params": ps, "lr": lrs[g]} for g, ps in groups.items()],
                                 betas=self.optim.betas, weight_decay=self.optim.weight_decay)


def processor_for(checkpoint: str, camera_map: dict) -> Processor:
    policy, stats = load_policy(checkpoint)
    tok = tokenizer_path(checkpoint)
    if stats is None or tok is None:
        raise ValueError(f"{checkpoint}: a policy for RL must carry norm_stats.json and tokenizer.model")
    return Processor(policy.config, PromptTokenizer(tok), stats, camera_map=dict(camera_map))


def iteration_seed(base: int, iteration: int, worker: int) -> int:
    """Env/noise seed of one iteration on one worker. Offset by 10^6 so training never replays the
    small seeds that demos (0, 1, ...) and evaluation (run.eval_seed) use."""
    return (1_000_000 + base * 1_000_003 + iteration * 7_919 + worker * 104_729) % 2**31


# -- worker-side functions (shipped to Ray workers; also run in-process) ---------------------------
def setup_worker(worker, cfg: RLConfig) -> None:
    place_worker_policy(worker, cfg.cluster.worker_device)
    worker.scratch["env"] = make_env(cfg.env, cfg.cluster.envs_per_worker, cfg.run.seed)
    worker.scratch["processor"] = processor_for(cfg.run.init_checkpoint, cfg.run.camera_map)


def place_worker_policy(worker, device: str) -> None:
    """Moves a worker's agent to `device` (cuda: the GPU Ray gave it) and turns on CUDA graphs there.
    Weight syncs copy into the moved parameters in place (`rollout.weights.load_into`), so the graphs
    stay valid; rollouts move observations to the agent's device and results back to the CPU."""
    if device == "cpu":
        return
    if not torch.cuda.is_available():
        raise RuntimeError(f"cluster.worker_device={device}, but rollout worker {worker.index} sees no CUDA "
                           "device (Ray gives a worker a GPU only with cluster.worker_gpus > 0)")
    worker.model.to(device)
    graphs_on_gpu(worker.model.policy)


def fresh_reset_seeds(cfg: RLConfig, iteration: int, worker: int) -> list[int]:
    """One worker's env reset seeds for an iteration, without a curriculum."""
    n = cfg.cluster.envs_per_worker
    seeds = ALGORITHMS[cfg.run.algorithm].reset_seeds(iteration_seed(cfg.run.seed, iteration, worker), n, cfg)
    return [int(seeds) + i for i in range(n)] if np.ndim(seeds) == 0 else [int(s) for s in seeds]


def rollout_on_worker(worker, cfg: RLConfig, iteration: int, reset_seeds: list[list[int]] | None = None
                      ) -> TrajectoryBatch:
    """reset_seeds: every worker's env seeds (a curriculum's plan); None: `fresh_reset_seeds`."""
    env, processor = worker.scratch["env"], worker.scratch["processor"]
    seed = iteration_seed(cfg.run.seed, iteration, worker.index)
    obs = env.reset(fresh_reset_seeds(cfg, iteration, worker.index) if reset_seeds is None
                    else reset_seeds[worker.index])
    generator = torch.Generator().manual_seed(seed)
    batch, _ = collect_rollout(worker.model, processor, env, obs, cfg.run.num_chunks, cfg.run.n_exec,
                               cfg.sampler, generator, weight_version=worker.version)
    return batch


def evaluate_on_worker(worker, cfg: RLConfig, episodes: int) -> dict:
    return evaluate(worker.model, worker.scratch["processor"], worker.scratch["env"], episodes,
                    cfg.run.n_exec, cfg.sampler.num_steps, cfg.run.eval_seed)


class _LocalWorker:
    """The in-process stand-in for a Ray RolloutWorker (the same `model`/`scratch`/`index` fields)."""

    def __init__(self, agent: Agent, cfg: RLConfig):
        self.index, self.model, self.version, self.scratch = 0, agent, 0, {}
        setup_worker(self, cfg)


# -- where the roles run: in this process or on Ray (one interface, see pirl.train.protocols) -----
class LocalPool:
    """The in-process `WorkerPool`: one worker on the driver's agent, which the learner trains in
    place, so `sync` has nothing to move (the worker's version stays 0, as its batches say)."""

    def __init__(self, agent: Agent, cfg: RLConfig):
        self.workers, self.restarts = [_LocalWorker(agent, cfg)], [0]

    def sync(self, snapshot: Any) -> int:
        return self.workers[0].version

    def map(self, fn, *args, **kwargs) -> list:
        return [fn(worker, *args, **kwargs) for worker in self.workers]

    def call(self, i: int, fn, *args, **kwargs) -> Any:
        return fn(self.workers[i], *args, **kwargs)

    def shutdown(self) -> None:
        for worker in self.workers:
            worker.scratch["env"].close()


class LocalLearnerGroup:
    """The in-process `LearnerGroup`: a `LocalLearner` (`GroupedAdamW`) training the driver's agent
    itself, which the local worker shares (no snapshot to send)."""

    def __init__(self, agent: Agent, optim: OptimConfig):
        optimizer = GroupedAdamW(optim)([p for p in agent.parameters() if p.requires_grad])
        self.learner = LocalLearner(agent, optimizer, optim.max_grad_norm)

    def train_step(self, minibatch: Any, loss_fn) -> dict[str, float]:
        return self.learner.train_step(minibatch, loss_fn)

    def set_lr_scale(self, scale: float) -> None:
        scale_learning_rates(self.learner.optimizer, scale)

    def snapshot_ref(self, trainable_only: bool = True) -> None:
        return None  # the worker holds the learner's own module

    def get_weights(self, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.learner.agent.named_parameters()
                if p.requires_grad or not trainable_only}

    def save_checkpoint(self, directory: str, tag: str | None = None) -> None:
        with atomic_directory(Path(directory)) as tmp:
            torch.save(self.learner.optimizer.state_dict(), tmp / "optimizer.pt")

    def load_checkpoint(self, directory: str, tag: str | None = None) -> int:
        self.learner.optimizer.load_state_dict(torch.load(Path(directory) / "optimizer.pt"))
        return self.learner.version

    def shutdown(self, graceful: bool = True) -> None:
        pass  # nothing runs outside this process


@dataclasses.dataclass(frozen=True)
class RoleSet:
    """Rollout workers and learners, started together by `start_roles`."""

    pool: WorkerPoolProtocol
    learners: LearnerGroupProtocol
    placement: Any
    """The Ray placement group (`rollout.Placement`), None in-process."""
    state_suffix: str
    """The learners' state lives next to a policy checkpoint `p` in `p + state_suffix`."""
    lost: tuple[type[BaseException], ...]
    """Errors that mean the learner group is gone (in-process: none)."""
    distributed: bool
    """Whether metrics carry worker_restarts, learner_restarts, weight_version (Ray runs only)."""

    def shutdown(self, graceful: bool = True) -> None:
        self.pool.shutdown()
        self.learners.shutdown(graceful=graceful)
        if self.placement is not None:
            self.placement.remove()


def start_roles(cfg: RLConfig, host_agent: Agent, weights_source: str | None) -> RoleSet:
    """The one choice of where roles run: this process (one worker and one learner, both on
    `host_agent`), or with `cluster.use_ray` Ray rollout workers and a DeepSpeed learner group built
    from `weights_source` (None: the initial policy). The learners load their stored state if any."""
    if cfg.cluster.use_ray:
        return _start_ray(cfg, weights_source)
    learners = LocalLearnerGroup(host_agent, cfg.optim)
    _load_learner_state(learners, weights_source, ".optim")
    return RoleSet(LocalPool(host_agent, cfg), learners, None, ".optim", lost=(), distributed=False)


def _load_learner_state(learners: LearnerGroupProtocol, weights_source: str | None, suffix: str) -> None:
    if weights_source and Path(weights_source + suffix).exists():
        learners.load_checkpoint(weights_source + suffix, tag="state")


def _start_ray(cfg: RLConfig, weights_source: str | None) -> RoleSet:
    import ray

    from rollout.learner import LearnerGroup, LearnerLostError
    from rollout.placement import Placement
    from rollout.worker import WorkerPool

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(address=cfg.cluster.ray_address, include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}})
    factory = functools.partial(build_agent, cfg.run.init_checkpoint, cfg.sampler, cfg.optim.trainable, weights_source)
    placement_cfg, learner_cfg, pool_cfg = rollout_configs(cfg)
    placement = Placement.create(placement_cfg)
    learners = LearnerGroup(learner_cfg, factory, GroupedAdamW(cfg.optim), placement=placement)
    _load_learner_state(learners, weights_source, ".deepspeed")
    pool = WorkerPool(pool_cfg, factory, functools.partial(setup_worker, cfg=cfg), placement=placement)
    return RoleSet(pool, learners, placement, ".deepspeed", lost=(LearnerLostError,), distributed=True)


class Roles:
    """The run's roles (`pool`, `learners`) and what it takes to rebuild them: a lost learner rank
    breaks the whole group, so `run` rebuilds every role from the last checkpoint (module doc)."""

    def __init__(self, cfg: RLConfig, host_agent: Agent, weights_source: str | None):
        self.cfg, self.host_agent = cfg, host_agent
        self.last_checkpoint = weights_source  # where a lost learner group is rebuilt from (None: the start)
        self.learner_restarts = self.earlier_worker_restarts = 0
        self.placed = start_roles(cfg, host_agent, weights_source)

    @property
    def pool(self) -> WorkerPoolProtocol:
        return self.placed.pool

    @property
    def learners(self) -> LearnerGroupProtocol:
        return self.placed.learners

    def run(self, step, iteration: int, history: list) -> tuple[int, list]:
        """`step(iteration)`, then (the next iteration, the history). If the step lost the learner
        group: every role rebuilt from the last checkpoint, (the iteration after it, its history)."""
        try:
            step(iteration)
        except self.placed.lost as err:
            return self._rebuild(iteration, err)
        return iteration + 1, history

    def _rebuild(self, lost_at: int, err: BaseException) -> tuple[int, list]:
        self.learner_restarts += 1
        limit = self.cfg.cluster.max_learner_restarts
        if self.learner_restarts > limit:
            raise RuntimeError(f"the learner group was lost {self.learner_restarts} times "
                               f"(cluster.max_learner_restarts={limit})") from err
        self.earlier_worker_restarts += sum(self.pool.restarts)
        self.placed.shutdown(graceful=False)
        iteration, history = _rollback_point(self.last_checkpoint)
        log.warning("learner group lost at iteration %d (%s); rebuilt from %s, going on from iteration %d "
                    "(restart %d of %d)", lost_at, err, self.last_checkpoint or "the initial policy", iteration,
                    self.learner_restarts, limit)
        self.placed = start_roles(self.cfg, self.host_agent, self.last_checkpoint)
        return iteration, history

    def placement_metrics(self, version: int) -> dict:
        """Restarts and the weight version (Ray runs; in-process runs log none of them)."""
        if not self.placed.distributed:
            return {}
        return {"worker_restarts": self.earlier_worker_restarts + sum(self.pool.restarts),
                "learner_restarts": self.learner_restarts, "weight_version": version}

    def save_checkpoint(self, processor: Processor, iteration: int, history: list) -> None:
        """The learners' weights into the host agent, then policy + learner state, atomically."""
        self.host_agent.load_state_dict(self.learners.get_weights(trainable_only=False), strict=False)
        out = Path(self.cfg.run.output_dir)
        path = out / "checkpoints" / f"iter_{iteration:06d}"
        save_trainer_checkpoint(path, self.host_agent, processor, iteration, self.cfg, self.learners,
                                self.placed.state_suffix, history)
        (out / "checkpoints" / "LATEST").write_text(path.name + "\n")
        self.last_checkpoint = str(path)

    def shutdown(self) -> None:
        self.placed.shutdown()


# -- checkpoints -----------------------------------------------------------------------------------
def save_trainer_checkpoint(path: Path, agent: Agent, processor: Processor, iteration: int, cfg: RLConfig,
                            learners: LearnerGroupProtocol, state_suffix: str, history: list | None = None) -> Path:
    """Policy bundle + heads + iteration, then the learners' state (optimizer; DeepSpeed's ZeRO
    partitions) in `path + state_suffix`, each written atomically (a killed run resumes)."""
    extras = {k: getattr(agent, k) for k in EXTRA_MODULES if getattr(agent, k) is not None}
    save_policy(path, agent.policy, processor.norm_stats, extra_modules=extras,
                tokenizer_file=tokenizer_path(cfg.run.init_checkpoint),
                metadata={"iteration": iteration, "pirl_extra_modules": sorted(extras),
                          "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                          "history": history or []})
    learners.save_checkpoint(str(path.with_name(path.name + state_suffix)), tag="state")
    return path


def _rollback_point(checkpoint: str | None) -> tuple[int, list]:
    """(the iteration to go on from, the history up to it) from ``checkpoint`` (None: the start)."""
    if checkpoint is None:
        return 0, []
    meta = read_metadata(checkpoint)
    return int(meta["iteration"]) + 1, list(meta.get("history", []))


# -- the loop --------------------------------------------------------------------------------------
def train(cfg: RLConfig) -> dict:
    run = cfg.run
    if not run.init_checkpoint:
        raise ValueError("run.init_checkpoint is required: a pirl policy directory (e.g. from `pirl sft`)")
    set_seed(run.seed)
    out = Path(run.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    start_iteration, history = _rollback_point(run.resume)
    if run.resume:
        log.info("resuming from %s at iteration %d", run.resume, start_iteration)
    host_agent = build_agent(run.init_checkpoint, cfg.sampler, cfg.optim.trainable, run.resume)  # the driver's copy
    processor = processor_for(run.init_checkpoint, run.camera_map)
    logger = MetricLogger(out, use_wandb=run.wandb, project=run.wandb_project, config=dataclasses.asdict(cfg),
                          resume_at=start_iteration, env_steps_total=sum(int(h["env_steps"]) for h in history))
    roles = Roles(cfg, host_agent, run.resume)
    with contextlib.ExitStack() as stack:  # on the way out: the bar, then the logger, then the roles
        stack.callback(roles.shutdown)
        stack.callback(logger.close)
        stack.enter_context(logging_redirect_tqdm())
        bar = stack.enter_context(progress_bar(run.iterations, "rl", initial=start_iteration))
        iteration = start_iteration
        while iteration < run.iterations:
            step = functools.partial(rl_iteration, cfg, roles, processor, logger, history, bar)
            iteration, history = roles.run(step, iteration, history)
            bar.n = iteration
            bar.refresh()
    return {"history": history, "output_dir": str(out)}


def rl_iteration(cfg: RLConfig, roles: Roles, processor: Processor, logger: MetricLogger, history: list,
                 bar, iteration: int) -> None:
    """One iteration, the five steps of the module doc; its record goes to `history` and the log."""
    run = cfg.run
    t0 = time.perf_counter()
    # 1. weight sync
    version = roles.pool.sync(roles.learners.snapshot_ref())
    t1 = time.perf_counter()
    start_eval = {}
    if iteration == 0 and run.eval_every > 0:  # the start on the same seeds: a run's rise is read off one file
        bar.set_postfix_str("iteration 0: evaluate the start")
        start_eval = {f"start_{k}": v for k, v in _evaluate(cfg, roles, "start").items()}
        start_eval["time_start_eval_s"] = time.perf_counter() - t1
    bar.set_postfix_str(f"iteration {iteration}: rollout")
    rollout_started = time.perf_counter()
    # 2. rollouts, from fresh initial states or (run.replay_failures) partly from failed earlier ones
    plan = plan_reset_seeds(cfg, iteration, history)
    seeds = None if plan is None else plan.seeds
    batch = TrajectoryBatch.cat_envs(roles.pool.map(rollout_on_worker, cfg, iteration, seeds))
    if batch.weight_version != version:  # a worker rolled out with other weights
        raise RuntimeError(f"rollouts used weights v{batch.weight_version}, synced v{version}")
    t2 = time.perf_counter()
    bar.set_postfix_str(f"iteration {iteration}: learn")
    # 3. advantages
    advantages, returns, valid = advantages_of(batch, cfg)
    # 4. PPO epochs
    lr_scale = cfg.optim.lr_scale(iteration, run.iterations)
    roles.learners.set_lr_scale(lr_scale)
    generator = torch.Generator().manual_seed(iteration_seed(run.seed, iteration, 999))
    metrics = ppo_update(roles.host_agent, roles.learners.train_step, batch, advantages, returns, cfg.sampler,
                         cfg.optim, cfg.ppo, cfg.value, generator, valid=valid,
                         use_value=ALGORITHMS[run.algorithm].use_value)
    t3 = time.perf_counter()
    # 5. log, evaluate, checkpoint
    rollout_s = t2 - rollout_started
    record = {"iteration": iteration, **rollout_metrics(batch), "time_sync_s": t1 - t0, "time_rollout_s": rollout_s,
              "time_learn_s": t3 - t2, "env_steps_per_s": batch.env_steps / max(rollout_s, 1e-9), "lr_scale": lr_scale, **metrics,
              **exploration_metrics(batch, processor), **roles.placement_metrics(version), **start_eval}
    if run.eval_every > 0 and _on_schedule(iteration, run.eval_every, run.iterations):
        bar.set_postfix_str(f"iteration {iteration}: evaluate")
        roles.pool.sync(roles.learners.snapshot_ref())
        record.update(_evaluate(cfg, roles, f"iter_{iteration:06d}"))
    if plan is not None:
        successes = batch.first_episode_success.tolist()
        replayed = [ok for ok, again in zip(successes, plan.replayed, strict=True) if again]
        record.update(replayed_envs=len(replayed),
                      replayed_success=float(np.mean(replayed)) if replayed else float("nan"))
    entry = {k: v for k, v in record.items() if isinstance(v, int | float)}
    if plan is not None:  # the curriculum's state: every first episode's (seed, success)
        entry["resets"] = [[s, int(ok)] for s, ok in zip(sum(plan.seeds, []), successes, strict=True)]
    history.append(entry)
    logger.log(record)
    if _on_schedule(iteration, run.checkpoint_every, run.iterations):
        roles.save_checkpoint(processor, iteration, history)
    bar.set_postfix_str(f"success {record['success_once']:.2f}"
                        + (f", eval {record['eval_success_rate']:.2f}" if "eval_success_rate" in record else ""))


@dataclasses.dataclass(frozen=True)
class ResetPlan:
    """One iteration's env resets under the curriculum."""

    seeds: list[list[int]]  # per worker, per env
    replayed: list[bool]  # per env over all workers (in batch order): an earlier seed, not a fresh one


def plan_reset_seeds(cfg: RLConfig, iteration: int, history: list) -> ResetPlan | None:
    """Every worker's env reset seeds under the curriculum (None without one: workers draw fresh)."""
    if cfg.run.replay_failures <= 0:
        return None
    workers = cfg.cluster.num_workers if cfg.cluster.use_ray else 1
    fresh = sum((fresh_reset_seeds(cfg, iteration, w) for w in range(workers)), [])
    outcomes = [(s, bool(ok)) for h in history for s, ok in h.get("resets", [])]
    rng = np.random.default_rng(iteration_seed(cfg.run.seed, iteration, 998))
    planned = plan_resets(fresh, outcomes, cfg.run.replay_failures, rng)
    n = cfg.cluster.envs_per_worker
    return ResetPlan(seeds=[planned[w * n:(w + 1) * n] for w in range(workers)],
                     replayed=[p != f for p, f in zip(planned, fresh, strict=True)])


def _evaluate(cfg: RLConfig, roles: Roles, name: str) -> dict:
    """ODE evaluation of the synced weights on worker 0; its episodes go to OUT/evals/<name>.json."""
    result = roles.pool.call(0, evaluate_on_worker, cfg, cfg.run.eval_episodes)
    save_episodes(Path(cfg.run.output_dir) / "evals" / f"{name}.json", result)
    return eval_metrics(result)


def _on_schedule(iteration: int, every: int, iterations: int) -> bool:
    return (iteration + 1) % every == 0 or iteration + 1 == iterations


def advantages_of(batch: TrajectoryBatch, cfg: RLConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(advantages, returns, valid) of the run's algorithm."""
    return ALGORITHMS[cfg.run.algorithm].advantages(batch, cfg)


# -- the algorithm: everything choosing PPO or GRPO changes, in one place ----------------------------
def _one_seed(seed: int, n: int, cfg: RLConfig) -> int:
    return seed


def _grouped_seeds(seed: int, n: int, cfg: RLConfig) -> list[int]:
    """G envs per group share a reset state: env i gets seed + i // G."""
    g = cfg.grpo.group_size
    if n % g:
        raise ValueError(f"GRPO needs envs_per_worker ({n}) to be a multiple of group_size ({g})")
    return [seed + i // g for i in range(n)]


def _gae_advantages(batch: TrajectoryBatch, cfg: RLConfig):
    advantages, returns = compute_advantages(batch, cfg.gae)
    return advantages, returns, None


def _group_advantages(batch: TrajectoryBatch, cfg: RLConfig):
    # GRPO's returns are its advantages; `valid` marks the samples to learn from.
    advantages, valid = grpo_episode_advantages(batch, cfg.grpo)
    return advantages, advantages, valid


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """reset_seeds(seed, n, cfg): the envs' reset seeds; advantages(batch, cfg) -> (advantages, returns,
    valid); use_value: whether the PPO update trains and uses the value head."""

    reset_seeds: Any
    advantages: Any
    use_value: bool


ALGORITHMS = {
    "ppo": Algorithm(reset_seeds=_one_seed, advantages=_gae_advantages, use_value=True),  # chunk-level GAE
    "grpo": Algorithm(reset_seeds=_grouped_seeds, advantages=_group_advantages, use_value=False),  # group success
}


def rollout_metrics(batch: TrajectoryBatch) -> dict:
    ended = batch.episode_success
    return {
        "env_steps": batch.env_steps,
        # one episode per env, from the iteration's reset: unbiased (see first_episode_success)
        "success_once": float(batch.first_episode_success.float().mean()),
        "success_finished_episodes": float(np.mean(ended)) if ended else float("nan"),
        "episodes": len(ended),
        "return": float(np.mean(batch.episode_returns)) if ended else float("nan"),
        "episode_length": float(np.mean(batch.episode_lengths)) if ended else float("nan"),
        "reward_per_chunk": float(batch.rewards.mean()),
    }


def exploration_metrics(batch: TrajectoryBatch, processor: Processor) -> dict:
    """How far exploration moves the robot per step, in the env's units."""
    explore = exploration_std_raw(batch.chain, batch.mask_dims, processor.action_scale())
    return {"explore_std_raw": float(np.mean(explore)), "explore_std_raw_per_dim": [round(x, 6) for x in explore]}


def save_episodes(path: Path, result: dict) -> None:
    """An evaluation's per-episode rows (seed, success, return, length), atomically, in the layout of
    `pirl eval`'s results.json: `bench/paired.py` compares two of them on the same seeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, default=float))
    os.replace(tmp, path)


def load_episode_outcomes(path) -> dict[int, bool]:
    """seed -> success of one evaluation file (`save_episodes`, or `pirl eval`'s results.json, or the
    directory holding it): what `bench/paired.py` and `bench/heldout.py` compare seed by seed."""
    file = Path(path) / "results.json" if Path(path).is_dir() else Path(path)
    return {int(e["seed"]): bool(e["success"]) for e in json.loads(file.read_text())["per_episode"]}


def eval_metrics(result: dict) -> dict:
    return {"eval_success_rate": result["success_rate"], "eval_success_ci95": result["success_ci95"],
            "eval_episodes": result["episodes"], "eval_successes": result["successes"],
            "eval_return": result["mean_return"]}


def rollout_configs(cfg: RLConfig):
    """(PlacementConfig, LearnerConfig, WorkerPoolConfig) of a run: each takes the `cluster` fields of its
    own names; the seed, gradient clip and per-role call timeouts come from elsewhere in the run config."""
    from rollout.learner import LearnerConfig
    from rollout.placement import PlacementConfig
    from rollout.worker import WorkerPoolConfig

    cluster = dataclasses.asdict(cfg.cluster)

    def pick(cls, **rest):
        return cls(**{f.name: cluster[f.name] for f in dataclasses.fields(cls) if f.name in cluster}, **rest)

    return (pick(PlacementConfig),
            pick(LearnerConfig, grad_clip=cfg.optim.max_grad_norm, seed=cfg.run.seed,
                 call_timeout_s=cfg.cluster.learner_call_timeout_s),
            pick(WorkerPoolConfig, seed=cfg.run.seed, call_timeout_s=cfg.cluster.worker_call_timeout_s))
