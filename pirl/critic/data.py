"""Critic data: LeRobot datasets -> chunk transitions with frozen policy features (METHODS.md §5).

Any dataset `envs.dataset.LeRobotReader` reads works:
- RL data from `pirl collect` carries per-step rewards, terminations, truncations, success, the
  chunk boundaries the policy used, and each episode's final observation;
- demos (`pirl demos`, or a LeRobot dataset of successful demonstrations) carry none of these: they
  are read as episodes that terminate with success at their last frame (reward 1 there, 0 before),
  the sparse reward `reward="success"` gives every dataset.

A transition is a window of h consecutive executed actions of one episode starting at row t:
(s_t, a_{t:t+h}, r_{t:t+h}, terminated_{t:t+h}, s_{t+h}). Windows start at every step
(`starts="all"`, Q-chunking's sampling) or only where a policy chunk started (`starts="chunks"`:
the recorded boundaries, or rows 0, h, 2h, ... of an episode without them). A window that crosses an
episode end is dropped (METHODS.md §5); one that ends exactly at a termination has m = 0 (nothing to
bootstrap); one that ends exactly at a time-limit truncation bootstraps from the episode's final
observation (RL data with state observations), or is dropped when that observation is not stored.

The policy is frozen, so its features of every observation are computed once here, then training
only runs small MLPs: CPU training of the critic is cheap even when the policy is not. In a
data-parallel run (`accelerator` given, several processes) each rank computes the features of a
contiguous block of the observation batches and every rank then holds all of them (`_shard_features`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from pirl.critic.q import feature_dim, policy_features
from pirl.train.logger import progress_bar
from vla.policy import FlowPolicy
from vla.processor import Processor

log = logging.getLogger(__name__)

REWARDS = ("success", "env")
NO_NEXT = np.iinfo(np.int64).min
"""`chunk_windows`' marker of a window that ends at a termination (nothing to bootstrap)."""


# -- per-step signals -------------------------------------------------------------------------------
def step_signals(reader, reward: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reward [N] float32, terminated [N] bool, truncated [N] bool) of every row of one dataset.

    reward="env": the recorded env reward (`next.reward`; RL data only). reward="success": 1 at the
    first step after which the task counts as solved, else 0 (demos: their last frame, if the
    episode succeeded). Terminations / truncations are the recorded ones; demos terminate at their
    last frame when successful and are otherwise cut without a stored final observation.
    """
    if reward not in REWARDS:
        raise ValueError(f"critic reward must be one of {REWARDS}, got {reward!r}")
    n = len(reader)
    last = np.zeros(n, dtype=bool)
    ep_success = np.zeros(n, dtype=bool)
    for ep in reader.episodes:
        last[ep["to"] - 1] = True
        meta = reader.episode_meta.get(ep["episode_index"], {})
        ep_success[ep["from"]:ep["to"]] = bool(meta.get("success", True))
    terminated = reader.column("next.terminated", bool)
    if terminated is None:
        terminated = reader.column("next.done", bool)
    if terminated is None:
        terminated = last & ep_success
    truncated = reader.column("next.truncated", bool)
    if truncated is None:
        truncated = np.zeros(n, dtype=bool)
    if reward == "env":
        rewards = reader.column("next.reward", np.float32)
        if rewards is None:
            raise ValueError(f"{reader.root}: no per-step rewards (next.reward), e.g. demos; use reward=success")
    else:
        success = reader.column("next.success", bool)
        if success is None:
            success = last & ep_success
        first = np.zeros(n, dtype=bool)
        for ep in reader.episodes:
            hits = np.flatnonzero(success[ep["from"]:ep["to"]])
            if len(hits):
                first[ep["from"] + hits[0]] = True
        rewards = first.astype(np.float32)
    return rewards.astype(np.float32), terminated, truncated


def chunk_windows(episodes: Sequence[tuple[int, int]], terminated: np.ndarray, truncated: np.ndarray,
                  has_final: Sequence[bool], horizon: int, chunk_start: np.ndarray | None = None,
                  starts: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Which windows of `horizon` steps are transitions, and what each bootstraps from.

    episodes: (from, to) row ranges; terminated / truncated: [N] per step; has_final[e]: episode e's
    observation after its last action is stored; chunk_start: [N] recorded chunk boundaries (for
    starts="chunks"). Returns (start rows [M], next [M]) with next = the row of s_{t+h} (>= 0),
    -1 - e for episode e's final observation, or NO_NEXT where the window ends at a termination.
    Windows crossing an episode end, or ending at a truncation without a final observation, are left out.
    """
    if starts not in ("all", "chunks"):
        raise ValueError(f"critic starts must be 'all' or 'chunks', got {starts!r}")
    ended = np.asarray(terminated, bool) | np.asarray(truncated, bool)
    rows, nexts = [], []
    for e, (lo, hi) in enumerate(episodes):
        if starts == "all":
            candidates = range(lo, hi - horizon + 1)
        elif chunk_start is not None:
            candidates = [t for t in np.flatnonzero(chunk_start[lo:hi]) + lo if t + horizon <= hi]
        else:
            candidates = range(lo, hi - horizon + 1, horizon)
        for t in candidates:
            if ended[t : t + horizon - 1].any():  # the episode ends inside the window: crosses it
                continue
            end = t + horizon
            if end < hi:
                nxt = end
            elif terminated[hi - 1]:
                nxt = NO_NEXT
            elif has_final[e]:
                nxt = -1 - e
            else:
                continue  # cut by the time limit (or the recording), nothing stored to bootstrap from
            rows.append(t)
            nexts.append(nxt)
    return np.asarray(rows, dtype=np.int64), np.asarray(nexts, dtype=np.int64)


