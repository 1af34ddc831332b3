"""`pirl critic`: fit a chunked Q critic (IQL-style, METHODS.md §5) on the frozen features of a policy.

One readable loop: the policy's features of every dataset observation are computed once
(`pirl.critic.data`), then every step samples a minibatch of chunk transitions and
    V   <- expectile(min_j Qbar_j(s, a) - V(s), kappa)
    Q_j <- (Q_j(s, a) - y)^2,  y = sum_{i<h} gamma^i r + gamma^h m V(s')   (V not differentiated)
    Qbar <- Polyak(Qbar, Q, tau)
Checkpoints go to OUT/checkpoints/step_0005000 (the step, 7 digits) (atomic directories: critic + optimizer + sampler
state); the latest is resumed when the same command runs again. OUT/critic.{safetensors,json} is the
critic to use (`pirl.critic.q.load_critic`). OUT defaults to a sibling of the policy directory,
`<policy>_critic`: the policy checkpoint itself is never written to.

One process trains on the CPU. `accelerate launch -m pirl.cli critic ...` (or torchrun) runs it data
parallel: the ranks share the feature passes, then each holds every feature, draws its own minibatches
(`sampler_seed`) and trains a DDP-wrapped copy of the critic (gradients averaged over the ranks, so the
weights, and the Polyak targets that follow them, stay identical); the main process alone logs and
writes checkpoints, the cache and the final critic.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pirl.config import check_device
from pirl.critic.data import REWARDS, CriticData, build_critic_data
from pirl.critic.q import (
    ChunkCritic,
    CriticConfig,
    chunk_td_target,
    expectile_loss,
    feature_dim,
    file_ident,
    load_critic,
    policy_config_dict,
    polyak_update,
    read_critic_meta,
    resolve_feature_source,
    save_critic,
)
from pirl.train.logger import MetricLogger, logging_redirect_tqdm, progress_bar

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CriticTrainConfig:
    checkpoint: str = ""
    """The policy whose frozen features the critic reads (a pirl policy directory)."""
    data: tuple[str, ...] = ()
    """LeRobot dataset roots (`pirl collect`, `pirl demos`, ...), read together."""
    out: str | None = None
    """Output directory; None = `<checkpoint>_critic`, next to the policy directory."""
    cameras: dict = dataclasses.field(default_factory=dict)
    """Model camera name -> dataset camera key (as in `pirl sft`); cameras left out are fed as missing."""
    horizon: int = 5
    """h: executed steps per chunk the critic scores; set it to the n_exec guidance will execute."""
    gamma: float = 0.99
    """Per-step discount (a chunk bootstraps with gamma^h)."""
    expectile: float = 0.9
    """kappa of V's expectile regression towards min_j Qbar_j (METHODS.md §5)."""
    tau: float = 0.005
    """Polyak rate of the target Q heads."""
    reward: str = "success"
    """success: 1 at the first solved step (every dataset, demos included, gets the same reward);
    env: the recorded env reward (RL data only)."""
    reward_scale: float = 1.0
    starts: str = "all"
    """all: a transition starts at every step (Q-chunking); chunks: only where a policy chunk
    started (recorded by `pirl collect`; fixed cuts of h steps in data without boundaries)."""
    feature_source: str = "auto"
    """auto | expert | prefix | both (pirl.critic.q: auto = expert for π0, prefix for π0.5)."""
    hidden: tuple[int, ...] = (256, 256)
    num_q: int = 2
    layer_norm: bool = True
    steps: int = 20_000
    batch_size: int = 256
    """Transitions per step and process: a data-parallel step averages the gradients of N * batch_size."""
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    val_fraction: float = 0.1
    """Fraction of episodes held out to report the TD error on (0 = none)."""
    feature_batch: int = 256
    """Observations per policy pass while precomputing features."""
    device: str = "cpu"
    """Where the policy computes the features (e.g. cuda: bf16 there; each rank its own GPU in a
    data-parallel run). One process trains the critic on the CPU; the ranks of a data-parallel run on
    their accelerate device (their GPU, or the CPU)."""
    seed: int = 0
    """Critic init and validation split (the same on every rank); minibatches: `sampler_seed`."""
    log_every: int = 500
    save_every: int = 5000
    resume: bool = True
    """Continue from the latest checkpoint in OUT (same policy and data) if there is one."""
    wandb: bool = False
    wandb_project: str = "pirl"

    def __post_init__(self) -> None:
        if self.reward not in REWARDS:
            raise ValueError(f"critic: reward must be one of {REWARDS}, got {self.reward!r}")
        if self.starts not in ("all", "chunks"):
            raise ValueError(f"critic: starts must be all or chunks, got {self.starts!r}")
        if not 0.0 < self.expectile < 1.0 or not 0.0 <= self.tau <= 1.0 or not 0.0 < self.gamma <= 1.0:
            raise ValueError("critic: need 0 < expectile < 1, 0 <= tau <= 1, 0 < gamma <= 1")
        if self.horizon < 1 or self.steps < 0 or self.batch_size < 1:
            raise ValueError("critic: horizon and batch_size must be >= 1, steps >= 0")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"critic: val_fraction must be in [0, 1), got {self.val_fraction}")
        check_device(self.device, "device")

    @property
    def out_dir(self) -> Path:
        return Path(self.out) if self.out else Path(str(self.checkpoint).rstrip("/") + "_critic")


