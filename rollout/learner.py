"""DeepSpeed learners as Ray actors: one data-parallel rank per actor (gloo on CPU, NCCL on GPU).

The group is model-agnostic. It takes

- ``model_factory()``: a picklable zero-argument callable returning the ``nn.Module`` to train
  (every rank builds it under the same seed; DeepSpeed also broadcasts rank 0's weights);
- ``optimizer_factory(params)``: a picklable callable returning a *torch* optimizer over the
  trainable parameters, e.g. ``functools.partial(torch.optim.AdamW, lr=5e-6, betas=(0.9, 0.95),
  weight_decay=0.01)``. Never name an optimizer in the DeepSpeed config: on CPU that JIT-compiles
  DeepSpeed's fused Adam for minutes;
- ``loss_fn(module, micro_batch) -> loss`` or ``(loss, {name: scalar})``, a picklable callable
  (top-level function or ``functools.partial``) holding all the math (see ``pirl.algos``).

``LearnerGroup.train_step(batch, loss_fn)`` splits the batch into equal per-rank shards; each rank
runs forward/backward on its shard and DeepSpeed averages the gradients, so a step equals one
single-process step on the whole batch with a mean loss.

A rank that dies (killed, OOM, a crashed node) or a call that outlives ``call_timeout_s`` makes every
group method raise :class:`LearnerLostError`. The group cannot go on without it: the surviving ranks
may sit in a collective, and the lost rank's ZeRO partitions are gone. The caller shuts the group down
and builds a new one from its last checkpoint (``pirl.train.rl`` does exactly that).
"""
from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal, Mapping

import ray
import torch
from ray.exceptions import RayActorError

from rollout.placement import Placement, PlacementConfig
from rollout.weights import WeightSnapshot, pack, trainable_parameters


