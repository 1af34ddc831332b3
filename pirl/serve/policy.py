"""What the server runs: a checkpoint turned into one function (observation rows, seeds) -> raw actions.

    ServedPolicy.from_config(cfg)
        .prepare(request)              -> Prepared (validated, processed row; RequestError if malformed)
        .infer(prepared rows)          -> float32 [B, H, d] raw actions, one forward pass for the batch
        .metadata                      -> the dict sent to every client on connect

`infer` goes through `pirl.train.rl_core.PolicyActor`, the same path `pirl eval` uses, with each row's
initial noise drawn from its own generator (`seeded_noise(seed, noise_index)`), so a request's actions do not
depend on the other requests batched with it, and equal the local policy's bit for bit (CPU, fp32).

Guidance hook: `build_sample_fn` is the one place where the `guidance` / `critic` options of
`pirl serve` turn into a sampler; everything else (batching, seeds, unnormalisation) is shared.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from typing import Any

import numpy as np
import torch

from pirl.serve.config import ServeConfig
from pirl.guidance.sampler import INPAINT_BETA, Inpainting
from pirl.serve.inputs import InputSpec, RequestError, parse_remaining
from pirl.train.rl_core import PolicyActor, seeded_noise, seeded_noise_stream

log = logging.getLogger(__name__)


def is_guided(guidance: Any) -> bool:
    return bool(guidance) and guidance.get("method", "none") != "none"


def build_sample_fn(policy, processor, num_steps: int, guidance: Any = None, critic: str | None = None,
                    checkpoint: str | None = None):
    """The sampler `(inputs, noise [B, H, D], generators) -> normalised chunk [B, H, D]` for these options.

    No guidance (None or method "none"): None, which `PolicyActor` reads as the plain policy's ODE sampler
    (`pirl eval`'s, the one real-time chunking steers). Otherwise the
    guided sampler of `pirl.guidance` (`GuidedSampler`, the one `pirl eval guidance=...` runs) with the
    critic loaded from `critic`; the prefix is computed once per batch inside it.
    """
    if not is_guided(guidance):
        if critic is not None:
            raise ValueError("serve: critic= is only used with guidance= (set both or neither)")
        return None
    from pirl.critic.q import load_critic
    from pirl.guidance.actor import GuidedSampler, guidance_config

    if critic is None:
        raise ValueError(f"serve: guidance={guidance['method']} needs critic=DIR (a critic written by `pirl critic`)")
    cfg = guidance_config(guidance, processor.norm_stats["actions"].resolved_mode(processor.norm_mode))
    device = next(policy.parameters()).device
    return GuidedSampler(policy, load_critic(critic, policy, device=device, policy_checkpoint=checkpoint), cfg,
                         num_steps)


def guidance_metadata(guidance: Any, critic: str | None) -> dict | None:
    if not is_guided(guidance):
        return None
    return {"settings": guidance, "critic": critic}


@dataclasses.dataclass
class Prepared:
    """One validated request: processed model inputs (batch of 1), its seed and noise index."""

    inputs: Any  # vla.inputs.ModelInputs, batch 1
    seed: int
    noise_index: int
    seed_given: bool
    remaining: np.ndarray | None = None  # real-time chunking: the current chunk's actions still to run [L, d]
    delay: int = 0  # ... of which this many run before the new chunk takes over
    beta: float = 0.0  # ... and the cap on the pull onto them


class ServedPolicy:
    def __init__(self, actor: PolicyActor, spec: InputSpec, metadata: dict):
        self.actor, self.spec, self.metadata = actor, spec, metadata

    @classmethod
    def from_config(cls, cfg: ServeConfig) -> "ServedPolicy":
        from pirl.train.common import graphs_on_gpu, load_bundle
        from vla.checkpoint import read_metadata, read_rollout

        if cfg.torch_threads:
            torch.set_num_threads(cfg.torch_threads)
        policy, processor = load_bundle(cfg.checkpoint, device=cfg.device, precision=cfg.precision)
        policy.eval()
        if cfg.cuda_graphs:
            # a prefix and an expert graph per batch size the dynamic batcher forms, plus guided passes'
            graphs_on_gpu(policy, max_graphs=4 * cfg.max_batch)
        mcfg = policy.config
        num_steps = cfg.num_steps or mcfg.num_steps
        meta = read_metadata(cfg.checkpoint)
        trained = (meta.get("sft_config") or {}).get("cameras") if "sft_config" in meta else None
        spec = InputSpec.build(cfg.inputs, tuple(mcfg.camera_names), trained, processor.norm_stats["state"].dim,
                               camera_map=cfg.camera_map, state_key=cfg.state_key, prompt_key=cfg.prompt_key,
                               default_prompt=cfg.default_prompt, max_image_side=cfg.max_image_side)
        sample = build_sample_fn(policy, processor, num_steps, cfg.guidance, cfg.critic, cfg.checkpoint)
        actor = PolicyActor(policy, processor, num_steps, sample=sample)
        metadata = {
            "server": "pirl",
            "protocol": "openpi-websocket/msgpack-numpy",
            "checkpoint": str(cfg.checkpoint),
            "model": {"variant": mcfg.variant, "action_horizon": mcfg.action_horizon,
                      "action_dim_padded": mcfg.action_dim, "max_token_len": mcfg.max_token_len,
                      "image_size": mcfg.vision.image_size, "model_cameras": list(mcfg.camera_names)},
            "action_horizon": mcfg.action_horizon,
            "action_dim": processor.action_dims,
            "actions": "float32 [action_horizon, action_dim] in the robot's raw units (unnormalised)",
            "num_steps": num_steps,
            # the checkpoint's rollout.json with the served K: what `pirl eval policy=ws://...` defaults to
            "rollout": {**read_rollout(cfg.checkpoint), "num_steps": num_steps},
            "sampler": "guided" if is_guided(cfg.guidance) else "ode",
            "guidance": guidance_metadata(cfg.guidance, cfg.critic),
            "inputs": spec.describe(),
            "batching": {"max_batch": cfg.max_batch, "max_wait_ms": cfg.max_wait_ms, "max_queue": cfg.max_queue},
            "limits": {"max_message_bytes": int(cfg.max_message_mb * 2**20), "max_image_side": cfg.max_image_side},
            "auth": "api_key" if cfg.api_key else None,
        }
        return cls(actor, spec, metadata)

    @property
    def chunk_shape(self) -> tuple[int, int]:
        return self.actor.chunk_shape

    @property
    def prepare_is_cheap(self) -> bool:
        """Whether `prepare` is only light Python work (no camera images to resize): ~50 us per request,
        less than handing it to a thread and back costs (0.5 ms and more on a loaded CPU, measured), so the
        server then runs it on its event loop instead of its prep pool."""
        return not self.spec.cameras

    def prepare(self, request: Any) -> Prepared:
        """Validate and process one request (row-wise: the same numbers as inside a batch)."""
        row, seed, index = self.spec.parse(request)
        horizon, _ = self.chunk_shape
        previous = parse_remaining(request, horizon, self.actor.processor.action_dims, INPAINT_BETA)
        if previous is not None and self.actor.sample_is_guided:
            raise RequestError("'prev_actions' (real-time chunking) needs a server without guidance")
        obs = {"images": {c: img[None] for c, img in row["images"].items()}, "state": row["state"][None],
               "prompt": [row["prompt"]]}
        try:
            inputs = self.actor.processor(obs)
        except (ValueError, KeyError) as err:  # e.g. a prompt longer than max_token_len
            raise RequestError(str(err).strip("'\"")) from None
        given = seed is not None
        remaining, delay, beta = previous if previous is not None else (None, 0, 0.0)
        return Prepared(inputs, seed if given else secrets.randbits(63), index, given, remaining, delay, beta)

    def warm_up(self, max_batch: int) -> float:
        """One synthetic batch of every size up to `max_batch` (blank images, zero state), before the port
        opens: with CUDA graphs, each batch size's capture happens here instead of in a client's request.
        Returns the seconds taken."""
        t0 = time.perf_counter()
        size = self.actor.policy.config.vision.image_size
        obs = {"images": {c: np.zeros((1, size, size, 3), np.uint8) for c in self.spec.cameras},
               "state": np.zeros((1, self.spec.state_dim), np.float32), "prompt": ["warm up"]}
        row = Prepared(self.actor.processor(obs), seed=0, noise_index=0, seed_given=True)
        for b in range(1, max_batch + 1):
            self.infer([row] * b)
        return time.perf_counter() - t0

    def infer(self, rows: list[Prepared]) -> tuple[np.ndarray, float]:
        """The batch's raw actions [B, H, d] and the model time in ms."""
        from pirl.train.batch import stack_inputs

        t0 = time.perf_counter()
        horizon, dim = self.chunk_shape
        generators, noises = [], []
        for r in rows:
            g, noise = seeded_noise_stream(r.seed, r.noise_index, horizon, dim)
            generators.append(g)
            noises.append(noise)
        inputs = rows[0].inputs if len(rows) == 1 else stack_inputs([r.inputs for r in rows])
        inpainting = None
        if any(r.remaining is not None for r in rows):
            inpainting = Inpainting.from_raw(self.actor.processor, [r.remaining for r in rows],
                                             [r.delay for r in rows], [r.beta for r in rows])
        actions = self.actor.actions_from_inputs(inputs, torch.stack(noises), generators, inpainting)
        return actions, (time.perf_counter() - t0) * 1000


__all__ = ["ServedPolicy", "Prepared", "build_sample_fn", "seeded_noise"]
