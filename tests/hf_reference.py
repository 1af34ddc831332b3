"""transformers' own PI0 (an independent implementation of π0) at the tiny size, as a test reference."""

from __future__ import annotations

import torch

from vla.config import ModelConfig


def hf_pi0_config(cfg: ModelConfig):
    from transformers import PI0Config

    v, l, e = cfg.vision, cfg.vlm, cfg.expert
    return PI0Config(
        vlm_config={
            "text_config": {
                "model_type": "gemma", "hidden_size": l.width, "num_hidden_layers": l.depth,
                "intermediate_size": l.mlp_dim, "num_attention_heads": l.num_heads,
                "num_key_value_heads": l.num_kv_heads, "head_dim": l.head_dim, "vocab_size": cfg.vocab_size,
            },
            "vision_config": {
                "model_type": "siglip_vision_model", "hidden_size": v.width, "intermediate_size": v.mlp_dim,
                "num_hidden_layers": v.depth, "num_attention_heads": v.num_heads, "patch_size": v.patch_size,
                "image_size": v.image_size, "vision_use_head": False,
            },
            "projection_dim": l.width,
            "image_token_id": cfg.vocab_size - 1,
        },
        dit_config={
            "hidden_size": e.width, "num_hidden_layers": e.depth, "intermediate_size": e.mlp_dim,
            "num_attention_heads": e.num_heads, "num_key_value_heads": e.num_kv_heads, "head_dim": e.head_dim,
        },
        chunk_size=cfg.action_horizon,
        max_state_dim=cfg.state_width,
        max_action_dim=cfg.action_dim,
        num_inference_steps=cfg.num_steps,
    )


def hf_pi0(cfg: ModelConfig, seed: int = 0):
    from transformers import PI0ForConditionalGeneration

    torch.manual_seed(seed)
    model = PI0ForConditionalGeneration(hf_pi0_config(cfg)).eval()
    with torch.no_grad():  # non-trivial norm weights, so a misplaced norm cannot hide
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.normal_(0.0, 0.2)
    return model


def hf_inputs(cfg: ModelConfig, inputs):
    """Our ModelInputs -> transformers PI0 keyword inputs (image placeholder tokens first).

    An absent camera's placeholder tokens are masked out of the attention, as pirl and openpi mask them.
    transformers fills the placeholders with the present cameras' features in order, so this matches
    pirl only when absent cameras come after the present ones in every row (openpi's π0 LIBERO
    inputs: the third camera absent)."""
    b, n_cams = inputs.image_masks.shape
    per_image = cfg.vision.tokens_per_image
    image_ids = torch.full((b, n_cams * per_image), cfg.vocab_size - 1, dtype=torch.long)
    image_attention = inputs.image_masks.long().repeat_interleave(per_image, dim=1)
    return dict(
        state=inputs.state,
        input_ids=torch.cat([image_ids, inputs.tokens], 1),
        pixel_values=inputs.images,
        pixel_attention_mask=inputs.image_masks,
        attention_mask=torch.cat([image_attention, inputs.token_masks.long()], 1),
    )
