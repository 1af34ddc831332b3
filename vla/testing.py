"""Small builders for tests and benchmarks: a tiny random-init policy, matching random inputs, and the
LIBERO input layout the benchmarks time."""

from __future__ import annotations

import dataclasses

import torch

from vla.config import ModelConfig, tiny
from vla.inputs import ModelInputs
from vla.policy import FlowPolicy


def tiny_policy(seed: int = 0, variant: str = "pi0", config: ModelConfig | None = None) -> FlowPolicy:
    """A float32, eval-mode tiny policy with deterministic random weights."""
    torch.manual_seed(seed)
    policy = FlowPolicy(config or tiny(variant))  # type: ignore[arg-type]
    _randomise_adaptive_norms(policy)
    return policy.eval()


def _randomise_adaptive_norms(policy: FlowPolicy) -> None:
    # Zero-initialised adaRMS (as when training from scratch) would zero every gated branch, making a
    # random π0.5 ignore its observation; tests need a model whose output depends on everything.
    for name, param in policy.named_parameters():
        if ".dense." in name:
            torch.nn.init.normal_(param, std=0.05)


def random_inputs(policy: FlowPolicy, batch_size: int, seed: int = 0, pad_tokens: bool = True) -> ModelInputs:
    """Random images in [-1, 1], random prompts with trailing padding, random normalised state."""
    cfg = policy.config
    g = torch.Generator().manual_seed(seed)
    n_cams, size = len(cfg.camera_names), cfg.vision.image_size
    lengths = torch.randint(3, cfg.max_token_len + 1, (batch_size,), generator=g) if pad_tokens else None
    token_masks = torch.ones(batch_size, cfg.max_token_len, dtype=torch.bool)
    if lengths is not None:
        token_masks = torch.arange(cfg.max_token_len)[None, :] < lengths[:, None]
    image_masks = torch.ones(batch_size, n_cams, dtype=torch.bool)
    if batch_size > 1 and n_cams > 1:
        image_masks[-1, -1] = False  # one sample misses a camera
    return ModelInputs(
        images=torch.rand(batch_size, n_cams, 3, size, size, generator=g) * 2 - 1,
        image_masks=image_masks,
        tokens=torch.randint(1, cfg.vocab_size, (batch_size, cfg.max_token_len), generator=g) * token_masks,
        token_masks=token_masks,
        state=torch.randn(batch_size, cfg.state_width, generator=g),
    )


# Prompt tokens of a LIBERO observation, estimated for Gemma's tokenizer (no copy of it is stored here):
# π0, BOS + a 10-15-word instruction + "\n"; π0.5, "Task: <instruction>, State: <8 bins>;\nAction: " with
# each bin written as up to three digits, which Gemma splits into one token each.
LIBERO_PROMPT_TOKENS = {"pi0": 24, "pi05": 56}


def third_camera_absent(inputs: ModelInputs) -> ModelInputs:
    """openpi's π0 inputs for LIBERO: the third camera black and masked out in every row (pirl drops it
    before SigLIP, `FlowPolicy._drop_masked_columns`)."""
    absent = dataclasses.replace(inputs, image_masks=inputs.image_masks.clone())
    absent.image_masks[:, -1] = False
    return absent


def libero_layout(inputs: ModelInputs, prompt_tokens: int) -> ModelInputs:
    """The third camera absent and a prompt of `prompt_tokens` tokens, the rest padding: pirl keeps the
    prompt columns up to the next multiple of `PROMPT_BUCKET`."""
    columns = torch.arange(inputs.tokens.shape[1], device=inputs.tokens.device)
    mask = (columns < prompt_tokens).expand_as(inputs.token_masks).clone()
    return dataclasses.replace(third_camera_absent(inputs), tokens=inputs.tokens * mask, token_masks=mask)
