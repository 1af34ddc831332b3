"""PaliGemma + Gemma action expert sharing one attention per layer (the π0 "mixture of transformers").

The module tree mirrors openpi's PyTorch layout, so that parameter names are openpi's one to one:

    paligemma.model.vision_tower.vision_model.*     SigLIP (transformers' SiglipVisionModel)
    paligemma.model.multi_modal_projector.linear    SigLIP width -> VLM width
    paligemma.model.language_model.{embed_tokens, layers.N.*, norm}      Gemma VLM decoder
    gemma_expert.model.{layers.N.*, norm}                                Gemma action expert

Each layer of each stack is transformers' GemmaDecoderLayer (its norms, QKV/output projections and MLP
are used as components); the layer loop is ours because the two stacks meet inside attention: the
queries, keys and values of every stream present are concatenated into one attention over the joint
sequence, with RoPE positions and a block mask, and each stream then goes through its own output
projection and MLP. π0.5's expert swaps every norm for an adaptive RMSNorm (`AdaptiveRMSNorm`).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import GemmaConfig as HFGemmaConfig
from transformers import SiglipVisionConfig, SiglipVisionModel
from transformers.models.gemma.modeling_gemma import (
    GemmaDecoderLayer,
    GemmaRMSNorm,
    GemmaRotaryEmbedding,
    apply_rotary_pos_emb,
)

from vla.config import GemmaConfig, ModelConfig, VisionConfig

KVCache = tuple[tuple[Tensor, Tensor], ...]  # per layer: keys, values [B, kv_heads, L, head_dim], RoPE applied


class AdaptiveRMSNorm(nn.Module):
    """π0.5's adaRMS: RMS-normalise, then scale/shift from a conditioning vector; also returns a gate.

    y = norm(x) * (1 + scale) + shift,  (scale, shift, gate) = dense(cond).  The gate multiplies the
    residual branch that follows (`gated_residual`). Parameter names follow openpi (`dense`).
    """

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: Tensor, cond: Tensor) -> tuple[Tensor, Tensor]:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        modulation = self.dense(cond.to(self.dense.weight.dtype))[:, None, :].float()
        scale, shift, gate = modulation.chunk(3, dim=-1)
        return (normed * (1.0 + scale) + shift).to(x.dtype), gate.to(x.dtype)


def apply_norm(norm: nn.Module, x: Tensor, cond: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Runs a plain Gemma RMSNorm (gate None) or an adaptive one (needs `cond`)."""
    if isinstance(norm, AdaptiveRMSNorm):
        if cond is None:
            raise ValueError("an adaptive RMSNorm needs a conditioning vector")
        return norm(x, cond)
    return norm(x), None


def gated_residual(residual: Tensor, branch: Tensor, gate: Tensor | None) -> Tensor:
    return residual + branch if gate is None else residual + branch * gate


def hf_gemma_config(cfg: GemmaConfig, vocab_size: int) -> HFGemmaConfig:
    return HFGemmaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        rms_norm_eps=cfg.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        attention_bias=False,
    )


def hf_siglip_config(cfg: VisionConfig) -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=cfg.width,
        intermediate_size=cfg.mlp_dim,
        num_hidden_layers=cfg.depth,
        num_attention_heads=cfg.num_heads,
        patch_size=cfg.patch_size,
        image_size=cfg.image_size,
        layer_norm_eps=cfg.layer_norm_eps,
        vision_use_head=False,
        hidden_act="gelu_pytorch_tanh",
    )


class _GemmaStack(nn.Module):
    """Layers and final norm of one Gemma stack (no LM head: π0 never decodes text)."""

    def __init__(self, cfg: GemmaConfig, hf_cfg: HFGemmaConfig, *, adaptive_cond_dim: int | None, embed: bool):
        super().__init__()
        if embed:
            self.embed_tokens = nn.Embedding(hf_cfg.vocab_size, cfg.width)
        self.layers = nn.ModuleList([GemmaDecoderLayer(hf_cfg, i) for i in range(cfg.depth)])
        self.norm = GemmaRMSNorm(cfg.width, eps=cfg.rms_norm_eps)
        if adaptive_cond_dim is not None:
            for layer in self.layers:
                layer.input_layernorm = AdaptiveRMSNorm(cfg.width, adaptive_cond_dim, cfg.rms_norm_eps)
                layer.post_attention_layernorm = AdaptiveRMSNorm(cfg.width, adaptive_cond_dim, cfg.rms_norm_eps)
            self.norm = AdaptiveRMSNorm(cfg.width, adaptive_cond_dim, cfg.rms_norm_eps)


