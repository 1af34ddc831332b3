"""The seams of the RL trainer, typed: what `pirl.train.rl` and `pirl.train.rl_core` need from an env,
from a learner's step, from a pool of rollout workers and from a group of learners.

Each has an in-process and a distributed implementation:

- `ChunkEnv`: `envs.base.VLAEnv` (every simulator adapter);
- `TrainStep`: `rl_core.LocalLearner.train_step`, `rollout.learner.LearnerGroup.train_step`;
- `WorkerPool`: `rl.LocalPool` (one worker sharing the driver's agent), `rollout.worker.WorkerPool`
  (Ray actors);
- `LearnerGroup`: `rl.LocalLearnerGroup` (one process, AdamW), `rollout.learner.LearnerGroup`
  (DeepSpeed ranks as Ray actors).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch


class ChunkEnv(Protocol):
    """A batch of `num_envs` envs stepped one action chunk at a time (envs/base.py)."""

    num_envs: int

    def reset(self, seed: int | Sequence[int] | None = None) -> dict[str, Any]:
        """First observations; one seed (env i gets seed + i) or one per env."""
        ...

    def step_chunk(self, actions: np.ndarray, n_exec: int | None = None
                   ) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Execute actions[:, :n_exec]: (obs, reward [B], terminated [B], truncated [B], info)."""
        ...

    def step_groups(self) -> list[list[int]]:
        """Env indices per group that can step while the others' chunks are computed (one group per
        worker process; one group of all envs where nothing steps in the background)."""
        ...

    def begin_chunk(self, indices: Sequence[int], actions: np.ndarray, n_exec: int | None = None) -> Any:
        """step_chunk for envs `indices` alone, started; returns at once where they step in the background."""
        ...

    def finish_chunk(self, pending: Any) -> tuple[dict[str, Any], np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """step_chunk's outputs for a begun chunk, one row per env of its `indices`."""
        ...

    def abandon_chunk(self, pending: Any) -> None:
        """Drop a begun chunk (a rollout stopped on an error); the env needs reset() again."""
        ...

    def close(self) -> None: ...


class TrainStep(Protocol):
    """One optimizer step: `loss_fn(module, minibatch) -> (loss, {name: scalar})` on `minibatch`;
    returns the step's metrics as floats (loss, grad_norm, the loss function's own)."""

    def __call__(self, minibatch: Any, loss_fn: Callable) -> dict[str, float]: ...


class WorkerPool(Protocol):
    """Rollout workers, each with `model`, `version`, `index` and `scratch`."""

    workers: list
    restarts: list[int]
    """Replacements of each worker so far (a dead worker is replaced and its call retried)."""

    def sync(self, snapshot: Any) -> int:
        """Hand every worker the learners' weights (`LearnerGroup.snapshot_ref()`); their version."""
        ...

    def map(self, fn: Callable, *args: Any, **kwargs: Any) -> list[Any]:
        """`fn(worker, *args, **kwargs)` on every worker; results in worker order."""
        ...

    def call(self, i: int, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """`fn(worker_i, *args, **kwargs)`."""
        ...

    def shutdown(self) -> None: ...


class LearnerGroup(Protocol):
    """The learners: optimizer steps, weights out, checkpointed state."""

    def train_step(self, minibatch: Any, loss_fn: Callable) -> dict[str, float]:
        """One optimizer step (a `TrainStep`)."""
        ...

    def set_lr_scale(self, scale: float) -> None:
        """Every learning rate := `scale` x its initial value, for the steps that follow."""
        ...

    def snapshot_ref(self, trainable_only: bool = True) -> Any:
        """The current weights, in the form `WorkerPool.sync` takes."""
        ...

    def get_weights(self, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """The current parameters as CPU tensors."""
        ...

    def save_checkpoint(self, directory: str, tag: str | None = None) -> None:
        """The optimizer's (and, distributed, the partitioned model's) state, into `directory`."""
        ...

    def load_checkpoint(self, directory: str, tag: str | None = None) -> int: ...

    def shutdown(self, graceful: bool = True) -> None: ...
