"""The trajectory batch: what rollout workers send to learners (DESIGN.md "Trajectory batch").

One schema, one dataclass. Per-chunk-step fields are [T, B] (time first, as GAE wants); per-sample
fields (inputs, chain) hold T * B rows in time-major order (row = t * B + b).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from pirl.flow.chain import Chain
from vla.inputs import ModelInputs


@dataclasses.dataclass
class TrajectoryBatch:
    inputs: ModelInputs  # T*B processed observations the chunks were sampled from
    chain: Chain  # T*B denoising chains (latents, step masks, rollout log-probs)
    rewards: Tensor  # [T, B] reward summed over each chunk's executed steps
    terminated: Tensor  # [T, B] bool
    truncated: Tensor  # [T, B] bool
    values: Tensor  # [T, B] V(obs) at rollout
    truncated_values: Tensor  # [T, B] V(final obs) where truncated, else 0
    last_value: Tensor  # [B] V(obs after the last chunk)
    success: Tensor  # [T, B] bool, success latched within the episode (success_once) at chunk end
    episode_returns: list[float]  # returns of episodes that finished in this batch
    episode_lengths: list[int]
    episode_success: list[bool]  # success_once of those episodes
    env_steps: int  # simulator steps executed
    weight_version: int
    mask_exec: Tensor  # [H] bool: executed steps of a chunk
    mask_dims: Tensor  # [D] bool: real action dims

    @property
    def first_episode_success(self) -> Tensor:
        """[B] bool: success_once of each env's first episode in this batch (the one that starts at
        the batch's reset), or of the still-running episode if it never ended.

        Unlike `episode_success` this is unbiased: a success ends an episode early, so the episodes
        that *finish* inside a fixed window over-represent short, successful ones."""
        done = self.terminated | self.truncated
        first = torch.where(done.any(0), done.float().argmax(0), torch.full_like(done[0], self.horizon - 1, dtype=torch.long))
        return self.success.gather(0, first[None]).squeeze(0)

    @property
    def horizon(self) -> int:
        return self.rewards.shape[0]

    @property
    def num_envs(self) -> int:
        return self.rewards.shape[1]

    @staticmethod
    def cat_envs(batches: list["TrajectoryBatch"]) -> "TrajectoryBatch":
        """Joins batches from several workers along the env axis (same T)."""
        if len(batches) == 1:
            return batches[0]
        t = batches[0].horizon
        if any(b.horizon != t for b in batches):
            raise ValueError("batches from workers must cover the same number of chunk steps")
        # Per-sample rows are time-major (row = step * B + b) in each batch; after concatenating the
        # workers' rows, pick them so the joined rows are time-major over all envs again.
        sizes = [b.num_envs for b in batches]
        bases = [sum(n * t for n in sizes[:k]) for k in range(len(sizes))]
        index = torch.cat([
            torch.arange(size) + base + step * size
            for step in range(t)
            for size, base in zip(sizes, bases, strict=True)
        ])
        inputs = _cat_inputs([b.inputs for b in batches]).select(index)
        chain = Chain.cat([b.chain for b in batches]).select(index)
        cat1 = lambda name: torch.cat([getattr(b, name) for b in batches], 1)  # noqa: E731
        return TrajectoryBatch(
            inputs=inputs,
            chain=chain,
            rewards=cat1("rewards"),
            terminated=cat1("terminated"),
            truncated=cat1("truncated"),
            values=cat1("values"),
            truncated_values=cat1("truncated_values"),
            last_value=torch.cat([b.last_value for b in batches]),
            success=cat1("success"),
            episode_returns=sum((b.episode_returns for b in batches), []),
            episode_lengths=sum((b.episode_lengths for b in batches), []),
            episode_success=sum((b.episode_success for b in batches), []),
            env_steps=sum(b.env_steps for b in batches),
            weight_version=min(b.weight_version for b in batches),
            mask_exec=batches[0].mask_exec,
            mask_dims=batches[0].mask_dims,
        )


def _cat_inputs(parts: list[ModelInputs]) -> ModelInputs:
    return ModelInputs(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(ModelInputs)})


def stack_inputs(parts: list[ModelInputs]) -> ModelInputs:
    """Rows of `parts` one after the other: per-chunk-step inputs [B] x T -> time-major [T*B], or one
    chunk's env groups -> [B]."""
    return _cat_inputs(parts)