class _VisionTower(nn.Module):
    """Holds SigLIP as `.vision_model` so names read `vision_tower.vision_model.*` as in openpi."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = SiglipVisionModel(hf_siglip_config(cfg))

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.vision_model(pixel_values=pixel_values).last_hidden_state


class _Projector(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x)


class _PaliGemmaModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.vision_tower = _VisionTower(config.vision)
        self.multi_modal_projector = _Projector(config.vision.width, config.vlm.width)
        hf = hf_gemma_config(config.vlm, config.vocab_size)
        self.language_model = _GemmaStack(config.vlm, hf, adaptive_cond_dim=None, embed=True)


class _Wrapper(nn.Module):
    """An empty level of the module tree, present only so names match openpi's (`.model`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model


@dataclasses.dataclass
class Stream:
    """A run of tokens handled by one stack: 0 = VLM decoder, 1 = action expert."""

    hidden: Tensor  # [B, L, width of that stack]
    stack: int
    cond: Tensor | None = None  # adaRMS conditioning [B, cond_dim] (π0.5 expert), else None


class PaliGemmaWithExpert(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.paligemma = _Wrapper(_PaliGemmaModel(config))
        hf_expert = hf_gemma_config(config.expert, config.vocab_size)
        cond_dim = config.expert.width if config.variant == "pi05" else None
        self.gemma_expert = _Wrapper(_GemmaStack(config.expert, hf_expert, adaptive_cond_dim=cond_dim, embed=False))
        # RoPE has no parameters; both stacks share head_dim and theta, so one table serves both.
        self.rotary = GemmaRotaryEmbedding(config=hf_gemma_config(config.vlm, config.vocab_size))

    # -- embeddings -----------------------------------------------------------------------------
    def embed_images(self, pixel_values: Tensor) -> Tensor:
        """[N, 3, S, S] in [-1, 1] -> [N, tokens_per_image, vlm width]."""
        tower = self.paligemma.model.vision_tower
        dtype = tower.vision_model.embeddings.patch_embedding.weight.dtype
        features = tower(pixel_values.to(dtype))
        return self.paligemma.model.multi_modal_projector(features)

    def embed_tokens(self, tokens: Tensor) -> Tensor:
        """Token embeddings times sqrt(width), the Gemma input scale (rounded in the weight dtype)."""
        table = self.paligemma.model.language_model.embed_tokens
        scale = torch.tensor(math.sqrt(self.config.vlm.width), dtype=table.weight.dtype)
        return table(tokens) * scale

    # -- the shared-attention layer loop --------------------------------------------------------
    def stacks(self) -> tuple[_GemmaStack, _GemmaStack]:
        return self.paligemma.model.language_model, self.gemma_expert.model

    def forward(
        self,
        streams: list[Stream],
        positions: Tensor,
        attend: Tensor,
        past: KVCache | None = None,
        keep_kv: bool = False,
        kv_only: bool = False,
    ) -> tuple[list[Tensor] | None, KVCache | None]:
        """Runs all layers over the concatenated streams.

        positions: [B, L_new] RoPE positions of the new tokens (streams concatenated in order).
        attend: bool [B, L_new, L_past + L_new], True where a query may attend a key.
        past: keys/values of earlier tokens (a prefix cache); read, never modified.
        keep_kv: return this call's keys/values (past ones included) per layer.
        kv_only: only the cache is wanted (with keep_kv): the last layer stops at its keys and values, since
            its queries, attention, output projection and MLP feed nothing but the final hidden states.
        Returns the final-normed hidden states per stream (None when kv_only), and the cache when keep_kv.
        """
        if kv_only and not keep_kv:
            raise ValueError("kv_only needs keep_kv: the pass would return nothing")
        cfg = self.config.vlm
        stacks = self.stacks()
        hidden = [s.hidden for s in streams]
        lengths = [h.shape[1] for h in hidden]
        batch = hidden[0].shape[0]
        cos, sin = self.rotary(hidden[0], positions)  # in the streams' dtype, that of q and k
        mask = additive_mask(attend, hidden[0].dtype)  # once here, not converted again in every layer
        new_cache = []
        for i in range(cfg.depth):
            last_kv_only = kv_only and i == cfg.depth - 1
            queries, keys, values, gates = [], [], [], []
            for s, h in zip(streams, hidden, strict=True):
                layer = stacks[s.stack].layers[i]
                normed, gate = apply_norm(layer.input_layernorm, h, s.cond)
                gates.append(gate)
                attn = layer.self_attn
                shape = (batch, h.shape[1], -1, cfg.head_dim)
                if not last_kv_only:
                    queries.append(attn.q_proj(normed).view(shape).transpose(1, 2))
                keys.append(attn.k_proj(normed).view(shape).transpose(1, 2))
                values.append(attn.v_proj(normed).view(shape).transpose(1, 2))
            k = join(keys)  # no queries in a kv-only last layer: RoPE's query half then rotates k again (cheap)
            q, k = apply_rotary_pos_emb(k if last_kv_only else join(queries), k, cos, sin)
            v = join(values)
            if past is not None:
                k = torch.cat([past[i][0], k], 2)
                v = torch.cat([past[i][1], v], 2)
            if keep_kv:
                new_cache.append((k, v))
            if last_kv_only:
                return None, tuple(new_cache)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=cfg.head_dim**-0.5, enable_gqa=True)
            out = out.transpose(1, 2).reshape(batch, sum(lengths), cfg.num_heads * cfg.head_dim)
            start = 0
            for j, (s, n) in enumerate(zip(streams, lengths, strict=True)):
                layer = stacks[s.stack].layers[i]
                o = layer.self_attn.o_proj(out[:, start : start + n].to(layer.self_attn.o_proj.weight.dtype))
                start += n
                h = gated_residual(hidden[j], o, gates[j])
                normed, gate = apply_norm(layer.post_attention_layernorm, h, s.cond)
                hidden[j] = gated_residual(h, layer.mlp(normed), gate)
        outputs = [apply_norm(stacks[s.stack].norm, h, s.cond)[0] for s, h in zip(streams, hidden, strict=True)]
        return outputs, (tuple(new_cache) if keep_kv else None)