# -- one update (METHODS.md §5) -------------------------------------------------------------------------
def critic_loss(critic: ChunkCritic, data: CriticData, index: Tensor, gamma: float, kappa: float,
                reward_scale: float = 1.0) -> tuple[Tensor, dict[str, Tensor]]:
    """V's expectile loss towards min_j Qbar_j plus every Q head's squared TD error, for the
    transitions `index` of `data`."""
    obs, nxt = data.obs[index], data.next_obs[index]
    emb = critic.embed(data.features[obs], data.state[obs])
    chunk = data.actions[index]
    with torch.no_grad():
        q_target = critic.q(emb, chunk, target=True)
        next_v = critic.v(critic.embed(data.features[nxt], data.state[nxt]))
        y = chunk_td_target(data.rewards[index] * reward_scale, data.terminated[index], next_v, gamma)
    v = critic.v(emb)
    v_loss = expectile_loss(q_target - v, kappa)
    q = critic.q_all(emb, chunk)
    q_loss = (q - y).pow(2).mean(-1).sum()
    metrics = {"v_loss": v_loss.detach(), "q_loss": q_loss.detach(), "q_mean": q.detach().mean(),
               "v_mean": v.detach().mean(), "target_mean": y.mean()}
    return v_loss + q_loss, metrics


class CriticLoss(torch.nn.Module):
    """`critic_loss` as a module's forward: DDP all-reduces the gradients of a backward only through
    its wrapper's forward, so the data-parallel run wraps this, not the critic."""

    def __init__(self, critic: ChunkCritic):
        super().__init__()
        self.critic = critic

    def forward(self, data: CriticData, index: Tensor, gamma: float, kappa: float, reward_scale: float):
        return critic_loss(self.critic, data, index, gamma, kappa, reward_scale)


def train_step(critic: ChunkCritic, optimizer: torch.optim.Optimizer, data: CriticData, index: Tensor, gamma: float,
               kappa: float, tau: float, grad_clip: float, reward_scale: float = 1.0,
               loss_fn: torch.nn.Module | None = None) -> dict[str, float]:
    """One update of `critic`. loss_fn: `CriticLoss(critic)`, DDP-wrapped in a data-parallel run; the
    Polyak step then follows weights identical on every rank, so the targets stay identical too."""
    loss_fn = CriticLoss(critic) if loss_fn is None else loss_fn
    loss, metrics = loss_fn(data, index, gamma, kappa, reward_scale)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(trainable(critic), grad_clip)
    optimizer.step()
    polyak_update(critic.target_heads, critic.q_heads, tau)
    return {**{k: float(v) for k, v in metrics.items()}, "grad_norm": float(grad_norm)}


def trainable(critic: ChunkCritic) -> list[torch.nn.Parameter]:
    """Q heads and V (the target heads move by Polyak averaging only)."""
    return [*critic.q_heads.parameters(), *critic.v_head.parameters()]


