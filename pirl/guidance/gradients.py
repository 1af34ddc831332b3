"""The guidance directions of QGF and its baselines as pure functions (METHODS.md §5, in the §1 convention).

t = 1 is noise, t = 0 the action chunk, the Euler step is x <- x - d * v. A direction g points towards
higher Q in the space of the latent x; a guided velocity is v' = v - w * g (minus, because the Euler
step moves along -v, so x gains + d * w * g).

Every function returns detached tensors, never writes parameter gradients (it uses `torch.autograd.grad`
with respect to the latent only) and enables autograd itself, so it may be called inside the sampler's
`torch.no_grad()`. None may be called under `torch.inference_mode()`, whose tensors cannot enter autograd.
"""
from __future__ import annotations

import math

import torch

from pirl.flow.grid import DenoiseGrid
from pirl.flow.sampler import VelocityFn, evaluate_velocity
from pirl.flow.steps import clean_estimate, euler_step

from .qfunction import QFunction

# (low, high) bounds of the action space in the policy's normalised units, or None for no clipping.
ClipBounds = tuple[float, float] | None


def clip_actions(actions: torch.Tensor, bounds: ClipBounds) -> torch.Tensor:
    """clip(a, low, high); identity when `bounds` is None.

    METHODS.md §5 clips the clean estimate to [-1, 1]: the reference (and openpi's quantile
    normalisation) puts every action dim in [-1, 1], and a critic trained on in-range chunks is
    meaningless outside. A z-scored action space has no such box: pass its own bounds or None.
    """
    return actions if bounds is None else actions.clamp(bounds[0], bounds[1])


def q_gradient(q_fn: QFunction, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_a Q(a) [B, H, D], Q(a) [B]) at the given point; rows are independent, so grad of sum_b Q_b works."""
    with torch.enable_grad():
        actions = actions.detach().requires_grad_(True)
        q = q_fn(actions)
        (grad,) = torch.autograd.grad(q.sum(), actions)
    return grad.detach(), q.detach()


def qgf_direction(q_fn: QFunction, x: torch.Tensor, t: torch.Tensor, v: torch.Tensor, clip: ClipBounds) -> torch.Tensor:
    """QGF (METHODS.md §5): g = grad_{a_hat} Q(a_hat) at a_hat = clip(x - t * v); no gradient through v."""
    a_hat = clip_actions(clean_estimate(x, v, t), clip)
    return q_gradient(q_fn, a_hat)[0]


def ood_direction(q_fn: QFunction, x: torch.Tensor) -> torch.Tensor:
    """OOD-gradient baseline (METHODS.md §5): g = grad_x Q(x) at the noisy latent itself.

    The critic never saw noisy latents, so this follows whatever the critic does off the data.
    """
    return q_gradient(q_fn, x)[0]


def jacobian_direction(
    velocity_fn: VelocityFn, q_fn: QFunction, x: torch.Tensor, t: torch.Tensor, clip: ClipBounds
) -> tuple[torch.Tensor, torch.Tensor]:
    """QGF-Jacobian (METHODS.md §5): g = J^T grad Q(a_hat), J = d(x - t * v(x)) / dx, by autodiff through v.

    Returns (g, v) with v the (detached) velocity at (x, t), so the caller needs no second forward pass.
    grad Q is taken at the clipped estimate, exactly as in `qgf_direction`, and pulled back through the
    unclipped map: the clip's zero derivative would otherwise silence every row whose estimate leaves the
    box, which early in the chain is most of them. With J = I this is QGF.
    """
    return pullback_direction(velocity_fn, x, t, lambda a_hat: q_gradient(q_fn, clip_actions(a_hat, clip))[0])


def pullback_direction(
    velocity_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, gradient_at_estimate
) -> tuple[torch.Tensor, torch.Tensor]:
    """g = J^T h(a_hat), J = d(x - t * v(x)) / dx by autodiff through v, for an ascent direction h [B, H, D]
    of some objective at the clean estimate a_hat (`gradient_at_estimate`, given a_hat detached).

    The latent-space direction of QGF-Jacobian (h = grad Q) and of inpainting (h = W (Y - a_hat)). Returns
    (g, v) with v the detached velocity at (x, t), so the caller needs no second forward pass.
    """
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        v, _ = evaluate_velocity(velocity_fn, x, t)
        a_hat = clean_estimate(x, v, t)
        h = gradient_at_estimate(a_hat.detach())
        (g,) = torch.autograd.grad(a_hat, x, grad_outputs=h)
    return g.detach(), v.detach()


def inpaint_weights(horizon: int, delay: int, overlap: int) -> torch.Tensor:
    """Per-index weights W [horizon] of real-time chunking's soft mask (Black et al. 2025; docs/serve.md).

    The new chunk is asked for at the step where `overlap` actions of the current chunk are still to run;
    its first `delay` actions run from the current chunk while the request is answered. W_i = 1 for
    i < delay (those actions are committed), W_i = c_i (e^c_i - 1) / (e - 1) with
    c_i = (overlap - i) / (overlap - delay + 1) for delay <= i < overlap (the old plan, trusted less the
    further out it reaches), 0 from `overlap` on (no old plan there).
    """
    if not 0 <= delay <= overlap <= horizon:
        raise ValueError(f"need 0 <= delay ({delay}) <= overlap ({overlap}) <= horizon ({horizon})")
    i = torch.arange(horizon, dtype=torch.float64)
    c = (overlap - i) / (overlap - delay + 1)
    soft = c * torch.expm1(c) / math.expm1(1.0)
    weights = torch.where(i < delay, torch.ones_like(i), torch.where(i < overlap, soft, torch.zeros_like(i)))
    return weights.float()


def inpaint_guidance_scale(t: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """The ΠGDM step scale real-time chunking uses, in the §1 convention: min(beta, (t^2 + (1-t)^2) / (t (1-t))).

    (Black et al. write min(beta, (1 - tau) / (tau r^2)), r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2), with
    tau = 1 - t their data time.) It is 2 at t = 1/2, grows towards both ends, and is beta at t = 0 and 1.
    `beta`: one cap, or one per row of t.
    """
    t = t.double()
    raw = (t.square() + (1 - t).square()) / (t * (1 - t))  # +inf at t = 0 and 1: the cap applies
    return torch.minimum(raw, torch.as_tensor(beta, dtype=torch.float64, device=t.device)).float()


def inpaint_direction(
    velocity_fn: VelocityFn, x: torch.Tensor, t: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Real-time chunking's guidance direction g = J^T [W * (Y - a_hat)] (docs/serve.md), with Y the
    current chunk's remaining actions `target` [B, H, D] and W `weights` [B, H, D] (zero where there is
    no old plan, on padded dims, and on rows that have none). Returns (g, v) as `pullback_direction`.
    """
    return pullback_direction(velocity_fn, x, t, lambda a_hat: weights * (target - a_hat))