@dataclass(frozen=True)
class LearnerConfig:
    """DeepSpeed learner group settings."""

    num_learners: int = 1
    """Data-parallel ranks (one Ray actor each)."""
    zero_stage: int = 2
    """ZeRO stage 0-3 (0: plain data parallel; 1: optimizer states, 2: + gradients, 3: + parameters
    partitioned across ranks)."""
    grad_clip: float | None = 1.0
    """Global gradient-norm clip (METHODS.md §4: 1.0); None disables it."""
    grad_accum_steps: int = 1
    """Micro batches per optimizer step; ``train_step`` then takes that many micro batches per rank."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """bf16 mixed precision (GPU) or plain fp32 (CPU)."""
    seed: int = 0
    """Seed set on every rank before the model is built."""
    torch_threads: int = 1
    """Intra-op threads per learner (1 on shared CPU boxes: more threads ran 18x slower)."""
    backend: Literal["gloo", "nccl"] | None = None
    """torch.distributed backend; None picks nccl when CUDA is available, else gloo."""
    setup_timeout_s: float = 600.0
    """Fail instead of hanging if the process group / DeepSpeed setup takes longer."""
    call_timeout_s: float | None = None
    """A group call (step, snapshot, checkpoint) running longer counts as a lost rank
    (:class:`LearnerLostError`); None waits. A rank that dies is noticed at once either way."""

    def __post_init__(self):
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"LearnerConfig.zero_stage must be 0-3, got {self.zero_stage}")
        if self.num_learners < 1 or self.grad_accum_steps < 1:
            raise ValueError("LearnerConfig: num_learners and grad_accum_steps must be >= 1")

    def deepspeed_config(self) -> dict[str, Any]:
        """The DeepSpeed config this group runs with (no optimizer entry: it is passed in)."""
        return {
            # Bookkeeping only: batches are handed to train_step, not to a DeepSpeed dataloader.
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": self.grad_accum_steps,
            "train_batch_size": self.grad_accum_steps * self.num_learners,
            "gradient_clipping": float(self.grad_clip or 0.0),
            "zero_optimization": {"stage": self.zero_stage},
            "zero_allow_untested_optimizer": True,
            "bf16": {"enabled": self.precision == "bf16"},
            "steps_per_print": 2**31 - 1,
            "wall_clock_breakdown": False,
        }


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _to_device(x: Any, device: torch.device) -> Any:
    """Move a batch to ``device``: tensors, dicts, lists/tuples of them, or any object with ``.to``."""
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, Mapping):
        return {k: _to_device(v, device) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_device(v, device) for v in x)
    if callable(getattr(x, "to", None)):
        return x.to(device)
    return x


def split_batch(batch: Any, n: int) -> list[Any]:
    """Split a batch into ``n`` equal shards along its leading (sample) dimension.

    - an object with a ``split(n)`` method (e.g. a minibatch dataclass that knows which of its
      tensors are per-sample and which are shared, like ``mask_exec``): ``batch.split(n)``;
    - a tensor: ``chunk`` along dim 0; a list: per-sample items, cut into contiguous runs;
    - a dict or tuple: a structure, each entry split; other leaves are copied to every shard.

    Unequal shards would weight ranks differently in DeepSpeed's gradient mean, so the leading
    size must be divisible by ``n``.
    """
    if isinstance(batch, (str, bytes, int, float, bool)) or batch is None:
        return [batch] * n
    if isinstance(batch, torch.Tensor) and batch.dim() == 0:
        return [batch] * n
    if isinstance(batch, (torch.Tensor, list)):
        if len(batch) % n:
            raise ValueError(f"split_batch: leading size {len(batch)} not divisible by {n}")
        size = len(batch) // n
        return [batch[i * size : (i + 1) * size] for i in range(n)]
    if isinstance(batch, Mapping):
        parts = {k: split_batch(v, n) for k, v in batch.items()}
        return [{k: parts[k][i] for k in parts} for i in range(n)]
    if isinstance(batch, tuple):
        parts = [split_batch(v, n) for v in batch]
        return [type(batch)(p[i] for p in parts) for i in range(n)]
    if callable(getattr(batch, "split", None)):
        shards = list(batch.split(n))
        if len(shards) != n:
            raise ValueError(f"split_batch: {type(batch).__name__}.split({n}) gave {len(shards)} shards")
        return shards
    return [batch] * n


class LearnerLostError(RuntimeError):
    """A learner rank died or stopped answering; the group is unusable and must be rebuilt."""


class Learner:
    """One DeepSpeed rank. Created by :class:`LearnerGroup` as a Ray actor; not used directly."""

    def __init__(self, rank: int, cfg: LearnerConfig, model_factory: Callable, optimizer_factory: Callable):
        torch.set_num_threads(cfg.torch_threads)
        self.rank, self.cfg = rank, cfg
        self.model_factory, self.optimizer_factory = model_factory, optimizer_factory
        self.engine = None

    def address(self) -> tuple[str, int]:
        """(node IP, a free port) — rank 0's becomes the rendezvous address."""
        return ray.util.get_node_ip_address(), _free_port()

    def setup(self, master_addr: str, master_port: int, local_rank: int, local_world_size: int) -> int:
        """Join the process group and build the DeepSpeed engine. Returns the trainable parameter count."""
        import deepspeed

        cfg = self.cfg
        if torch.cuda.is_available():
            # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU, and DeepSpeed picks its device from
            # LOCAL_RANK: the actor's own GPU is always index 0 (one GPU per learner with NCCL).
            local_rank = 0
        os.environ.update(
            RANK=str(self.rank),
            WORLD_SIZE=str(cfg.num_learners),
            LOCAL_RANK=str(local_rank),
            LOCAL_WORLD_SIZE=str(local_world_size),
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
        )
        backend = cfg.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            torch.cuda.set_device(0)  # Ray exposes only this actor's GPU(s)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        torch.manual_seed(cfg.seed)
        model = self.model_factory()
        params = list(trainable_parameters(model).values())
        optimizer = self.optimizer_factory(params)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=cfg.deepspeed_config()
        )
        return sum(p.numel() for p in params)

    @property
    def version(self) -> int:
        """Optimizer steps taken so far: the weight version."""
        return int(self.engine.global_steps)

    def train_step(self, shard: Any, loss_fn: Callable) -> dict[str, float]:
        """One optimizer step on this rank's shard (a list of ``grad_accum_steps`` micro batches
        when accumulating). Returns this rank's metrics as floats."""
        engine = self.engine
        micro = shard if self.cfg.grad_accum_steps > 1 else [shard]
        if len(micro) != self.cfg.grad_accum_steps:
            raise ValueError(f"train_step: expected {self.cfg.grad_accum_steps} micro batches, got {len(micro)}")
        engine.train()
        sums: dict[str, float] = {}
        for mb in micro:
            out = loss_fn(engine.module, _to_device(mb, engine.device))
            loss, metrics = out if isinstance(out, tuple) else (out, {})
            engine.backward(loss)
            engine.step()  # applies the update only at the accumulation boundary
            for k, v in {"loss": loss, **metrics}.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach() if isinstance(v, torch.Tensor) else v)
        result = {k: v / len(micro) for k, v in sums.items()}
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            result["grad_norm"] = float(grad_norm)
        result["version"] = self.version
        return result

    def set_lr_scale(self, scale: float) -> None:
        """Every param group's lr := ``scale`` x the lr the optimizer factory gave it (a schedule)."""
        for group in self.engine.optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
            group["lr"] = group["base_lr"] * scale

    def snapshot(self, trainable_only: bool = True) -> tuple[int, WeightSnapshot | None]:
        """(version, full gathered parameters packed on rank 0); every rank must call it (under
        ZeRO-3 the gather is a collective). Other ranks return (version, None). Called with
        ``num_returns=2``: the small version tells the driver the call succeeded while the snapshot
        itself stays in the object store for the workers."""
        module = self.engine.module
        named = trainable_parameters(module) if trainable_only else dict(module.named_parameters())
        if self.cfg.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(named.values()), modifier_rank=None):
                return self.version, (pack(named, self.version) if self.rank == 0 else None)
        return self.version, (pack(named, self.version) if self.rank == 0 else None)

    def pid(self) -> int:
        return os.getpid()

    def save_checkpoint(self, directory: str, tag: str | None = None) -> None:
        """DeepSpeed checkpoint (model, optimizer, ZeRO partitions); every rank must call it."""
        self.engine.save_checkpoint(directory, tag=tag)

    def load_checkpoint(self, directory: str, tag: str | None = None) -> int:
        self.engine.load_checkpoint(directory, tag=tag)
        return self.version

    def teardown(self) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