def make_optimizer(critic: ChunkCritic, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(trainable(critic), lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def td_error(critic: ChunkCritic, data: CriticData, gamma: float, reward_scale: float = 1.0,
             batch: int = 4096) -> float:
    """Mean squared TD error of min_j Q over `data` (the validation metric)."""
    if not len(data):
        return float("nan")
    total = 0.0
    for lo in range(0, len(data), batch):
        index = torch.arange(lo, min(lo + batch, len(data)))
        obs, nxt = data.obs[index], data.next_obs[index]
        emb = critic.embed(data.features[obs], data.state[obs])
        y = chunk_td_target(data.rewards[index] * reward_scale, data.terminated[index],
                            critic.v(critic.embed(data.features[nxt], data.state[nxt])), gamma)
        total += float((critic.q(emb, data.actions[index]) - y).pow(2).sum())
    return total / len(data)


def split_episodes(data: CriticData, fraction: float, seed: int) -> tuple[CriticData, CriticData]:
    """(train, validation): a random `fraction` of whole episodes held out."""
    episodes = data.episode.unique()
    n_val = int(round(fraction * len(episodes))) if len(episodes) > 1 else 0
    order = episodes[torch.randperm(len(episodes), generator=torch.Generator().manual_seed(seed))]
    val = torch.isin(data.episode, order[:n_val])
    return data.subset(~val), data.subset(val)


# -- checkpoints ----------------------------------------------------------------------------------------
def latest_checkpoint(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("step_*"))
    found = [p for p in found if (p / "critic.json").exists() and (p / "train_state.pt").exists()]
    return found[-1] if found else None


def save_checkpoint(out: Path, critic: ChunkCritic, optimizer, sampler_states: list[Tensor], step: int,
                    metadata: dict) -> Path:
    """sampler_states: every rank's minibatch generator state, in rank order (one in a single process)."""
    from vla.checkpoint import atomic_directory

    path = out / "checkpoints" / f"step_{step:07d}"
    with atomic_directory(path) as tmp:
        save_critic(tmp, critic, {**metadata, "step": step})
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "generators": sampler_states},
                   tmp / "train_state.pt")
    return path


def sampler_seed(seed: int, rank: int) -> int:
    """Seed of rank `rank`'s minibatch generator: ranks draw different minibatches; rank 0 (and a
    single process) draws from `seed` itself."""
    return seed + 1000 * rank


def _sampler_state(state: dict, seed: int, step: int, rank: int, world: int) -> Tensor:
    """This rank's generator state from a checkpoint's train_state (older ones hold one `generator`).
    Resumed with another number of processes, every rank restarts from a fresh seed (a valid run, not
    the minibatches an uninterrupted one would have drawn)."""
    states = state.get("generators") or [state["generator"]]
    if len(states) == world:
        return states[rank]
    log.warning("critic: checkpoint of %d process(es), resumed on %d: minibatches drawn from fresh seeds",
                len(states), world)
    return torch.Generator().manual_seed(sampler_seed(seed, rank) + step).get_state()


