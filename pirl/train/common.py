"""Pieces shared by the SFT, RL and evaluation entry points."""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from vla.checkpoint import load_policy, tokenizer_path
from vla.config import ModelConfig, PRESETS, get_config, load_yaml
from vla.policy import FlowPolicy
from vla.processor import NormStats, Processor, PromptTokenizer, build_test_tokenizer

log = logging.getLogger(__name__)

TRAINABLE_CHOICES = ("all", "expert")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model_config(spec) -> ModelConfig:
    """A preset name (tiny, tiny_pi05, pi0, pi05), a path to a model YAML, or a dict of fields."""
    if isinstance(spec, dict):
        return ModelConfig.from_dict(spec)
    if spec in PRESETS:
        return get_config(spec)
    if os.path.exists(spec):
        return load_yaml(spec)
    raise ValueError(f"model {spec!r} is neither a preset {sorted(PRESETS)} nor a YAML file")


def set_trainable(policy: FlowPolicy, which: str) -> list[torch.nn.Parameter]:
    """Sets requires_grad by `which` and returns the parameters that train: "all", or "expert" (VLM frozen;
    expert, projections train).

    "expert" is πRL's default: SigLIP and the Gemma VLM decoder are frozen, the action expert, the
    action/state/time projections (and any heads attached elsewhere) are trained.
    """
    if which not in TRAINABLE_CHOICES:
        raise ValueError(f"trainable must be one of {TRAINABLE_CHOICES}, got {which!r}")
    for name, param in policy.named_parameters():
        param.requires_grad_(which == "all" or not name.startswith("paligemma_with_expert.paligemma."))
    return [p for p in policy.parameters() if p.requires_grad]


def dataset_norm_stats(config: ModelConfig, dataset, state_floor_frac: float = 0.0, state_drop_frac: float = 0.0,
                       state_clip: float | None = None, state_drop: Sequence[int] = (),
                       state_range_margin: float | None = None) -> dict[str, NormStats]:
    """Norm stats of a dataset's raw state / actions, in the model's default mode, the state made robust
    (std floor, dropped near-constant and listed dims, clip: `NormStats.robust`). Actions keep their
    exact scale."""
    mode = "quantile" if config.variant == "pi05" else "zscore"
    state = NormStats.from_data(dataset.reader.state, mode=mode, drop=tuple(int(d) for d in state_drop))
    if state_floor_frac or state_drop_frac or state_clip is not None or state_range_margin is not None:
        state = state.robust(floor_frac=state_floor_frac, drop_frac=state_drop_frac, clip=state_clip,
                             range_margin=state_range_margin)
    return {"state": state, "actions": NormStats.from_data(dataset.reader.actions, mode=mode)}


def make_processor_from_dataset(config: ModelConfig, dataset, tokenizer: str | None, out_dir: Path,
                                stats: dict[str, NormStats] | None = None):
    """Processor with norm stats computed from the dataset's raw state/actions (or the given `stats`);
    returns the tokenizer file too, so checkpoints can carry it."""
    stats = stats or dataset_norm_stats(config, dataset)
    if tokenizer is None:
        if config.vocab_size > 10_000:
            raise ValueError("a full-size model needs tokenizer= (the PaliGemma tokenizer.model)")
        prompts = sorted(set(getattr(dataset.reader, "tasks", {}).values()))
        tok = build_test_tokenizer(Path(out_dir) / "tokenizer", extra_corpus=prompts)
        model_file = Path(out_dir) / "tokenizer" / "tokenizer.model"
    else:
        tok = PromptTokenizer(tokenizer)
        model_file = Path(tokenizer) / "tokenizer.model" if Path(tokenizer).is_dir() else Path(tokenizer)
    return Processor(config, tok, stats), model_file


def set_precision(policy: FlowPolicy, precision: str | None, device: str) -> None:
    """fp32, or bf16 weights with every norm in fp32 (`FlowPolicy.to_mixed_precision`); None: bf16 on CUDA,
    fp32 on the CPU."""
    if precision is None:
        precision = "bf16" if str(device).startswith("cuda") else "fp32"
    if precision == "bf16":
        policy.to_mixed_precision(torch.bfloat16)
    elif precision != "fp32":
        raise ValueError(f"precision must be fp32 or bf16, got {precision!r}")


def graphs_on_gpu(policy: FlowPolicy, max_graphs: int = 16) -> None:
    """Turns on CUDA graphs (`FlowPolicy.use_cuda_graphs`) for a policy on a GPU; a CPU policy stays eager."""
    if policy.action_in_proj.weight.device.type == "cuda":
        policy.use_cuda_graphs(max_graphs=max_graphs)


def load_bundle(checkpoint: str | os.PathLike, device: str = "cpu", precision: str | None = None
                ) -> tuple[FlowPolicy, Processor]:
    """A self-contained pirl checkpoint (weights, norm stats, tokenizer) -> policy and processor.

    precision: "fp32" or "bf16" (weights in bf16, every norm in fp32); default bf16 on CUDA, else fp32.
    """
    policy, stats = load_policy(checkpoint, device=device)
    set_precision(policy, precision, device)
    if stats is None:
        raise ValueError(f"{checkpoint} has no norm_stats.json; it cannot process observations")
    tok_file = tokenizer_path(checkpoint)
    if tok_file is None:
        raise ValueError(f"{checkpoint} carries no tokenizer.model")
    return policy, Processor(policy.config, PromptTokenizer(tok_file), stats)