# -- the tensors the trainer reads ---------------------------------------------------------------
@dataclasses.dataclass
class CriticData:
    """Transitions over an observation table (frames of every dataset, then stored final observations).

    features [O, F] raw frozen policy features; state [O, S] normalised real state dims;
    obs [M] / next_obs [M] rows of that table (next_obs is any valid row where the window ends at a
    termination: its discount is 0); actions [M, h * d] normalised executed chunk; rewards [M, h];
    terminated [M, h] (float 0/1); episode [M] a global episode id (for the validation split).
    """

    features: Tensor
    state: Tensor
    obs: Tensor
    next_obs: Tensor
    actions: Tensor
    rewards: Tensor
    terminated: Tensor
    episode: Tensor

    def __len__(self) -> int:
        return len(self.obs)

    def to(self, device: str | torch.device) -> "CriticData":
        return dataclasses.replace(self, **{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def subset(self, mask: Tensor) -> "CriticData":
        return dataclasses.replace(self, obs=self.obs[mask], next_obs=self.next_obs[mask], actions=self.actions[mask],
                                   rewards=self.rewards[mask], terminated=self.terminated[mask],
                                   episode=self.episode[mask])

    def summary(self) -> dict:
        done = self.terminated.amax(-1)
        return {"transitions": len(self), "observations": len(self.features),
                "episodes": int(self.episode.unique().numel()),
                "terminal_transitions": int(done.sum()), "mean_chunk_reward": float(self.rewards.sum(-1).mean())
                if len(self) else 0.0}


def _observations(reader, rows: np.ndarray, cameras: dict[str, str]) -> dict:
    return {"images": {model_cam: np.stack([reader.image(data_cam, int(r)) for r in rows])
                       for model_cam, data_cam in cameras.items()},
            "state": reader.state[rows], "prompt": [reader.prompt(int(r)) for r in rows]}


@torch.no_grad()
def observation_features(policy: FlowPolicy, processor: Processor, observations: Sequence[dict], source: str
                         ) -> tuple[Tensor, Tensor]:
    """(features [B, F], normalised real state [B, S]) of observation batches (the policy's inputs)."""
    device = next(policy.parameters()).device
    feats, states = [], []
    dims = processor.norm_stats["state"].dim
    for obs in observations:
        inputs = processor(obs).to(device)
        feats.append(policy_features(policy, policy.embed_prefix(inputs), source).cpu())
        states.append(inputs.state[:, :dims].float().cpu())
    return torch.cat(feats), torch.cat(states)


def dataset_fingerprint(roots: Sequence[str]) -> str:
    """Identity of datasets for the feature cache: their info.json and data file sizes."""
    digest = hashlib.sha256()
    for root in roots:
        path = Path(root)
        digest.update((path / "meta" / "info.json").read_bytes())
        for f in sorted(path.glob("data/**/*.parquet")):
            digest.update(f"{f.relative_to(path)}:{f.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def build_critic_data(policy: FlowPolicy, processor: Processor, roots: Sequence[str], horizon: int, *,
                      reward: str = "success", starts: str = "all", cameras: dict | None = None,
                      feature_source: str = "expert", batch_size: int = 256, cache: Path | None = None,
                      policy_ident: str = "", accelerator=None) -> CriticData:
    """Reads every dataset, cuts its windows and computes the frozen policy features of every
    observation once (cached in `cache`, a .pt file, when given; reused only for the same datasets,
    feature source, cameras and `policy_ident`). One clear error for a missing
    dataset or one whose state / action sizes do not match the policy's norm stats.

    accelerator: an `accelerate.Accelerator` of a data-parallel run (every rank calls this): the ranks
    share the feature passes and all return the same data; only the main process writes `cache`."""
    cameras = dict(cameras or {})
    readers = _open_readers(roots, processor, cameras)
    windows = _Windows(frames=sum(len(r) for r in readers))
    for k, reader in enumerate(readers):
        windows.add(k, reader, processor, horizon, reward, starts, use_finals=not cameras)
    if not sum(len(o) for o in windows.obs_rows):
        raise ValueError(f"critic: no transitions of {horizon} steps in {list(roots)} (episodes too short?)")

    key = json.dumps({"policy": policy_ident, "data": dataset_fingerprint(roots), "source": feature_source,
                      "cameras": cameras,
                      "frames": windows.frames, "finals": windows.final_keys})
    cached = _load_cached_features(cache, key)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        # A rank that computes must not wait alone in the gather: the cache counts only if every rank read it.
        if not all(gather_object([cached is not None])):
            cached = None
    if cached is not None:
        return windows.assemble(*cached)
    plan = _batch_plan(readers, windows, batch_size)
    if accelerator is None or accelerator.num_processes == 1:
        batches = (_load_batch(readers, windows, cameras, part) for part in plan)
        features, state = _compute_features(policy, processor, batches, windows.frames + len(windows.finals),
                                            feature_source)
    else:
        features, state = _shard_features(policy, processor, readers, windows, cameras, plan, feature_source,
                                          accelerator)
    if cache is not None and (accelerator is None or accelerator.is_main_process):
        _save_cached_features(cache, key, features, state)
    return windows.assemble(features, state)


def _open_readers(roots: Sequence[str], processor: Processor, cameras: dict[str, str]) -> list:
    """A reader per dataset root, each checked against the policy's state / action sizes and `cameras`."""
    from envs.dataset import LeRobotReader

    state_dims, action_dims = processor.norm_stats["state"].dim, processor.action_dims
    readers = []
    for root in roots:
        if not (Path(root) / "meta" / "info.json").exists():
            raise FileNotFoundError(f"critic: no dataset at {root} (no meta/info.json; write one with `pirl collect`)")
        reader = LeRobotReader(str(root))
        if reader.state.shape[1] != state_dims or reader.actions.shape[1] != action_dims:
            raise ValueError(f"critic: {root} has state/action dims {reader.state.shape[1]}/{reader.actions.shape[1]}, "
                             f"the policy's norm stats have {state_dims}/{action_dims}: another robot or policy")
        unknown = sorted(set(cameras.values()) - set(reader.camera_keys))
        if unknown:
            raise ValueError(f"critic: cameras {unknown} not in {root} (it has {sorted(reader.camera_keys)})")
        readers.append(reader)
    return readers


@dataclasses.dataclass
class _Windows:
    """The transitions of every dataset before features, one list entry per dataset. Rows index one
    observation table: every dataset's frames in order (`frames` in all), then the stored final
    observations the windows bootstrap from (`finals`, of (dataset, episode) `final_keys`)."""

    frames: int
    obs_rows: list[np.ndarray] = dataclasses.field(default_factory=list)
    next_rows: list[np.ndarray] = dataclasses.field(default_factory=list)
    actions: list[np.ndarray] = dataclasses.field(default_factory=list)
    rewards: list[np.ndarray] = dataclasses.field(default_factory=list)
    terms: list[np.ndarray] = dataclasses.field(default_factory=list)
    episode_ids: list[np.ndarray] = dataclasses.field(default_factory=list)
    finals: list[np.ndarray] = dataclasses.field(default_factory=list)
    final_keys: list[tuple[int, int]] = dataclasses.field(default_factory=list)
    offset: int = 0  # table row of the next dataset's first frame
    episode0: int = 0  # global id of the next dataset's first episode

    def add(self, k: int, reader, processor: Processor, horizon: int, reward: str, starts: str,
            use_finals: bool) -> None:
        """Windows and their signals of dataset k. A final observation helps only if the features need
        nothing but the state (`use_finals`: no images stored)."""
        r, term, trunc = step_signals(reader, reward)
        spans = [(ep["from"], ep["to"]) for ep in reader.episodes]
        final = [reader.episode_final_state(ep["episode_index"]) if use_finals else None for ep in reader.episodes]
        chunk_start = reader.column("chunk_start", bool)
        start, nxt = chunk_windows(spans, term, trunc, [f is not None for f in final], horizon, chunk_start, starts)
        ep_of_row = np.repeat(np.arange(len(spans)), [hi - lo for lo, hi in spans])
        final_row = self._add_finals(k, final, nxt)
        steps = start[:, None] + np.arange(horizon)
        action_dims = processor.action_dims
        norm = processor.normalize_actions(reader.actions)[:, :action_dims]
        offset = self.offset
        self.obs_rows.append(start + offset)
        next_rows = [n + offset if n >= 0 else (start[i] + offset if n == NO_NEXT else final_row[-1 - n])
                     for i, n in enumerate(nxt)]
        self.next_rows.append(np.array(next_rows, dtype=np.int64))
        self.actions.append(norm[steps].reshape(len(start), -1) if len(start) else np.zeros((0, horizon * action_dims)))
        self.rewards.append(r[steps] if len(start) else np.zeros((0, horizon)))
        self.terms.append(term[steps] if len(start) else np.zeros((0, horizon)))
        self.episode_ids.append(ep_of_row[start] + self.episode0)
        self.offset += len(reader)
        self.episode0 += len(spans)

    def _add_finals(self, k: int, final: list, nxt: np.ndarray) -> dict[int, int]:
        """Appends the final observations dataset k's windows bootstrap from; returns episode -> table row."""
        final_row = {}
        for e in sorted({-1 - int(n) for n in nxt if NO_NEXT < n < 0}):
            final_row[e] = self.frames + len(self.finals)
            self.finals.append(final[e])
            self.final_keys.append((k, e))
        return final_row

    def assemble(self, features: Tensor, state: Tensor) -> CriticData:
        cat = np.concatenate
        return CriticData(
            features=features.float(), state=state.float(),
            obs=torch.from_numpy(cat(self.obs_rows)), next_obs=torch.from_numpy(cat(self.next_rows)),
            actions=torch.from_numpy(cat(self.actions).astype(np.float32)),
            rewards=torch.from_numpy(cat(self.rewards).astype(np.float32)),
            terminated=torch.from_numpy(cat(self.terms).astype(np.float32)),
            episode=torch.from_numpy(cat(self.episode_ids).astype(np.int64)),
        )


def _batch_plan(readers: list, windows: _Windows, batch_size: int) -> list[tuple[int, int, int]]:
    """The observation table in batches, in table order: (dataset k, lo, hi) rows of its frames, then
    (-1, lo, hi) of the stored final states. A plan, not the observations: ranks read only their own."""
    plan = [(k, lo, min(lo + batch_size, len(reader))) for k, reader in enumerate(readers)
            for lo in range(0, len(reader), batch_size)]
    finals = len(windows.finals)
    return plan + [(-1, lo, min(lo + batch_size, finals)) for lo in range(0, finals, batch_size)]


def _load_batch(readers: list, windows: _Windows, cameras: dict[str, str], part: tuple[int, int, int]) -> dict:
    """The observations of one `_batch_plan` entry."""
    k, lo, hi = part
    if k >= 0:
        return _observations(readers[k], np.arange(lo, hi), cameras)
    prompts = [readers[d].prompt(readers[d].episodes[e]["from"]) for d, e in windows.final_keys[lo:hi]]
    return {"images": {}, "state": np.stack(windows.finals[lo:hi]), "prompt": prompts}


def _shard_features(policy: FlowPolicy, processor: Processor, readers: list, windows: _Windows, cameras: dict,
                    plan: list[tuple[int, int, int]], feature_source: str, accelerator) -> tuple[Tensor, Tensor]:
    """(features, state) of the whole table on every rank. Rank r computes the r-th contiguous block of
    the plan's batches (the same batches one process would run, so the same numbers), then all gather."""
    rank, world = accelerator.process_index, accelerator.num_processes
    blocks = [plan[r * len(plan) // world:(r + 1) * len(plan) // world] for r in range(world)]
    rows = [sum(hi - lo for _, lo, hi in block) for block in blocks]
    mine = (_load_batch(readers, windows, cameras, part) for part in blocks[rank])
    if rows[rank]:
        features, state = _compute_features(policy, processor, mine, rows[rank], feature_source,
                                            show=accelerator.is_main_process)
    else:  # more ranks than batches
        features = torch.zeros(0, feature_dim(policy, feature_source))
        state = torch.zeros(0, processor.norm_stats["state"].dim)
    # One gather of [features | state] in float32: the dtype every rank agrees on, whatever its shard's.
    table = _gather_rows(accelerator, torch.cat([features.float(), state.float()], -1), rows)
    return table[:, :features.shape[1]], table[:, features.shape[1]:]


def _gather_rows(accelerator, shard: Tensor, rows: list[int]) -> Tensor:
    """Every rank's `shard` ([rows[r], C] on rank r) concatenated in rank order, on every rank.
    all_gather needs one shape on every rank: shards are padded to the longest, the padding cut after."""
    longest = max(rows)
    padded = torch.zeros(longest, shard.shape[1], dtype=shard.dtype)
    padded[:len(shard)] = shard
    gathered = accelerator.gather(padded.to(accelerator.device)).cpu()
    return torch.cat([gathered[r * longest:r * longest + n] for r, n in enumerate(rows)])


def _compute_features(policy: FlowPolicy, processor: Processor, batches, total: int, feature_source: str,
                      show: bool = True) -> tuple[Tensor, Tensor]:
    """observation_features over every batch, with a progress bar over the `total` observations
    (`show`: on the main process only)."""
    bar = progress_bar(total, "critic features", unit="obs", leave=False) if show else tqdm(disable=True)
    feats, states = [], []
    for obs in batches:
        f, s = observation_features(policy, processor, [obs], feature_source)
        feats.append(f)
        states.append(s)
        bar.update(len(f))
    bar.close()
    return torch.cat(feats), torch.cat(states)


def _load_cached_features(cache: Path | None, key: str) -> tuple[Tensor, Tensor] | None:
    """(features, state) stored in `cache` under the same key, else None."""
    if cache is None or not cache.exists():
        return None
    stored = torch.load(cache, weights_only=True)
    if stored.get("key") != key:
        return None
    log.info("critic: policy features of %d observations from %s", len(stored["features"]), cache)
    return stored["features"], stored["state"]


def _save_cached_features(cache: Path, key: str, features: Tensor, state: Tensor) -> None:
    from vla.checkpoint import atomic_file

    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_file(cache, lambda tmp: torch.save({"key": key, "features": features, "state": state}, tmp))