def _metadata(cfg: CriticTrainConfig, policy) -> dict:
    return {"policy_checkpoint": str(cfg.checkpoint), "policy_ident": file_ident(cfg.checkpoint),
            "policy_config": policy_config_dict(policy), "data": [str(d) for d in cfg.data],
            "train_config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str))}


# -- the command ----------------------------------------------------------------------------------------
def _checked_out_dir(cfg: CriticTrainConfig) -> Path:
    """The output directory, after the checks that need no loading (one clear line each)."""
    if not cfg.checkpoint:
        raise ValueError("critic: checkpoint= is required (the policy whose features the critic reads)")
    if not (Path(cfg.checkpoint) / "config.json").exists():
        raise FileNotFoundError(f"critic: no policy checkpoint at {cfg.checkpoint} (no config.json)")
    if not cfg.data:
        raise ValueError("critic: data= is required (one or more LeRobot dataset roots, e.g. from `pirl collect`)")
    out = cfg.out_dir
    if out.resolve() == Path(cfg.checkpoint).resolve() or Path(cfg.checkpoint).resolve() in out.resolve().parents:
        raise ValueError(f"critic: out={out} is inside the policy checkpoint; write the critic next to it")
    return out


def _resumable(cfg: CriticTrainConfig, out: Path, metadata: dict) -> Path | None:
    """OUT's latest checkpoint when resuming, checked to belong to the same policy and data."""
    resume_from = latest_checkpoint(out) if cfg.resume else None
    if resume_from is not None:
        stored = read_critic_meta(resume_from)["metadata"]
        if stored.get("policy_ident") != metadata["policy_ident"]:
            raise ValueError(f"critic: {out} holds a critic of {stored.get('policy_checkpoint')}, not of "
                             f"{cfg.checkpoint}; pass another out= or resume=false")
        if stored.get("data") != metadata["data"]:
            raise ValueError(f"critic: {out} was trained on data {stored.get('data')}, not {metadata['data']}; "
                             "pass another out= or resume=false")
    return resume_from


def _start(cfg: CriticTrainConfig, config: CriticConfig, policy, train_data, resume_from: Path | None,
           accelerator, device: torch.device):
    """(critic on `device`, optimizer, this rank's sampling generator, first step): fresh, or exactly
    where a checkpoint left off."""
    rank, world = accelerator.process_index, accelerator.num_processes
    generator = torch.Generator().manual_seed(sampler_seed(cfg.seed, rank))
    if resume_from is None:
        torch.manual_seed(cfg.seed)
        critic = ChunkCritic(config)
        critic.set_feature_stats(train_data.features[train_data.obs.unique()])
        critic.to(device)
        return critic, make_optimizer(critic, cfg.lr, cfg.weight_decay), generator, 0
    critic = load_critic(resume_from, policy, device=device)
    if critic.config != config:
        raise ValueError(f"critic: {resume_from} has config {critic.config}, this run asks for {config}")
    critic.train()
    optimizer = make_optimizer(critic, cfg.lr, cfg.weight_decay)
    state = torch.load(resume_from / "train_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(_sampler_state(state, cfg.seed, int(state["step"]), rank, world))
    log.info("critic: resuming from %s at step %d", resume_from, int(state["step"]))
    return critic, optimizer, generator, int(state["step"])


# -- processes ------------------------------------------------------------------------------------------
def _make_accelerator():
    """The process group of `accelerate launch` / torchrun (a lone process without them). CPU or GPU by
    `pirl sft`'s rule, since one AcceleratorState per Python process must agree; placement is ours."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), device_placement=False)
    if accelerator.state.deepspeed_plugin is not None:
        raise ValueError("critic: DeepSpeed has nothing to shard in the critic's small MLPs; launch without "
                         "--use_deepspeed (plain data parallel)")
    if not accelerator.is_main_process:
        logging.getLogger("pirl").setLevel(logging.WARNING)  # one copy of every info line: the main's
    return accelerator


def _devices(cfg: CriticTrainConfig, accelerator) -> tuple[str, torch.device]:
    """(policy device for the features, critic training device). One process: `cfg.device` and the CPU,
    as ever. Ranks of a data-parallel run: each its own GPU for device=cuda, and train on the
    accelerate device, where their DDP backend communicates (NCCL: GPU; gloo: CPU)."""
    if accelerator.num_processes == 1:
        return cfg.device, torch.device("cpu")
    own_gpu = cfg.device.startswith("cuda") and accelerator.device.type == "cuda"
    return (str(accelerator.device) if own_gpu else cfg.device), accelerator.device


def _same_on_every_rank(accelerator, value, what: str) -> None:
    """Ranks that disagree (a checkpoint only some of them see) would wait forever in a collective."""
    from accelerate.utils import gather_object

    values = gather_object([value])
    if len(set(values)) > 1:
        raise ValueError(f"critic: the ranks disagree on {what} ({values}): OUT must be one directory every "
                         "rank reads (a shared filesystem)")


def _sampler_states(accelerator, generator: torch.Generator) -> list[Tensor]:
    """Every rank's generator state, on every rank (a collective: all ranks call it at the same step)."""
    from accelerate.utils import gather_object

    return gather_object([generator.get_state()])


# -- the command ----------------------------------------------------------------------------------------
def train_critic(cfg: CriticTrainConfig) -> Path:
    """Runs `pirl critic`; returns OUT (holding critic.safetensors and critic.json). Every rank of a
    data-parallel run calls it and returns OUT once the main process has written it."""
    from pirl.train.common import load_bundle, set_seed

    out = _checked_out_dir(cfg)
    accelerator = _make_accelerator()
    feature_device, device = _devices(cfg, accelerator)
    set_seed(cfg.seed)
    policy, processor = load_bundle(cfg.checkpoint, device=feature_device)
    policy.requires_grad_(False)
    source = resolve_feature_source(policy, cfg.feature_source)
    metadata = _metadata(cfg, policy)
    resume_from = _resumable(cfg, out, metadata)

    started = time.perf_counter()
    data = build_critic_data(policy, processor, list(cfg.data), cfg.horizon, reward=cfg.reward, starts=cfg.starts,
                             cameras=cfg.cameras, feature_source=source, batch_size=cfg.feature_batch,
                             cache=out / "features.pt", policy_ident=metadata["policy_ident"],
                             accelerator=accelerator)
    feature_seconds = time.perf_counter() - started
    log.info("critic: %s; features (%s) of %d observations in %.1f s", data.summary(), source, len(data.features),
             feature_seconds)
    train_data, val_data = split_episodes(data, cfg.val_fraction, cfg.seed)
    if not len(train_data):
        raise ValueError("critic: no training transitions left after the validation split (lower val_fraction)")

    config = CriticConfig(feature_dim=feature_dim(policy, source), state_dim=processor.norm_stats["state"].dim,
                          horizon=cfg.horizon, action_dims=processor.action_dims, feature_source=source,
                          hidden=tuple(cfg.hidden), num_q=cfg.num_q, layer_norm=cfg.layer_norm)
    critic, optimizer, generator, start_step = _start(cfg, config, policy, train_data, resume_from, accelerator,
                                                      device)
    _same_on_every_rank(accelerator, start_step, "the step to resume from")
    loss_fn = accelerator.prepare(CriticLoss(critic))  # DDP when there are several processes, else itself
    run = _Run(cfg, out, metadata, accelerator, critic, optimizer, generator, val_data.to(device))
    run.train(loss_fn, train_data.to(device), start_step)
    run.finish(max(cfg.steps, start_step), {"data_summary": data.summary(),
                                             "feature_seconds": round(feature_seconds, 2),
                                             "processes": accelerator.num_processes})
    accelerator.wait_for_everyone()
    return out


@dataclasses.dataclass
class _Run:
    """The training loop's state and its outputs; the main process alone logs and writes."""

    cfg: CriticTrainConfig
    out: Path
    metadata: dict
    accelerator: object
    critic: ChunkCritic
    optimizer: torch.optim.Optimizer
    generator: torch.Generator
    val_data: CriticData
    loop_started: float = 0.0

    @property
    def main(self) -> bool:
        return self.accelerator.is_main_process

    def train(self, loss_fn: torch.nn.Module, train_data: CriticData, start_step: int) -> None:
        cfg = self.cfg
        logger = self._open_logger() if self.main else None
        history: list[dict[str, float]] = []
        self.loop_started = time.perf_counter()
        with self._console(start_step) as bar:
            for step in range(start_step, cfg.steps):
                index = torch.randint(len(train_data), (min(cfg.batch_size, len(train_data)),),
                                      generator=self.generator).to(train_data.obs.device)
                history.append(train_step(self.critic, self.optimizer, train_data, index, cfg.gamma, cfg.expectile,
                                          cfg.tau, cfg.grad_clip, cfg.reward_scale, loss_fn=loss_fn))
                if self.main:
                    bar.update(1)
                    if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                        self._log(logger, bar, step, start_step, history)
                if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                    self.save(step + 1)
        if logger is not None:
            logger.close()

    def save(self, step: int) -> None:
        """A checkpoint (every rank calls it: it gathers their sampler states)."""
        states = _sampler_states(self.accelerator, self.generator)
        if self.main:
            save_checkpoint(self.out, self.critic, self.optimizer, states, step, self.metadata)

    def finish(self, step: int, summary: dict) -> None:
        """The last checkpoint and OUT/critic.* (every rank calls it)."""
        self.save(step)
        if self.main:
            cfg = self.cfg
            save_critic(self.out, self.critic.eval(), {
                **self.metadata, "step": step, **summary,
                "train_seconds": round(time.perf_counter() - self.loop_started, 2),
                "val_td_mse": td_error(self.critic, self.val_data, cfg.gamma, cfg.reward_scale)})
            log.info("critic: wrote %s", self.out)

    def _open_logger(self) -> MetricLogger:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(json.dumps(self.metadata["train_config"], indent=2))
        return MetricLogger(self.out, use_wandb=self.cfg.wandb, project=self.cfg.wandb_project,
                            config=self.metadata["train_config"])

    @contextlib.contextmanager
    def _console(self, start_step: int):
        """The progress bar (None off the main process), with logging routed around it."""
        if not self.main:
            yield None
            return
        with logging_redirect_tqdm(), progress_bar(self.cfg.steps, "critic", initial=start_step, unit="step") as bar:
            yield bar

    def _log(self, logger: MetricLogger, bar, step: int, start_step: int, history: list[dict[str, float]]) -> None:
        """A metrics line: the main rank's own minibatches' losses, the TD error on held-out episodes."""
        cfg = self.cfg
        recent = {k: float(np.mean([h[k] for h in history[-cfg.log_every:]])) for k in history[-1]}
        record = {"critic_step": step + 1, **recent,
                  "val_td_mse": td_error(self.critic, self.val_data, cfg.gamma, cfg.reward_scale),
                  "steps_per_s": (step + 1 - start_step) / (time.perf_counter() - self.loop_started)}
        logger.file.write(json.dumps(record) + "\n")
        logger.file.flush()
        if logger.wandb is not None:
            logger.wandb.log(record, step=step + 1)
        bar.set_postfix_str(f"q {recent['q_loss']:.4f} v {recent['v_loss']:.4f}")
        log.info("critic step %d/%d  q_loss %.4f  v_loss %.4f  Q %.3f  val_td %.4f  %.0f steps/s", step + 1,
                 cfg.steps, recent["q_loss"], recent["v_loss"], recent["q_mean"], record["val_td_mse"],
                 record["steps_per_s"])