class LearnerGroup:
    """N DeepSpeed learner actors (data parallel, ZeRO stage ``cfg.zero_stage``)."""

    def __init__(
        self,
        cfg: LearnerConfig,
        model_factory: Callable[[], torch.nn.Module],
        optimizer_factory: Callable[[list], torch.optim.Optimizer],
        placement: Placement | None = None,
    ):
        self.cfg = cfg
        self._own_placement = placement is None
        if placement is None:
            placement = Placement.create(
                PlacementConfig(mode="disaggregated", num_learners=cfg.num_learners, num_workers=0)
            )
        if placement.cfg.num_learners != cfg.num_learners:
            raise ValueError("LearnerGroup: placement and config disagree on num_learners")
        self.placement = placement
        actor = ray.remote(Learner)
        self.actors = [
            actor.options(**placement.learner_options(r), max_restarts=0).remote(
                r, cfg, model_factory, optimizer_factory
            )
            for r in range(cfg.num_learners)
        ]
        addresses = ray.get([a.address.remote() for a in self.actors], timeout=cfg.setup_timeout_s)
        master_addr, master_port = addresses[0]
        # Local rank = index among the learners on the same node.
        nodes = [ip for ip, _ in addresses]
        local = [nodes[:r].count(nodes[r]) for r in range(len(nodes))]
        counts = [nodes.count(ip) for ip in nodes]
        sizes = ray.get(
            [a.setup.remote(master_addr, master_port, local[r], counts[r]) for r, a in enumerate(self.actors)],
            timeout=cfg.setup_timeout_s,
        )
        self.num_trainable = sizes[0]
        self.version = 0

    def train_step(self, batch: Any, loss_fn: Callable) -> dict[str, float]:
        """One synchronous optimizer step on ``batch`` across all ranks.

        ``batch``: anything :func:`split_batch` splits (tensor / dict / tuple, or an object with
        ``split(n)`` and ``to(device)``), cut into equal per-rank shards (and each shard into
        ``grad_accum_steps`` micro batches); or, when not accumulating, a *list* holding one
        pre-split shard per rank. Returns the rank-mean of every metric plus ``version``.
        """
        n = self.cfg.num_learners
        if isinstance(batch, list) and len(batch) == n and self.cfg.grad_accum_steps == 1:
            shards = batch
        elif self.cfg.grad_accum_steps > 1:
            per_rank = split_batch(batch, n)
            shards = [split_batch(s, self.cfg.grad_accum_steps) for s in per_rank]
        else:
            shards = split_batch(batch, n)
        results = self._gather([a.train_step.remote(s, loss_fn) for a, s in zip(self.actors, shards)])
        out = {k: sum(r[k] for r in results) / n for k in results[0] if k != "version"}
        self.version = out["version"] = results[0]["version"]
        return out

    def set_lr_scale(self, scale: float) -> None:
        """Scale every rank's learning rates to ``scale`` x their initial values (for the following steps)."""
        self._gather([a.set_lr_scale.remote(float(scale)) for a in self.actors])

    def snapshot_ref(self, trainable_only: bool = True) -> ray.ObjectRef:
        """An ObjectRef to rank 0's :class:`WeightSnapshot` (stays in the object store; hand the
        ref itself to workers so they read it zero-copy)."""
        refs = [a.snapshot.options(num_returns=2).remote(trainable_only) for a in self.actors]
        self._gather([version for version, _ in refs])  # every rank took part (and is alive)
        return refs[0][1]

    def get_weights(self, trainable_only: bool = True) -> dict[str, torch.Tensor]:
        """Gathered parameters as CPU tensors (copies), e.g. for tests or export."""
        snap: WeightSnapshot = ray.get(self.snapshot_ref(trainable_only))
        return {k: v.clone() for k, v in snap.tensors().items()}

    def save_checkpoint(self, directory: str, tag: str | None = None) -> None:
        self._gather([a.save_checkpoint.remote(directory, tag) for a in self.actors])

    def load_checkpoint(self, directory: str, tag: str | None = None) -> int:
        self.version = self._gather([a.load_checkpoint.remote(directory, tag) for a in self.actors])[0]
        return self.version

    def pids(self) -> list[int]:
        """The rank processes' ids (rank order)."""
        return self._gather([a.pid.remote() for a in self.actors])

    def _gather(self, refs: list[ray.ObjectRef]) -> list[Any]:
        """ray.get one call per rank, raising :class:`LearnerLostError` as soon as any rank is dead
        (not after the others time out in a collective waiting for it) or past ``call_timeout_s``.
        Errors raised by the called code itself (a bad batch, a NaN check) propagate unchanged."""
        deadline = None if self.cfg.call_timeout_s is None else time.monotonic() + self.cfg.call_timeout_s
        results: dict[ray.ObjectRef, Any] = {}
        pending = list(refs)
        while pending:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
            if not ready:
                raise LearnerLostError(f"a learner call ran past call_timeout_s={self.cfg.call_timeout_s}")
            try:
                results[ready[0]] = ray.get(ready[0])
            except RayActorError as err:
                raise LearnerLostError(f"a learner rank died: {err}") from err
        return [results[r] for r in refs]

    def shutdown(self, graceful: bool = True) -> None:
        """Tear the process group down and kill the actors. ``graceful=False`` (after a lost rank)
        skips the teardown call, which would queue behind a survivor stuck in a collective."""
        if graceful:
            try:
                ray.get([a.teardown.remote() for a in self.actors], timeout=30)
            except Exception:  # noqa: BLE001 - best effort, the actors are killed next
                pass
        for a in self.actors:
            ray.kill(a)
        if self._own_placement:
            self.placement.remove()
