"""Where actors run: collocated or disaggregated placement with one Ray placement group.

- **collocated**: one bundle per learner; learner ``r`` and the rollout workers ``i`` with
  ``i % num_learners == r`` share bundle ``r`` (on a GPU node: one GPU per bundle, split by the
  fractional ``learner_gpus`` + ``worker_gpus``; the models take turns / offload between phases).
- **disaggregated**: one bundle per actor; learners in bundles ``0 .. L-1``, rollout workers in
  ``L .. L+W-1`` (separate GPUs, rollout and training overlap).

On a CPU box everything is fractional CPUs. Keep light actors at <= 0.25 CPU there: on 2 cores,
bundles that add up to more than the cluster's CPUs never become ready and Ray waits forever
(``Placement.create`` times out instead).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


@dataclass(frozen=True)
class PlacementConfig:
    """Resources and layout of learners and rollout workers."""

    mode: Literal["collocated", "disaggregated"] = "collocated"
    """collocated: a learner and its rollout workers share a bundle; disaggregated: one bundle each."""
    num_learners: int = 1
    """DeepSpeed data-parallel ranks."""
    num_workers: int = 1
    """Rollout workers."""
    learner_cpus: float = 0.25
    """CPUs reserved per learner (a scheduling ticket; threads are set separately)."""
    worker_cpus: float = 0.25
    """CPUs reserved per rollout worker."""
    learner_gpus: float = 0.0
    """GPUs per learner (fractional when collocated, e.g. 0.5)."""
    worker_gpus: float = 0.0
    """GPUs per rollout worker."""
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy across nodes."""
    ready_timeout_s: float = 120.0
    """Fail (instead of hanging) when the bundles cannot be reserved within this time."""

    def __post_init__(self):
        if self.mode not in ("collocated", "disaggregated"):
            raise ValueError(f"PlacementConfig.mode: {self.mode!r} (collocated | disaggregated)")
        if self.num_learners < 1 or self.num_workers < 0:
            raise ValueError("PlacementConfig: need num_learners >= 1 and num_workers >= 0")


def _resources(cpus: float, gpus: float) -> dict[str, float]:
    out = {"CPU": float(cpus)}
    if gpus > 0:
        out["GPU"] = float(gpus)
    return out


def _add(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in set(a) | set(b)}


class Placement:
    """A reserved placement group and the actor options that put each actor in its bundle."""

    def __init__(self, cfg: PlacementConfig, pg: PlacementGroup, bundles: list[dict[str, float]]):
        self.cfg, self.pg, self.bundles = cfg, pg, bundles

    @classmethod
    def create(cls, cfg: PlacementConfig) -> "Placement":
        """Reserve the bundles (blocks until ready or ``cfg.ready_timeout_s``)."""
        learner = _resources(cfg.learner_cpus, cfg.learner_gpus)
        worker = _resources(cfg.worker_cpus, cfg.worker_gpus)
        if cfg.mode == "collocated":
            bundles = [dict(learner) for _ in range(cfg.num_learners)]
            for i in range(cfg.num_workers):
                r = i % cfg.num_learners
                bundles[r] = _add(bundles[r], worker)
        else:
            bundles = [dict(learner) for _ in range(cfg.num_learners)]
            bundles += [dict(worker) for _ in range(cfg.num_workers)]
        pg = placement_group(bundles, strategy=cfg.strategy)
        ready = pg.ready()
        done, _ = ray.wait([ready], timeout=cfg.ready_timeout_s)
        if not done:
            remove_placement_group(pg)
            raise TimeoutError(
                f"placement group {bundles} not ready after {cfg.ready_timeout_s} s: "
                f"cluster resources {ray.cluster_resources()}"
            )
        return cls(cfg, pg, bundles)

    def learner_bundle(self, rank: int) -> int:
        return rank

    def worker_bundle(self, index: int) -> int:
        if self.cfg.mode == "collocated":
            return index % self.cfg.num_learners
        return self.cfg.num_learners + index

    def _options(self, bundle: int, cpus: float, gpus: float) -> dict[str, Any]:
        return {
            "num_cpus": cpus,
            "num_gpus": gpus,
            "scheduling_strategy": PlacementGroupSchedulingStrategy(
                placement_group=self.pg,
                placement_group_bundle_index=bundle,
                placement_group_capture_child_tasks=True,
            ),
        }

    def learner_options(self, rank: int) -> dict[str, Any]:
        """``ActorClass.options(**...)`` for learner ``rank``."""
        return self._options(self.learner_bundle(rank), self.cfg.learner_cpus, self.cfg.learner_gpus)

    def worker_options(self, index: int) -> dict[str, Any]:
        """``ActorClass.options(**...)`` for rollout worker ``index``."""
        return self._options(self.worker_bundle(index), self.cfg.worker_cpus, self.cfg.worker_gpus)

    def remove(self) -> None:
        remove_placement_group(self.pg)
