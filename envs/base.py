"""The one batched VLA env API shared by every simulator adapter.

Observation (DESIGN.md contract), for a batch of B envs:
    {"images": {camera: uint8 [B, H, W, 3]}, "state": float32 [B, S], "prompt": list[str]}

`step_chunk(actions [B, H, D_pad], n_exec)` executes actions[:, :n_exec, :D] (D = the env's real
action dims; padded dims are cut) env by env, step by step. An env whose episode ends inside the
chunk executes nothing more; after the chunk it is reset (auto-reset) with the next seed of its
deterministic seed sequence, and the returned observation of that env is the first observation of
its new episode (the last one of the finished episode is in info["final_obs"]).
`begin_chunk` / `finish_chunk` do the same for a subset of envs in two halves, so that a process
pool steps one group of envs while the caller computes the next chunk of another (`step_groups`).

Units: actions are in the simulator's own units; a policy's processor (`vla.normalize`) un-normalises
its chunks before they reach an env (envs never normalise).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Protocol, Sequence

import numpy as np

from .config import CommonEnvConfig
from .video import VideoRecorder
from .workers import EnvWorkerError

log = logging.getLogger(__name__)


class ActionError(ValueError):
    """An action chunk is malformed (shape, dtype, NaN/inf); raised before the simulator sees it."""


@dataclass(frozen=True)
class EnvSpec:
    """What a model needs to know about an env (names of cameras and state dims, action size)."""

    cameras: dict[str, tuple[int, int]]  # camera -> (H, W)
    state_dim: int
    state_names: tuple[str, ...]
    action_dim: int
    max_episode_steps: int
    control_mode: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Backend(Protocol):
    """A set of envs that can be reset and stepped by index (a process pool, or one GPU sim).

    A backend that steps envs in the background also has `groups` (env indices per process) and
    begin_step_envs_chunk / finish_step_envs_chunk (`PoolBackend`); VLAEnv then steps whole
    sub-chunks in the processes and can keep several groups' chunks in flight."""

    num_envs: int

    def env_spec(self) -> EnvSpec: ...
    def reset_envs(self, indices: Sequence[int], seeds: Sequence[int], hard: bool = False
                   ) -> tuple[dict, list[int]]: ...
    def step_envs(self, indices: Sequence[int], actions: np.ndarray) -> tuple[dict, list[int]]: ...
    def close(self) -> None: ...