def bptt_direction(
    velocity_fn: VelocityFn, q_fn: QFunction, x: torch.Tensor, grid: DenoiseGrid, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """BPTT baseline (METHODS.md §5): g = d Q(a_final) / dx through the remaining Euler steps.

    x is the latent at grid time t_step; the ODE is unrolled with a graph over steps step..K-1 of `grid`
    (the very times and step sizes the sampler uses). Returns (g, v) with v the (detached) velocity at
    (x, t_step), the first step of the unrolled chain. Costs K - step velocity passes with a graph and
    their backward: O(K^2) per chain.
    """
    times = grid.times_tensor(x.dtype, x.device)
    sizes = grid.steps_tensor(x.dtype, x.device)
    batch = x.shape[0]
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        latent, first_v = x, None
        for k in range(step, grid.num_steps):
            v, _ = evaluate_velocity(velocity_fn, latent, times[k].expand(batch))
            first_v = v if first_v is None else first_v
            latent = euler_step(latent, v, sizes[k])
        (g,) = torch.autograd.grad(q_fn(latent).sum(), x)
    return g.detach(), first_v.detach()


def guided_velocity(v: torch.Tensor, direction: torch.Tensor, weight: float) -> torch.Tensor:
    """v' = v - w * g (METHODS.md §5). w = 0 returns v exactly for any finite g."""
    return v - weight * direction


def guidance_ratio(v: torch.Tensor, guidance_term: torch.Tensor) -> torch.Tensor:
    """||w g|| / ||v|| per row [B], norms over the whole chunk: w multiplies raw grad Q, so this is the scale to log."""
    return guidance_term.flatten(1).norm(dim=1) / v.flatten(1).norm(dim=1).clamp_min(1e-12)


def gradstep_ascent(q_fn: QFunction, actions: torch.Tensor, steps: int, size: float, clip: ClipBounds) -> torch.Tensor:
    """GradStep baseline (METHODS.md §5): `steps` times a <- clip(a + size * grad_a Q(a)) on the final chunk.

    Projected onto the action box when `clip` is given (the executed chunk must stay in range).
    """
    for _ in range(steps):
        grad, _ = q_gradient(q_fn, actions)
        actions = clip_actions(actions + size * grad, clip)
    return actions.detach()


def best_of_n_index(q_values: torch.Tensor) -> torch.Tensor:
    """Best-of-N (METHODS.md §5): for Q [N, B] of N candidates per observation, the argmax candidate [B]."""
    return q_values.argmax(dim=0)