def join(parts: list[Tensor]) -> Tensor:
    """Streams' heads concatenated along the sequence; one stream (the prefix pass, a cached expert
    step) is used as it is instead of being copied by `torch.cat`."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, 2)


def additive_mask(attend: Tensor, dtype: torch.dtype) -> Tensor:
    """bool [B, Lq, Lk] -> [B, 1, Lq, Lk] of 0 / -inf in `dtype`: what scaled_dot_product_attention makes
    of a bool mask at every call, made once per forward for all layers (the same values, so the same
    attention)."""
    return torch.zeros(attend.shape, dtype=dtype, device=attend.device).masked_fill_(~attend, float("-inf"))[:, None]


def block_attention(pad_keys: Tensor, block_queries: Tensor, block_keys: Tensor) -> Tensor:
    """π0's block mask: a query sees valid keys whose block index is <= its own.

    Blocks (openpi's cumulative "ar mask"): images+prompt = 0 (bidirectional), π0's state token = 1,
    action tokens = last block (they see each other and everything before). Nothing earlier sees a
    later block, so the prefix never attends to the suffix.
    pad_keys: bool [B, Lk]; block_queries: long [B, Lq]; block_keys: long [B, Lk] -> bool [B, Lq, Lk].
    Padded queries are not masked: their outputs are never used, and a fully masked row would be NaN.
    """
    return (block_keys[:, None, :] <= block_queries[:, :, None]) & pad_keys[:, None, :]
