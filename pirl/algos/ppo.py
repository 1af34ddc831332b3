"""PPO on action chunks: policy loss, value loss, approx-KL early stop (METHODS.md §4).

Shapes. N = batch of chunks, H = action steps per chunk, D = action dims (padded). Log-probs may
arrive at any of three granularities (METHODS.md §4 "Reductions"):

    chunk   [N]        one ratio per chunk (log-probs summed over the executed steps and real dims)
    action  [N, H]     one ratio per action step (summed over dims)
    element [N, H, D] one ratio per element

`pirl.flow.likelihood.reduce_chain_terms` produces any of the three levels. Advantages are
always per chunk [N] and are broadcast to the log-prob shape. Masks are broadcastable to the
log-prob shape (e.g. ``mask_exec[:, None] * mask_dims`` for [N, H, D]); every mean is over valid
elements only.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from pirl.algos import stats
from pirl.algos.stats import _mask_like, masked_mean


def _broadcast_advantages(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if advantages.dim() != 1 or advantages.shape[0] != like.shape[0]:
        raise ValueError(
            f"advantages must be [N] with N = {like.shape[0]}, got {tuple(advantages.shape)}"
        )
    return advantages.reshape(-1, *([1] * (like.dim() - 1))).expand_as(like)


def ppo_policy_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor | None = None,
    clip_eps: float = 0.2,
    dual_clip: float | None = None,
    normalize_advantages: bool = True,
    adv_norm_eps: float = 1e-8,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped PPO surrogate on action chunks (METHODS.md §4), optionally dual-clipped.

    With r = exp(log_probs - old_log_probs) and A the chunk advantage broadcast to r's shape:

        l      = max(-A * r, -A * clip(r, 1 - eps, 1 + eps))            (standard PPO clip)
        l_dual = min(l, -A * c)     where A < 0, l elsewhere           (dual clip, c > 1)
        loss   = mean of l (or l_dual) over valid elements of ``mask``

    ``normalize_advantages`` normalises A over the valid chunks first (a chunk is valid when any of
    its elements is). Returns ``(loss, metrics)``; metrics (detached, over valid elements):
    ``approx_kl`` = mean((r - 1) - log r) (Schulman's low-variance k3 estimator, >= 0),
    ``clip_frac`` = fraction with |r - 1| > eps, ``dual_clip_frac`` = fraction where the dual clip
    is active, ``ratio_mean``.
    """
    if log_probs.shape != old_log_probs.shape:
        raise ValueError(
            f"log_probs {tuple(log_probs.shape)} != old_log_probs {tuple(old_log_probs.shape)}"
        )
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (got {dual_clip})")
    m = _mask_like(log_probs, mask)
    old_log_probs = old_log_probs.detach()
    advantages = advantages.detach()
    if normalize_advantages:
        chunk_valid = (m.reshape(m.shape[0], -1).sum(-1) > 0).to(advantages.dtype)
        advantages = stats.normalize_advantages(advantages, chunk_valid, adv_norm_eps)
    adv = _broadcast_advantages(advantages.to(log_probs.dtype), log_probs)

    log_ratio = log_probs - old_log_probs
    ratio = torch.exp(log_ratio)
    loss_unclipped = -adv * ratio
    loss_clipped = -adv * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
    per_elem = torch.maximum(loss_unclipped, loss_clipped)
    dual_active = torch.zeros_like(per_elem, dtype=torch.bool)
    if dual_clip is not None:
        cap = -adv * dual_clip
        dual_active = (adv < 0) & (per_elem > cap)
        per_elem = torch.where(adv < 0, torch.minimum(per_elem, cap), per_elem)
    loss = masked_mean(per_elem, m)

    with torch.no_grad():
        metrics = {
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, m),
            "clip_frac": masked_mean(((ratio - 1.0).abs() > clip_eps).to(ratio.dtype), m),
            "dual_clip_frac": masked_mean(dual_active.to(ratio.dtype), m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, metrics


def approx_kl_early_stop(approx_kl: torch.Tensor | float, target_kl: float | None) -> bool:
    """True when PPO's update epochs should stop: approx-KL above ``target_kl`` (METHODS.md §4).

    ``approx_kl`` is the metric returned by :func:`ppo_policy_loss`; ``target_kl=None`` never stops.
    """
    if target_kl is None:
        return False
    return float(approx_kl) > target_kl


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor | None = None,
    loss_type: Literal["huber", "mse"] = "huber",
    huber_delta: float = 10.0,
    clip_eps: float | None = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Value loss with value clipping (METHODS.md §4: "value loss Huber (delta 10) with value clipping").

    f(e) = Huber_delta(e) (0.5 e^2 for |e| <= delta, delta (|e| - delta / 2) beyond) or 0.5 e^2.

        v_clip = old_values + clip(values - old_values, -clip_eps, clip_eps)
        loss   = mean over valid of max(f(values - returns), f(v_clip - returns))

    ``clip_eps=None`` drops the clipped term. Returns ``(loss, metrics)`` with ``value_clip_frac``
    (fraction of valid elements whose new value moved more than clip_eps).
    """
    if not values.shape == old_values.shape == returns.shape:
        raise ValueError("value_loss: values, old_values and returns must have one shape")
    returns, old_values = returns.detach(), old_values.detach()

    def err(pred: torch.Tensor) -> torch.Tensor:
        if loss_type == "huber":
            return F.huber_loss(pred, returns, reduction="none", delta=huber_delta)
        if loss_type == "mse":
            return 0.5 * (pred - returns) ** 2
        raise ValueError(f"value_loss: unknown loss_type {loss_type!r} (huber | mse)")

    per_elem = err(values)
    clip_frac = torch.zeros((), dtype=values.dtype)
    if clip_eps is not None:
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        per_elem = torch.maximum(per_elem, err(v_clip))
        with torch.no_grad():
            clip_frac = masked_mean(((values - old_values).abs() > clip_eps).to(values.dtype), mask)
    return masked_mean(per_elem, mask), {"value_clip_frac": clip_frac}
