"""Test-time Q-guided sampling of a flow policy: QGF and its baselines (METHODS.md §5; docs/guidance.md).

    from pirl.guidance import GuidanceConfig, guided_sample
    prefix = policy.embed_prefix(inputs)
    out = guided_sample(policy, prefix, q_fn, GuidanceConfig("qgf", weight=0.5))

`q_fn` is a `QFunction`, actions [B, H, D] -> Q [B], already bound to the batch's observations (the
critic's `bind`). Pieces for other samplers: `QGFGuidance` / `OODGuidance` are `pirl.flow`
velocity transforms; `JacobianGuidedVelocity` / `BPTTGuidedVelocity` wrap a velocity function; the
directions themselves are pure functions in `pirl.guidance.gradients`.

Real-time chunking (docs/serve.md) steers a new chunk onto the current chunk's remaining actions with the
same Jacobian pull-back: `inpainted_sample`, `Inpainting`, `InpaintGuidedVelocity`, `inpaint_direction`.
"""
from .config import METHODS, GuidanceConfig
from .gradients import (
    best_of_n_index,
    bptt_direction,
    clip_actions,
    gradstep_ascent,
    guidance_ratio,
    guided_velocity,
    inpaint_direction,
    inpaint_guidance_scale,
    inpaint_weights,
    jacobian_direction,
    ood_direction,
    q_gradient,
    qgf_direction,
)
from .qfunction import QFunction, tile_q
from .sampler import GuidedSample, Inpainting, guided_sample, inpainted_sample
from .stats import GuidanceStats, counted_q, counted_velocity
from .velocity import BPTTGuidedVelocity, InpaintGuidedVelocity, JacobianGuidedVelocity, OODGuidance, QGFGuidance

__all__ = [
    "BPTTGuidedVelocity", "GuidanceConfig", "GuidanceStats", "GuidedSample", "InpaintGuidedVelocity", "Inpainting",
    "JacobianGuidedVelocity", "METHODS",
    "OODGuidance", "QFunction", "QGFGuidance", "best_of_n_index", "bptt_direction", "clip_actions", "counted_q",
    "counted_velocity", "gradstep_ascent", "guidance_ratio", "guided_sample", "guided_velocity",
    "inpaint_direction", "inpaint_guidance_scale", "inpaint_weights", "inpainted_sample",
    "jacobian_direction", "ood_direction", "q_gradient", "qgf_direction", "tile_q",
]
