"""rollout: Ray workers, DeepSpeed learners, weight sync. Places and moves things; no math.

See docs/training-infra.md. Public API:

- :class:`LearnerGroup` / :class:`LearnerConfig` — DeepSpeed data-parallel learners as Ray actors;
  :class:`LearnerLostError` when a rank dies (rebuild the group from a checkpoint).
- :class:`WorkerPool` / :class:`WorkerPoolConfig` / :class:`RolloutWorker` — supervised rollout
  workers with versioned weights.
- :class:`Placement` / :class:`PlacementConfig` — collocated or disaggregated placement groups.
- :class:`WeightSnapshot`, :func:`pack`, :func:`load_into` — flat, zero-copy weight transport.
"""
from rollout.learner import LearnerConfig, LearnerGroup, LearnerLostError, split_batch
from rollout.placement import Placement, PlacementConfig
from rollout.weights import WeightSnapshot, load_into, pack, trainable_parameters
from rollout.worker import RolloutWorker, StaleWeightsError, WorkerPool, WorkerPoolConfig

__all__ = [
    "LearnerConfig", "LearnerGroup", "LearnerLostError", "split_batch", "Placement", "PlacementConfig",
    "WeightSnapshot", "load_into", "pack", "trainable_parameters", "RolloutWorker",
    "StaleWeightsError", "WorkerPool", "WorkerPoolConfig",
]
