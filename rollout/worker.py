"""Rollout workers (Ray actors holding a model copy) and the pool that supervises them.

A :class:`RolloutWorker` knows nothing about environments or sampling: it holds ``model`` (built by
a picklable factory), the weight ``version`` it carries, and a ``scratch`` dict; rollout logic is
plugged in as a picklable ``fn(worker, *args, **kwargs)`` passed to :meth:`RolloutWorker.run`
(persistent things such as simulators are built once by ``setup_fn(worker)`` and kept in
``worker.scratch``).

:class:`WorkerPool` creates the workers (optionally inside a :class:`rollout.placement.Placement`),
broadcasts weight snapshots, and survives dead workers: when a call fails with
``ray.exceptions.RayActorError`` (process killed, OOM, segfault in a simulator) or exceeds
``call_timeout_s``, the worker is replaced by a fresh actor in the same bundle, re-synced to the
latest weights, and the call is retried. ``fn`` must therefore be safe to run again from scratch.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError

from rollout.placement import Placement
from rollout.weights import WeightSnapshot, load_into

log = logging.getLogger(__name__)


class StaleWeightsError(RuntimeError):
    """A worker was offered weights older than the ones it holds, or a call expected another version."""


class RolloutWorker:
    """One rollout process: a model copy, its weight version, and a generic ``run`` hook."""

    def __init__(
        self,
        index: int,
        model_factory: Callable[[], torch.nn.Module],
        setup_fn: Callable[["RolloutWorker"], None] | None = None,
        seed: int = 0,
        torch_threads: int = 1,
    ):
        torch.set_num_threads(torch_threads)
        torch.manual_seed(seed + index)
        self.index = index
        self.model = model_factory()
        self.model.eval()
        self.version = -1  # no weights from a learner yet
        self.scratch: dict[str, Any] = {}
        if setup_fn is not None:
            setup_fn(self)

    def load_weights(self, snapshot: WeightSnapshot) -> bool:
        """Load ``snapshot`` (its ``version`` travels with it) into the model's trainable parameters.

        Older than the current version: :class:`StaleWeightsError`. Same version: nothing to do,
        returns False. Newer: copied in, returns True.
        """
        if snapshot.version < self.version:
            raise StaleWeightsError(
                f"worker {self.index}: offered weights v{snapshot.version}, holds v{self.version}"
            )
        if snapshot.version == self.version:
            return False
        load_into(self.model, snapshot)
        self.version = snapshot.version
        return True

    def weight_version(self) -> int:
        return self.version

    def pid(self) -> int:
        return os.getpid()

    def run(self, fn: Callable, *args, expected_version: int | None = None, **kwargs) -> Any:
        """``fn(self, *args, **kwargs)``; with ``expected_version``, refuse to run on other weights
        (so that a trajectory is never stamped with the wrong policy version)."""
        if expected_version is not None and expected_version != self.version:
            raise StaleWeightsError(
                f"worker {self.index}: call expects weights v{expected_version}, holds v{self.version}"
            )
        return fn(self, *args, **kwargs)


@dataclass(frozen=True)
class WorkerPoolConfig:
    """Rollout worker pool settings."""

    num_workers: int = 1
    """Rollout worker actors."""
    worker_cpus: float = 0.25
    """CPUs per worker when no placement is given (<= 0.25 for light actors on a 2-core box)."""
    worker_gpus: float = 0.0
    """GPUs per worker when no placement is given."""
    max_restarts: int = 3
    """Replacements allowed per worker over the pool's life; past that the error propagates."""
    call_timeout_s: float | None = None
    """A call running longer is treated like a dead worker (killed, replaced, retried); None waits."""
    seed: int = 0
    """Worker i seeds torch with seed + i."""
    torch_threads: int = 1
    """Intra-op threads per worker."""

    def __post_init__(self):
        if self.num_workers < 1 or self.max_restarts < 0:
            raise ValueError("WorkerPoolConfig: num_workers >= 1 and max_restarts >= 0 required")


