"""`pirl critic`: fit a chunked Q critic (IQL-style, METHODS.md §5) on the frozen features of a policy.

One readable loop, single process on the CPU: the policy's features of every dataset observation are
computed once (`pirl.critic.data`), then every step samples a minibatch of chunk transitions and
    V   <- expectile(min_j Qbar_j(s, a) - V(s), kappa)
    Q_j <- (Q_j(s, a) - y)^2,  y = sum_{i<h} gamma^i r + gamma^h m V(s')   (V not differentiated)
    Qbar <- Polyak(Qbar, Q, tau)
Checkpoints go to OUT/checkpoints/step_0005000 (the step, 7 digits) (atomic directories: critic + optimizer + sampler
state); the latest is resumed when the same command runs again. OUT/critic.{safetensors,json} is the
critic to use (`pirl.critic.q.load_critic`). OUT defaults to a sibling of the policy directory,
`<policy>_critic`: the policy checkpoint itself is never written to.
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
    lr: float = 3e-4
    weight_decay: float = 0.0
    grad_clip: float = 10.0
    val_fraction: float = 0.1
    """Fraction of episodes held out to report the TD error on (0 = none)."""
    feature_batch: int = 256
    """Observations per policy pass while precomputing features."""
    device: str = "cpu"
    """Where the policy computes the features (e.g. cuda: bf16 there); the critic trains on the CPU."""
    seed: int = 0
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


def train_step(critic: ChunkCritic, optimizer: torch.optim.Optimizer, data: CriticData, index: Tensor, gamma: float,
               kappa: float, tau: float, grad_clip: float, reward_scale: float = 1.0) -> dict[str, float]:
    loss, metrics = critic_loss(critic, data, index, gamma, kappa, reward_scale)
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


def save_checkpoint(out: Path, critic: ChunkCritic, optimizer, generator: torch.Generator, step: int,
                    metadata: dict) -> Path:
    from vla.checkpoint import atomic_directory

    path = out / "checkpoints" / f"step_{step:07d}"
    with atomic_directory(path) as tmp:
        save_critic(tmp, critic, {**metadata, "step": step})
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "generator": generator.get_state()},
                   tmp / "train_state.pt")
    return path


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


def _start(cfg: CriticTrainConfig, config: CriticConfig, policy, train_data, resume_from: Path | None):
    """(critic, optimizer, sampling generator, first step): fresh, or exactly where a checkpoint left off."""
    generator = torch.Generator().manual_seed(cfg.seed)
    if resume_from is None:
        torch.manual_seed(cfg.seed)
        critic = ChunkCritic(config)
        critic.set_feature_stats(train_data.features[train_data.obs.unique()])
        return critic, make_optimizer(critic, cfg.lr, cfg.weight_decay), generator, 0
    critic = load_critic(resume_from, policy)
    if critic.config != config:
        raise ValueError(f"critic: {resume_from} has config {critic.config}, this run asks for {config}")
    critic.train()
    optimizer = make_optimizer(critic, cfg.lr, cfg.weight_decay)
    state = torch.load(resume_from / "train_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    log.info("critic: resuming from %s at step %d", resume_from, int(state["step"]))
    return critic, optimizer, generator, int(state["step"])


def train_critic(cfg: CriticTrainConfig) -> Path:
    """Runs `pirl critic`; returns OUT (holding critic.safetensors and critic.json)."""
    from pirl.train.common import load_bundle, set_seed

    out = _checked_out_dir(cfg)
    set_seed(cfg.seed)
    policy, processor = load_bundle(cfg.checkpoint, device=cfg.device)
    policy.requires_grad_(False)
    source = resolve_feature_source(policy, cfg.feature_source)
    metadata = _metadata(cfg, policy)
    resume_from = _resumable(cfg, out, metadata)

    started = time.perf_counter()
    data = build_critic_data(policy, processor, list(cfg.data), cfg.horizon, reward=cfg.reward, starts=cfg.starts,
                             cameras=cfg.cameras, feature_source=source, batch_size=cfg.feature_batch,
                             cache=out / "features.pt", policy_ident=metadata["policy_ident"])
    feature_seconds = time.perf_counter() - started
    log.info("critic: %s; features (%s) of %d observations in %.1f s", data.summary(), source, len(data.features),
             feature_seconds)
    train_data, val_data = split_episodes(data, cfg.val_fraction, cfg.seed)
    if not len(train_data):
        raise ValueError("critic: no training transitions left after the validation split (lower val_fraction)")

    config = CriticConfig(feature_dim=feature_dim(policy, source), state_dim=processor.norm_stats["state"].dim,
                          horizon=cfg.horizon, action_dims=processor.action_dims, feature_source=source,
                          hidden=tuple(cfg.hidden), num_q=cfg.num_q, layer_norm=cfg.layer_norm)
    critic, optimizer, generator, start_step = _start(cfg, config, policy, train_data, resume_from)

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(metadata["train_config"], indent=2))
    logger = MetricLogger(out, use_wandb=cfg.wandb, project=cfg.wandb_project, config=metadata["train_config"])
    history: list[dict[str, float]] = []
    step = start_step
    loop_started = time.perf_counter()
    with contextlib.ExitStack() as console:
        console.enter_context(logging_redirect_tqdm())
        bar = console.enter_context(progress_bar(cfg.steps, "critic", initial=start_step, unit="step"))
        for step in range(start_step, cfg.steps):
            index = torch.randint(len(train_data), (min(cfg.batch_size, len(train_data)),), generator=generator)
            history.append(train_step(critic, optimizer, train_data, index, cfg.gamma, cfg.expectile, cfg.tau,
                                      cfg.grad_clip, cfg.reward_scale))
            bar.update(1)
            if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
                recent = {k: float(np.mean([h[k] for h in history[-cfg.log_every:]])) for k in history[-1]}
                record = {"critic_step": step + 1, **recent,
                          "val_td_mse": td_error(critic, val_data, cfg.gamma, cfg.reward_scale),
                          "steps_per_s": (step + 1 - start_step) / (time.perf_counter() - loop_started)}
                logger.file.write(json.dumps(record) + "\n")
                logger.file.flush()
                if logger.wandb is not None:
                    logger.wandb.log(record, step=step + 1)
                bar.set_postfix_str(f"q {recent['q_loss']:.4f} v {recent['v_loss']:.4f}")
                log.info("critic step %d/%d  q_loss %.4f  v_loss %.4f  Q %.3f  val_td %.4f  %.0f steps/s", step + 1,
                         cfg.steps, recent["q_loss"], recent["v_loss"], recent["q_mean"], record["val_td_mse"],
                         record["steps_per_s"])
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                save_checkpoint(out, critic, optimizer, generator, step + 1, metadata)
    logger.close()
    final_step = max(cfg.steps, start_step)
    save_checkpoint(out, critic, optimizer, generator, final_step, metadata)
    save_critic(out, critic.eval(), {**metadata, "step": final_step, "data_summary": data.summary(),
                                     "feature_seconds": round(feature_seconds, 2),
                                     "train_seconds": round(time.perf_counter() - loop_started, 2),
                                     "val_td_mse": td_error(critic, val_data, cfg.gamma, cfg.reward_scale)})
    log.info("critic: wrote %s", out)
    return out
