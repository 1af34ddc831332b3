"""Flow-matching behaviour cloning (SFT) of a π0 / π0.5 policy on a LeRobot-format dataset.

One readable loop: sample a batch of (observation, action chunk) -> processor -> flow-matching loss on
real action dims and in-episode steps (METHODS.md §1) -> AdamW step with warm-up and cosine decay.
Runs in one process, or on several GPUs with `accelerate launch [--use_deepspeed] -m pirl.cli sft ...`
(the Accelerator wraps model, optimizer and backward; nothing else changes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from pirl.train.common import (
    build_model_config,
    dataset_norm_stats,
    make_processor_from_dataset,
    set_seed,
    set_trainable,
)
from pirl.train.logger import logging_redirect_tqdm, progress_bar
from vla.checkpoint import import_checkpoint, save_policy, validate_rollout
from vla.policy import FlowPolicy

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    dataset: str | list[str] = ""
    """Root of a LeRobot-format dataset (v2.x or v3.0), e.g. one written by `pirl demos`, or a list of
    roots read as one dataset (`dataset=[data/a,data/b]`: same state/action sizes and cameras)."""
    model: dict = dataclasses.field(default_factory=lambda: {"variant": "pi0"})
    """Fields of vla.config.ModelConfig (the Hydra group configs/model/: `model=tiny_maniskill_state`)."""
    init_checkpoint: str | None = None
    """Start from these weights (pirl / openpi / LeRobot directory); None = random init."""
    tokenizer: str | None = None
    """Directory or file of a SentencePiece tokenizer.model; None builds the tiny test tokenizer
    (only sensible for tiny models)."""
    cameras: dict = dataclasses.field(default_factory=dict)
    """Model camera name -> dataset camera key; cameras left out are fed as missing (masked)."""
    output_dir: str = "runs/sft"
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    """Peak learning rate (openpi fine-tunes π0 at 2.5e-5; the tiny model wants much more)."""
    weight_decay: float = 0.01
    warmup_steps: int = 100
    grad_clip: float = 1.0
    trainable: str = "all"
    """"all", or "expert": the action expert, its projections and heads (the VLM frozen)."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the trained weights, ema <- d * ema + (1 - d) * w after
    every step, and write it (not the raw weights) to every checkpoint; None = no average. openpi
    trains π0 with d = 0.99. Closed-loop success of a behaviour-cloned policy moves a lot from one
    checkpoint to the next (bench/results/sft_recipe.md); the average damps that."""
    state_floor_frac: float = 0.25
    """Each state dim's std is floored at this fraction of the median std over dims (METHODS.md §2):
    a dim near-constant in the demos (a cube's tilt, std 0.001) cannot then map a small real deviation
    to tens of stds. Recorded in the checkpoint's norm_stats.json. 0 = no floor."""
    state_drop_frac: float = 0.05
    """State dims whose std is below this fraction of the median std are fed as 0 (nothing in the demos
    to learn from them). 0 = keep every dim."""
    state_drop: list[int] = dataclasses.field(default_factory=list)
    """State dims fed as 0, named by index, on top of the near-constant ones: dims whose test-time values
    leave the demos' range for reasons the demos never show. On PickCube the finger joint velocities
    (16, 17): in every failed episode of the first robust start they sat at the clip (8-27 demo stds
    raw) while the commanded hand motion collapsed to ~1-2 mm per step (bench/results/README.md)."""
    state_clip: float | None = 3.0
    """Normalised state values are clipped to [-clip, clip]; None = no symmetric clip."""
    state_range_margin: float | None = None
    """Each normalised state dim is clipped to the demos' [min, max] widened by this many normalised
    units; None = no per-dim range clip. A clip at ±3 also cuts what the demos hold (the cube's height
    at high goals, beyond 3 stds in 3.7% of PickCube frames); with `state_clip=null
    state_range_margin=0.5` instead, the PickCube start scored 67/128 against 70/128 (no difference)."""
    state_noise: float = 0.0
    """Std of Gaussian noise added to the normalised state during training (augmentation, in
    normalised units; dropped dims stay 0). Makes the policy less sensitive to off-demo states."""
    seed: int = 0
    log_every: int = 100
    save_every: int = 1000
    rollout: dict = dataclasses.field(default_factory=dict)
    """Settings written to every checkpoint's rollout.json, which `pirl eval` / `collect` / `serve` take
    as their defaults: env (a configs/env section, e.g. {task: PickCube-v1, max_episode_steps: 100}),
    num_steps (K), n_exec, camera_map (default: `cameras`)."""


def lr_at(step: int, cfg: SFTConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def check_ema_decay(decay: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {decay}")


def ema_update(average: list[torch.Tensor], weights: list[torch.Tensor], decay: float) -> None:
    """average <- decay * average + (1 - decay) * weights, in place, tensor by tensor.

    After n updates towards constant weights w from a0: average = w + decay**n * (a0 - w).
    """
    check_ema_decay(decay)
    with torch.no_grad():
        torch._foreach_lerp_(average, [w.detach().to(a.dtype) for w, a in zip(weights, average)], 1.0 - decay)


@contextlib.contextmanager
def weights_replaced(params: list[torch.nn.Parameter], replacement: list[torch.Tensor]):
    """Temporarily copies `replacement` into `params` (e.g. to save the EMA weights); restores them after."""
    kept = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, r in zip(params, replacement):
            p.copy_(r)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, k in zip(params, kept):
                p.copy_(k)


def train_sft(cfg: SFTConfig) -> Path:
    """Runs SFT; returns the final checkpoint directory."""
    _check_config(cfg)
    accelerator = _make_accelerator()
    set_seed(cfg.seed + accelerator.process_index)
    out = Path(cfg.output_dir)
    model_cfg = build_model_config(cfg.model)
    dataset, processor, tokenizer_file, state_noise_mask = _dataset_and_processor(cfg, model_cfg, out)
    noise_gen = torch.Generator().manual_seed(cfg.seed + 7 + accelerator.process_index)
    policy = _initial_policy(cfg, model_cfg)
    params = set_trainable(policy, cfg.trainable)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    model = accelerator.unwrap_model(policy)
    ema = _initial_ema(cfg, accelerator, params)
    rng = np.random.default_rng(cfg.seed + 1000 * accelerator.process_index)
    dim_mask = processor.dim_mask().to(accelerator.device)
    started, losses = time.perf_counter(), []
    rollout = validate_rollout({**({"camera_map": dict(cfg.cameras)} if cfg.cameras else {}), **cfg.rollout},
                               "sft rollout=")

    def save(path: Path, metadata: dict) -> None:
        _write_checkpoint(path, model, params, ema, processor, tokenizer_file, rollout, metadata)

    with _console(accelerator.is_main_process, cfg.steps) as bar:
        for step in range(cfg.steps):
            batch = dataset.sample_batch(cfg.batch_size, rng)
            inputs, actions, step_mask = _batch_tensors(batch, cfg, processor, state_noise_mask, noise_gen,
                                                        accelerator.device)
            loss = _optimizer_step(policy, optimizer, accelerator, params, lr_at(step, cfg), cfg.grad_clip,
                                   (inputs, actions, dim_mask, step_mask))
            if ema is not None:
                ema_update(ema, params, cfg.ema_decay)
            losses.append(loss.item())
            if accelerator.is_main_process:
                _report_progress(bar, step, cfg, losses, started)
                if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                    save(out / "checkpoints" / f"step_{step + 1:07d}",
                         {"sft_step": step + 1, "ema_decay": cfg.ema_decay})
    final = out / "final"
    if accelerator.is_main_process:
        save(final, {"sft_step": cfg.steps, "sft_config": dataclasses.asdict(cfg), "ema_decay": cfg.ema_decay,
                     "final_loss": float(np.mean(losses[-cfg.log_every:]))})
        log.info("sft: wrote %s", final)
    accelerator.wait_for_everyone()
    return final


def _check_config(cfg: SFTConfig) -> None:
    if not cfg.dataset:
        raise ValueError("sft: dataset= is required (a LeRobot dataset root, e.g. from `pirl demos`)")
    if cfg.state_noise < 0:
        raise ValueError(f"sft: state_noise must be >= 0, got {cfg.state_noise}")


def _make_accelerator():
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # Some weights never reach the loss: the expert reads only the keys/values of the VLM's last layer,
    # so that layer's o_proj, MLP and the final norm get no gradient. DDP must not wait for them.
    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])


def _dataset_and_processor(cfg: SFTConfig, model_cfg, out: Path):
    """(dataset, processor with the robust norm stats, tokenizer file, state noise mask [state_width]):
    the mask is 1 on the real state dims the processor does not drop, where state_noise applies."""
    from envs.dataset import SFTChunkDataset

    roots = cfg.dataset if isinstance(cfg.dataset, str) else [str(root) for root in cfg.dataset]
    dataset = SFTChunkDataset(roots, model_cfg.action_horizon,
                              cameras=list(cfg.cameras.values()))
    stats = dataset_norm_stats(model_cfg, dataset, cfg.state_floor_frac, cfg.state_drop_frac, cfg.state_clip,
                               cfg.state_drop, cfg.state_range_margin)
    processor, tokenizer_file = make_processor_from_dataset(model_cfg, dataset, cfg.tokenizer, out, stats)
    if stats["state"].drop:
        log.info("sft: state dims %s (near-constant in the data, or in state_drop) are fed as 0",
                 list(stats["state"].drop))
    state_noise_mask = torch.zeros(model_cfg.state_width)
    state_noise_mask[: stats["state"].dim] = 1.0
    state_noise_mask[list(stats["state"].drop)] = 0.0
    return dataset, processor, tokenizer_file, state_noise_mask


def _initial_policy(cfg: SFTConfig, model_cfg) -> FlowPolicy:
    """The weights of init_checkpoint, or a random init."""
    if not cfg.init_checkpoint:
        return FlowPolicy(model_cfg)
    policy, _, report = import_checkpoint(cfg.init_checkpoint, model_cfg, home_preprocessing=False)
    if report.unused_keys:
        log.info("init checkpoint: ignored unused weights %s", report.unused_keys)
    return policy


def _initial_ema(cfg: SFTConfig, accelerator, params: list[torch.nn.Parameter]) -> list[torch.Tensor] | None:
    """float32 copies of the trained weights to average into, or None without ema_decay."""
    if cfg.ema_decay is None:
        return None
    plugin = accelerator.state.deepspeed_plugin
    if plugin is not None and plugin.zero_stage == 3:
        raise ValueError("sft: ema_decay needs whole parameters on each rank; use ZeRO stage <= 2")
    check_ema_decay(cfg.ema_decay)
    return [p.detach().float().clone() for p in params]


@contextlib.contextmanager
def _console(is_main: bool, steps: int):
    """The progress bar (None off the main process), with logging routed around it."""
    if not is_main:
        yield None
        return
    with logging_redirect_tqdm(), progress_bar(steps, "sft", unit="step") as bar:
        yield bar


def _batch_tensors(batch: dict, cfg: SFTConfig, processor, state_noise_mask: torch.Tensor,
                   noise_gen: torch.Generator, device) -> tuple:
    """One sampled batch -> (model inputs, state noise added; normalised action chunk; in-episode step mask)."""
    obs = {"images": {m: batch["images"][d] for m, d in cfg.cameras.items()},
           "state": batch["state"], "prompt": batch["prompt"]}
    inputs = processor(obs)
    if cfg.state_noise > 0:
        inputs.state = inputs.state + cfg.state_noise * state_noise_mask * torch.randn(
            inputs.state.shape, generator=noise_gen)
    inputs = inputs.to(device)
    actions = torch.from_numpy(processor.normalize_actions(batch["actions"])).to(device)
    step_mask = torch.from_numpy(batch["action_valid"]).to(device)
    return inputs, actions, step_mask


def _optimizer_step(policy, optimizer, accelerator, params, lr: float, grad_clip: float, loss_args: tuple
                    ) -> torch.Tensor:
    """One AdamW step at learning rate `lr` on the flow-matching loss policy(*loss_args); returns the loss."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = policy(*loss_args)  # through the wrapper: gradients all-reduced
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    accelerator.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss


def _report_progress(bar, step: int, cfg: SFTConfig, losses: list[float], started: float) -> None:
    bar.update(1)
    if step % 10 == 0:
        bar.set_postfix_str(f"loss {np.mean(losses[-50:]):.4f}")
    if (step + 1) % cfg.log_every == 0 or step == 0:
        rate = (step + 1) / (time.perf_counter() - started)
        log.info("sft step %d/%d  loss %.4f  lr %.2e  %.1f steps/s", step + 1, cfg.steps,
                 float(np.mean(losses[-cfg.log_every:])), lr_at(step, cfg), rate)


def _write_checkpoint(path: Path, model: FlowPolicy, params: list[torch.nn.Parameter], ema: list[torch.Tensor] | None,
                      processor, tokenizer_file, rollout: dict, metadata: dict) -> None:
    """Checkpoints hold the EMA weights when there is an average, the raw weights otherwise."""
    with weights_replaced(params, ema) if ema is not None else contextlib.nullcontext():
        save_policy(path, model, processor.norm_stats, metadata=metadata, tokenizer_file=tokenizer_file,
                    rollout=rollout)
