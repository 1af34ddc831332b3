"""`Chain`: one stored denoising run (DESIGN.md "Chain"; METHODS.md §2, §3)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .grid import DenoiseGrid


@dataclass
class Chain:
    """The K+1 latents of a denoising run and the Gaussian transitions of its stochastic steps.

    Fields:
        latents:   [B, K+1, H, D] x_0 (initial noise, t = 1) .. x_K (the action chunk, t = 0); detached.
        grid:      the `DenoiseGrid` the chain was sampled on (recomputation uses the same one).
        step_mask: [B, K] bool, True where transition k of sample b was stochastic.
        means, stds, log_probs: [N, H, D] for the N = step_mask.sum() stochastic transitions, one row per
            (sample, step) pair in `stochastic_pairs()` order (row-major over [B, K]). `log_probs` are
            per element and unreduced: log N(x_{k+1}; mean, std^2) at rollout.

    Compact rows rather than dense [B, K, ...] storage: a hybrid chain stores one step per sample,
    not K.
    """

    latents: torch.Tensor
    grid: DenoiseGrid
    step_mask: torch.Tensor
    means: torch.Tensor
    stds: torch.Tensor
    log_probs: torch.Tensor

    def __post_init__(self) -> None:
        b, k1 = self.latents.shape[:2]
        if k1 != self.grid.num_steps + 1:
            raise ValueError(f"latents hold {k1} states but the grid has {self.grid.num_steps} steps")
        if tuple(self.step_mask.shape) != (b, self.grid.num_steps) or self.step_mask.dtype != torch.bool:
            raise ValueError(f"step_mask must be bool [{b}, {self.grid.num_steps}], got {self.step_mask.dtype} "
                             f"{tuple(self.step_mask.shape)}")
        if self.step_mask.is_meta:  # shape checks on `meta` (no values): the row count is what was given
            return
        n = int(self.step_mask.sum())
        for name in ("means", "stds", "log_probs"):
            shape = tuple(getattr(self, name).shape)
            if shape != (n, *self.latents.shape[2:]):
                raise ValueError(f"{name} must be [{n}, H, D] (one row per stochastic step), got {shape}")

    @property
    def batch_size(self) -> int:
        return self.latents.shape[0]

    @property
    def num_steps(self) -> int:
        return self.grid.num_steps

    @property
    def actions(self) -> torch.Tensor:
        """[B, H, D] the sampled action chunk x_K (normalised units, padded dims included)."""
        return self.latents[:, -1]

    @property
    def initial_noise(self) -> torch.Tensor:
        """[B, H, D] x_0."""
        return self.latents[:, 0]

    @property
    def num_stochastic(self) -> int:
        return int(self.step_mask.sum())

    def stochastic_pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sample_index [N], step_index [N]) of the stochastic transitions, in storage order."""
        sample_index, step_index = self.step_mask.nonzero(as_tuple=True)
        return sample_index, step_index

    def select(self, index: torch.Tensor) -> "Chain":
        """Sub-chain of the samples `index` [M] (may repeat), e.g. a PPO minibatch."""
        index = index.to(device=self.latents.device, dtype=torch.long)
        if self.means.shape[0] == 0:  # no stochastic step (an ODE chain): no rows to gather; runs on `meta`
            return replace(self, latents=self.latents[index], step_mask=self.step_mask[index])
        row_of = torch.full(self.step_mask.shape, -1, dtype=torch.long, device=self.latents.device)
        row_of[self.step_mask] = torch.arange(self.num_stochastic, device=self.latents.device)
        step_mask = self.step_mask[index]
        rows = row_of[index][step_mask]
        return replace(self, latents=self.latents[index], step_mask=step_mask, means=self.means[rows],
                       stds=self.stds[rows], log_probs=self.log_probs[rows])

    def to(self, *args, **kwargs) -> "Chain":
        """Move the tensors (device / dtype for the float ones); the mask stays bool."""
        latents = self.latents.to(*args, **kwargs)
        return replace(self, latents=latents, step_mask=self.step_mask.to(device=latents.device),
                       means=self.means.to(*args, **kwargs), stds=self.stds.to(*args, **kwargs),
                       log_probs=self.log_probs.to(*args, **kwargs))

    @staticmethod
    def cat(chains: "list[Chain]") -> "Chain":
        """Concatenate chains sampled on the same grid along the batch."""
        grid = chains[0].grid
        if any(c.grid != grid for c in chains):
            raise ValueError("cannot concatenate chains sampled on different grids")
        # Row-major storage order over [B, K] is preserved by concatenating rows chain after chain.
        return Chain(latents=torch.cat([c.latents for c in chains]), grid=grid,
                     step_mask=torch.cat([c.step_mask for c in chains]),
                     means=torch.cat([c.means for c in chains]), stds=torch.cat([c.stds for c in chains]),
                     log_probs=torch.cat([c.log_probs for c in chains]))