class WorkerPool:
    """Creates, feeds and supervises :class:`RolloutWorker` actors."""

    def __init__(
        self,
        cfg: WorkerPoolConfig,
        model_factory: Callable[[], torch.nn.Module],
        setup_fn: Callable[[RolloutWorker], None] | None = None,
        placement: Placement | None = None,
    ):
        if placement is not None and placement.cfg.num_workers != cfg.num_workers:
            raise ValueError("WorkerPool: placement and config disagree on num_workers")
        self.cfg, self.model_factory, self.setup_fn, self.placement = cfg, model_factory, setup_fn, placement
        self.restarts = [0] * cfg.num_workers
        self._latest: ray.ObjectRef | None = None  # the last snapshot broadcast, for re-syncs
        self.version = -1
        self.workers = [self._spawn(i) for i in range(cfg.num_workers)]
        ray.get([w.pid.remote() for w in self.workers])  # wait until built: fail here, not mid-rollout

    def _spawn(self, i: int):
        if self.placement is not None:
            options = self.placement.worker_options(i)
        else:
            options = {"num_cpus": self.cfg.worker_cpus, "num_gpus": self.cfg.worker_gpus}
        actor = ray.remote(RolloutWorker).options(**options, max_restarts=0)
        return actor.remote(i, self.model_factory, self.setup_fn, self.cfg.seed, self.cfg.torch_threads)

    def _replace(self, i: int, why: BaseException) -> None:
        if self.restarts[i] >= self.cfg.max_restarts:
            raise RuntimeError(f"rollout worker {i} failed {self.restarts[i] + 1} times") from why
        self.restarts[i] += 1
        log.warning("rollout worker %d lost (%s: %s); restart %d", i, type(why).__name__, why, self.restarts[i])
        ray.kill(self.workers[i], no_restart=True)
        self.workers[i] = self._spawn(i)
        ray.get(self.workers[i].pid.remote())
        if self._latest is not None:
            ray.get(self.workers[i].load_weights.remote(self._latest))

    def _supervised(self, i: int, submit: Callable[[Any], ray.ObjectRef], ref: ray.ObjectRef | None = None) -> Any:
        """ray.get a call on worker i; on death or timeout replace the worker and resubmit."""
        ref = submit(self.workers[i]) if ref is None else ref
        while True:
            try:
                return ray.get(ref, timeout=self.cfg.call_timeout_s)
            except (RayActorError, GetTimeoutError) as err:
                self._replace(i, err)
                ref = submit(self.workers[i])

    def sync(self, snapshot: ray.ObjectRef | WeightSnapshot) -> int:
        """Broadcast a weight snapshot (preferably the ObjectRef from ``LearnerGroup.snapshot_ref``,
        which every worker maps zero-copy) to all workers. Returns its version."""
        ref = snapshot if isinstance(snapshot, ray.ObjectRef) else ray.put(snapshot)
        pending = [w.load_weights.remote(ref) for w in self.workers]
        self._latest = ref
        for i, p in enumerate(pending):
            self._supervised(i, lambda w: w.load_weights.remote(ref), p)
        self.version = ray.get(self.workers[0].weight_version.remote())
        return self.version

    def call(self, i: int, fn: Callable, *args, **kwargs) -> Any:
        """``fn(worker_i, *args, **kwargs)`` on worker i, surviving its death (see module doc)."""
        return self._supervised(i, lambda w: w.run.remote(fn, *args, **kwargs))

    def map(self, fn: Callable, *args, **kwargs) -> list[Any]:
        """``fn(worker, *args, **kwargs)`` on every worker in parallel; results in worker order."""
        pending = [w.run.remote(fn, *args, **kwargs) for w in self.workers]
        return [
            self._supervised(i, lambda w: w.run.remote(fn, *args, **kwargs), p)
            for i, p in enumerate(pending)
        ]

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