def _to_numpy(actions: Any) -> np.ndarray:
    if hasattr(actions, "detach"):  # a torch tensor; envs/ does not import torch
        actions = actions.detach().cpu().numpy()
    try:
        return np.asarray(actions, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ActionError(f"actions must be a float array [B, H, D]: {exc}") from exc


def stack_obs(per_env: Sequence[dict], cameras: Sequence[str]) -> dict[str, Any]:
    """List of single-env observations -> one batched observation (the contract above)."""
    return {
        "images": {cam: np.stack([o["images"][cam] for o in per_env]) for cam in cameras},
        "state": np.stack([o["state"] for o in per_env]).astype(np.float32, copy=False),
        "prompt": [o["prompt"] for o in per_env],
    }


@dataclass
class _ChunkOutcome:
    """What one step_chunk call gathers, env by env: its outputs and which envs still run."""

    reward: np.ndarray  # [B] float64, summed over executed steps
    terminated: np.ndarray  # [B] bool
    truncated: np.ndarray  # [B] bool
    crashed: np.ndarray  # [B] bool, worker restarted
    exec_mask: np.ndarray  # [B, n_exec] bool
    active: np.ndarray  # [B] bool, episode still running in this chunk

    @classmethod
    def empty(cls, num: int, n_exec: int) -> _ChunkOutcome:
        return cls(reward=np.zeros(num, dtype=np.float64), terminated=np.zeros(num, dtype=bool),
                   truncated=np.zeros(num, dtype=bool), crashed=np.zeros(num, dtype=bool),
                   exec_mask=np.zeros((num, n_exec), dtype=bool), active=np.ones(num, dtype=bool))


@dataclass
class PendingChunk:
    """A chunk begun by `VLAEnv.begin_chunk` and not finished yet."""

    indices: np.ndarray  # env indices, in the order of the chunk's rows
    chunk: _ChunkOutcome  # all envs' slots; only `indices` take part
    call: Any = None  # the backend's pending step (None: executed in begin_chunk)


class VLAEnv:
    """Batched env over a Backend: chunked stepping, auto-reset, seeding, episode stats, video."""

    def __init__(self, backend: Backend, config: CommonEnvConfig):
        self.backend = backend
        self.config = config
        self.num_envs = backend.num_envs
        self.spec: EnvSpec = backend.env_spec()
        self._recorders = {i: VideoRecorder(config.video_dir, i, config.video_fps)
                           for i in config.record_video_envs}
        self._base_seeds = np.zeros(self.num_envs, dtype=np.int64)
        self._episode_counts = np.zeros(self.num_envs, dtype=np.int64)
        self._obs: list[dict] | None = None
        self._ep_return = np.zeros(self.num_envs, dtype=np.float64)
        self._ep_length = np.zeros(self.num_envs, dtype=np.int64)
        self._success_once = np.zeros(self.num_envs, dtype=bool)
        self._success = np.zeros(self.num_envs, dtype=bool)
        self.crash_log: list[int] = []  # env indices whose worker was restarted, in order
        # Envs whose process died during a call that did not include them (a worker hosting several
        # envs crashed while resetting a neighbour): their episode is lost; the next step_chunk
        # reports them as crashed and truncated without stepping them.
        self._lost = np.zeros(self.num_envs, dtype=bool)

    # ---- seeding ---------------------------------------------------------------------------
    def episode_seed(self, index: int) -> int:
        """Seed of env `index`'s current episode: base seed + episode count * num_envs.

        With distinct base seeds (seed + i) every (env, episode) gets its own seed; envs given the
        same base seed (GRPO groups) walk the same sequence of initial states.
        """
        return int(self._base_seeds[index] + self._episode_counts[index] * self.num_envs)

    # ---- API -------------------------------------------------------------------------------
    def reset(self, seed: int | Sequence[int] | None = None) -> dict[str, Any]:
        """Reset every env. seed: int (env i gets seed + i), one seed per env, or None (config)."""
        if seed is None:
            seed = self.config.seed
        if np.ndim(seed) == 0:
            seeds = int(seed) + np.arange(self.num_envs)
        else:
            seeds = np.asarray(seed, dtype=np.int64)
            if seeds.shape != (self.num_envs,):
                raise ValueError(f"reset: {len(seeds)} seeds for {self.num_envs} envs")
        self._base_seeds = seeds.astype(np.int64)
        self._episode_counts[:] = 0
        for rec in self._recorders.values():
            rec.discard()
        indices = list(range(self.num_envs))
        # A full reset rebuilds each scene (hard) so that an episode does not depend on what the
        # env simulated before (PhysX keeps contact caches across cheap resets).
        results = self._reset_indices(indices, hard=True)
        self._lost[:] = False
        self._obs = [results[i][0] for i in indices]
        self._ep_return[:] = 0
        self._ep_length[:] = 0
        self._success_once[:] = False
        self._success[:] = False
        for i, rec in self._recorders.items():
            rec.add(self._frame(self._obs[i], results[i][1]))
        return stack_obs(self._obs, list(self.spec.cameras))

    def _reset_indices(self, indices: list[int], hard: bool = False) -> dict[int, tuple[dict, dict]]:
        seeds = [self.episode_seed(i) for i in indices]
        hard = hard or bool(getattr(self.config, "hard_reset", False))
        results, crashed = self.backend.reset_envs(indices, seeds, hard)
        wanted = set(indices)
        for _ in range(3):  # a worker that crashed during reset is rebuilt; try it again
            crashed = self._note_crashed(crashed, wanted)
            if not crashed:
                break
            more, crashed = self.backend.reset_envs(crashed, [self.episode_seed(i) for i in crashed], hard)
            results.update(more)
        if crashed:
            raise EnvWorkerError(crashed[0], "worker crashed repeatedly during reset")
        return results

    def _note_crashed(self, crashed: Sequence[int], wanted: set[int]) -> list[int]:
        """Log crashed envs; those outside the call (`wanted`) are marked lost. Returns the rest."""
        self.crash_log.extend(crashed)
        for i in crashed:
            if i not in wanted:
                self._lost[i] = True
        return [i for i in crashed if i in wanted]

    def validate_actions(self, actions: Any, n_exec: int | None, num_rows: int | None = None
                         ) -> tuple[np.ndarray, int]:
        """actions [num_rows (default num_envs), H, D_pad] -> the executed part [num_rows, n_exec, D]."""
        arr = _to_numpy(actions)
        if arr.ndim != 3:
            raise ActionError(f"actions must be [B, H, D_pad], got shape {arr.shape}")
        batch, horizon, dims = arr.shape
        expected = self.num_envs if num_rows is None else num_rows
        if batch != expected:
            raise ActionError(f"actions batch {batch} != {expected} envs")
        if dims < self.spec.action_dim:
            raise ActionError(f"actions have {dims} dims, the env needs {self.spec.action_dim}")
        n_exec = horizon if n_exec is None else int(n_exec)
        if not 1 <= n_exec <= horizon:
            raise ActionError(f"n_exec={n_exec} outside [1, H={horizon}]")
        executed = arr[:, :n_exec, : self.spec.action_dim]
        if not np.isfinite(executed).all():
            bad = np.argwhere(~np.isfinite(executed))[0]
            raise ActionError(f"non-finite action at env {bad[0]}, step {bad[1]}, dim {bad[2]}")
        return np.ascontiguousarray(executed, dtype=np.float32), n_exec

    def step_chunk(self, actions: Any, n_exec: int | None = None):
        """Execute the first n_exec actions of each env's chunk.

        Returns obs, reward [B] (sum over executed steps), terminated [B], truncated [B], info with
        per-env arrays: success (at the last executed step), success_once (latched over the
        episode), episode_return, episode_length (of the finished episode where done), done,
        exec_mask [B, n_exec] (which actions were executed), crashed (worker restarted),
        final_obs (last obs before auto-reset; equals obs where not done).
        """
        return self.finish_chunk(self.begin_chunk(range(self.num_envs), actions, n_exec))

    def step_groups(self) -> list[list[int]]:
        """Env indices that can step while the others' chunks are prepared: one group per worker
        process when the backend steps envs in the background (a process pool), else one group.
        A pipelined rollout keeps one chunk in flight per group (`begin_chunk`)."""
        if hasattr(self.backend, "begin_step_envs_chunk"):
            return [list(group) for group in self.backend.groups]
        return [list(range(self.num_envs))]

    def begin_chunk(self, indices: Sequence[int], actions: Any, n_exec: int | None = None) -> PendingChunk:
        """`step_chunk` for the envs `indices` alone (actions [len(indices), H, D_pad]), in two halves:
        this one starts the chunk, and returns while a process pool steps it; `finish_chunk` waits
        for it, auto-resets, and returns step_chunk's outputs with one row per env of `indices`.
        Chunks of different `step_groups` may be in flight together; each env keeps its own seed
        sequence, episode stats and video, so splitting a batch changes nothing an env returns.
        Backends without background stepping execute the chunk here."""
        if self._obs is None:
            raise RuntimeError("call reset() before step_chunk()")
        indices = np.asarray(indices, dtype=np.int64)
        executed, n_exec = self.validate_actions(actions, n_exec, len(indices))
        if len(indices) != self.num_envs:  # rows by env index, as the step functions read them
            full = np.zeros((self.num_envs, *executed.shape[1:]), dtype=executed.dtype)
            full[indices] = executed
            executed = full
        chunk = _ChunkOutcome.empty(self.num_envs, n_exec)
        chunk.active[:] = False
        chunk.active[indices] = True
        for i in indices[self._lost[indices]]:
            self._crash(chunk, int(i), 0, logged=True)  # lost while a neighbour in its process was reset
        self._lost[indices] = False
        pending = PendingChunk(indices, chunk)
        if hasattr(self.backend, "begin_step_envs_chunk"):
            # Process pools: the whole sub-chunk in one message per process.
            stepping = np.flatnonzero(chunk.active).tolist()
            pending.call = self.backend.begin_step_envs_chunk(stepping, executed[stepping])
        else:
            self._execute_step_by_step(chunk, executed, n_exec)
        return pending

    def finish_chunk(self, pending: PendingChunk):
        """The second half of `begin_chunk`: step_chunk's outputs for its envs (rows in its order)."""
        chunk, indices = pending.chunk, pending.indices
        if pending.call is not None:
            self._record_from_workers(chunk, indices, *self.backend.finish_step_envs_chunk(pending.call))
        done = chunk.terminated | chunk.truncated
        final_obs = stack_obs([self._obs[i] for i in indices], list(self.spec.cameras))
        info = self._chunk_info(chunk, indices, done[indices], final_obs)
        done_indices = np.flatnonzero(done).tolist()
        if done_indices:
            self._auto_reset(done_indices)
            obs = stack_obs([self._obs[i] for i in indices], list(self.spec.cameras))
        else:
            obs = final_obs
        return (obs, chunk.reward[indices].astype(np.float32), chunk.terminated[indices],
                chunk.truncated[indices], info)

    def abandon_chunk(self, pending: PendingChunk) -> None:
        """Drop a chunk that will not be finished (the rollout stopped on an error): its answers are
        read, so the next command to those processes gets its own; the env needs reset() again."""
        if pending.call is not None:
            with contextlib.suppress(EnvWorkerError):
                self.backend.finish_step_envs_chunk(pending.call)
        self._obs = None

    def _record_from_workers(self, chunk: _ChunkOutcome, indices: np.ndarray, results: dict,
                             crashed: list[int]) -> None:
        """A process pool's answer: each env's steps; envs of a dead process outside the chunk are
        marked lost (their next chunk reports them)."""
        for i in self._note_crashed(crashed, set(indices.tolist())):
            self._crash(chunk, i, 0, logged=True)
        for i, steps in results.items():
            for k, result in enumerate(steps):
                self._record(chunk, i, k, result)

    def _execute_step_by_step(self, chunk: _ChunkOutcome, executed: np.ndarray, n_exec: int) -> None:
        """Other backends: one backend call per chunk step, over the envs still in their episode."""
        for k in range(n_exec):
            indices = np.flatnonzero(chunk.active).tolist()
            if not indices:
                break
            results, crashed = self.backend.step_envs(indices, executed[indices, k])
            for i in crashed:
                self._crash(chunk, i, k)
            for i, result in results.items():
                self._record(chunk, i, k, result)

    def _crash(self, chunk: _ChunkOutcome, i: int, k: int, logged: bool = False) -> None:
        """The episode is lost with the process: end it as truncated, keep the last obs."""
        if not logged:
            self.crash_log.append(i)
        if not chunk.active[i]:
            return  # its episode already ended in this chunk; the rebuilt env is reset after it
        chunk.crashed[i] = True
        chunk.truncated[i] = True
        chunk.active[i] = False
        log.warning("env %d crashed at chunk step %d; worker restarted, episode truncated", i, k)

    def _record(self, chunk: _ChunkOutcome, i: int, k: int, result) -> None:
        """One executed step of env i (chunk step k): obs, reward, episode stats, video frame, episode end."""
        obs, rew, term, trunc, info = result
        chunk.exec_mask[i, k] = True
        self._obs[i] = obs
        chunk.reward[i] += rew
        self._ep_return[i] += rew
        self._ep_length[i] += 1
        self._success[i] = bool(info.get("success", False))
        self._success_once[i] |= self._success[i]
        if i in self._recorders:
            self._recorders[i].add(self._frame(obs, info))
        if term or trunc:
            chunk.terminated[i], chunk.truncated[i] = bool(term), bool(trunc) and not term
            chunk.active[i] = False

    def _chunk_info(self, chunk: _ChunkOutcome, indices: np.ndarray, done: np.ndarray, final_obs: dict
                    ) -> dict[str, Any]:
        """step_chunk's info (see its doc) for envs `indices`, taken before the finished episodes are reset."""
        return {
            "success": self._success[indices],
            "success_once": self._success_once[indices],
            "episode_return": self._ep_return[indices],
            "episode_length": self._ep_length[indices],
            "done": done,
            "exec_mask": chunk.exec_mask[indices],
            "crashed": chunk.crashed[indices],
            "final_obs": final_obs,
        }

    def _auto_reset(self, done_indices: list[int]) -> None:
        """Close the finished episodes (videos, episode counts) and start each env's next one."""
        for i in done_indices:
            if i in self._recorders:
                self._recorders[i].finish(success=bool(self._success_once[i]))
            self._episode_counts[i] += 1
        results = self._reset_indices(done_indices)
        for i in done_indices:
            self._obs[i] = results[i][0]
            self._ep_return[i] = 0.0
            self._ep_length[i] = 0
            self._success_once[i] = False
            self._success[i] = False
            if i in self._recorders:
                self._recorders[i].add(self._frame(self._obs[i], results[i][1]))

    def _frame(self, obs: dict, info: dict) -> np.ndarray | None:
        if "frame" in info:
            return info["frame"]
        if obs["images"]:
            return next(iter(obs["images"].values()))
        return None

    def close(self) -> None:
        for rec in self._recorders.values():
            rec.discard()
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PoolBackend:
    """Backend over a SubprocEnvPool of single envs (ManiSkill CPU, LIBERO)."""

    def __init__(self, pool):
        self.pool = pool
        self.num_envs = pool.num_envs

    def env_spec(self) -> EnvSpec:
        """The envs' common spec; a batch whose envs disagree on shapes cannot be stacked."""
        first = self.pool.specs[0]
        for i, spec in enumerate(self.pool.specs):
            for field in ("state_dim", "action_dim", "cameras", "control_mode"):
                if getattr(spec, field) != getattr(first, field):
                    raise ValueError(
                        f"env {i} has {field}={getattr(spec, field)!r} but env 0 has {getattr(first, field)!r}: "
                        "the envs of one batch (e.g. a multi-task list) must give observations and actions "
                        "of one shape (ManiSkill: obs_mode 'rgb' with shared state_keys)")
        return first

    def reset_envs(self, indices, seeds, hard=False):
        """Reset envs with seeds; `crashed` may name envs outside `indices` (see finish_step_envs_chunk)."""
        return self.pool.call_many("reset", list(indices), [(int(s), bool(hard)) for s in seeds])

    def step_envs(self, indices, actions):
        return self.pool.call_many("step", list(indices), list(actions))

    @property
    def groups(self) -> list[list[int]]:
        """Env indices per worker process (VLAEnv.step_groups)."""
        return self.pool.groups

    def begin_step_envs_chunk(self, indices, actions):
        """actions [len(indices), n, d]: each env runs its n actions inside its worker process,
        stopping at its episode end. Sends and returns at once; `finish_step_envs_chunk` waits."""
        return self.pool.send_many("step_chunk", list(indices), list(actions))

    def finish_step_envs_chunk(self, pending):
        """({index: [step results]}, crashed) of a chunk begun above. `crashed` may name envs
        outside it that shared a process that died."""
        return self.pool.receive_many(pending)

    def close(self) -> None:
        self.pool.close()
