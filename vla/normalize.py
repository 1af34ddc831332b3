"""Normalisation statistics: one `NormStats` for every place that maps raw state / actions to the
policy's units and back (SFT, RL rollouts, evaluation, serving, exploration scales).

An entry of `norm_stats.json` (openpi's layout, {"norm_stats": {"state": {...}, "actions": {...}}})
holds the data statistics and, since they decide what the policy sees, how they are applied
(METHODS.md §2 "Input normalisation must not explode"):

    mean, std, q01, q99      per dim, from the data (min / max too when computed here)
    mode                     "zscore" | "quantile"; absent = the model's default (π0 z-score, π0.5 quantile)
    std_floor                per dim: the z-score divides by max(std, floor) (quantile: the half range)
    clip                     normalised values are clipped to [-clip, clip]; absent = no clip (z-score),
                             [-1, 1] (quantile, as before)
    clip_low, clip_high      per dim: normalised values are clipped to [clip_low, clip_high], e.g. the
                             data's own [min, max] widened by a margin (`robust(range_margin=...)`): a
                             symmetric clip at ±3 also cuts what the data holds (a cube lifted to a high
                             goal sits 5 stds above its mean height, in 4% of PickCube demo frames)
    drop                     dims fed to the policy as 0 (near-constant in the data: a tilt the demos
                             never show carries no information the policy could have learned to use)

Files without the last four fields (openpi's, LeRobot's, older pirl checkpoints) load and normalise
exactly as before. Key "action" (LeRobot's feature name) is read as "actions".
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

NormMode = Literal["zscore", "quantile"]
NORM_MODES = ("zscore", "quantile")
_EPS = 1e-6
_KEY_ALIASES = {"action": "actions"}


@dataclasses.dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one array (state or actions) and how it is normalised."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray
    q99: np.ndarray
    min: np.ndarray | None = None
    max: np.ndarray | None = None
    mode: NormMode | None = None
    std_floor: np.ndarray | None = None
    clip: float | None = None
    drop: tuple[int, ...] = ()
    clip_low: np.ndarray | None = None
    clip_high: np.ndarray | None = None

    def __post_init__(self) -> None:
        names = [f for f in ("mean", "std", "q01", "q99", "min", "max", "std_floor", "clip_low", "clip_high")
                 if getattr(self, f) is not None]
        shapes = {k: np.shape(getattr(self, k)) for k in names}
        if len(set(shapes.values())) != 1 or len(shapes["mean"]) != 1:
            raise ValueError(f"NormStats fields must be 1-D and of one length, got {shapes}")
        if self.mode is not None and self.mode not in NORM_MODES:
            raise ValueError(f"normalisation mode {self.mode!r}: one of {NORM_MODES}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"clip must be > 0, got {self.clip}")
        if (self.clip_low is None) != (self.clip_high is None):
            raise ValueError("clip_low and clip_high go together")
        bad = [d for d in self.drop if not 0 <= d < self.dim]
        if bad:
            raise ValueError(f"drop names dims {bad} outside [0, {self.dim})")

    @property
    def dim(self) -> int:
        return len(self.mean)

    def resolved_mode(self, default: NormMode | None = None) -> NormMode:
        """The recorded mode, else `default` (the model's), else z-score."""
        return self.mode or default or "zscore"

    @classmethod
    def from_data(cls, data: np.ndarray, **settings) -> "NormStats":
        """Statistics of `data` [..., D]; `settings` are the application fields (mode, clip, ...)."""
        data = np.asarray(data, dtype=np.float64).reshape(-1, np.shape(data)[-1])
        if len(data) == 0:
            raise ValueError("NormStats.from_data: no rows")
        return cls(mean=data.mean(0), std=data.std(0), q01=np.quantile(data, 0.01, axis=0),
                   q99=np.quantile(data, 0.99, axis=0), min=data.min(0), max=data.max(0), **settings)

    def robust(self, *, floor_frac: float = 0.0, drop_frac: float = 0.0, clip: float | None = None,
               range_margin: float | None = None, mode: NormMode | None = None) -> "NormStats":
        """These statistics with a std floor, dropped near-constant dims and a clip (METHODS.md §2).

        The scale of a dim is its std (z-score) or half its 1st-99th percentile range (quantile); the
        typical scale is their median over dims. A dim whose scale is below `drop_frac` x typical is
        dropped; every scale is floored at `floor_frac` x typical. So a cube tilt of 2 degrees, whose
        quaternion component has std 0.001 in motion-planner demos, is ~1 unit instead of ~17.
        `range_margin`: each dim is clipped to the data's [min, max] in normalised units, widened by
        this margin (needs min / max, which `from_data` records).
        """
        mode = mode or self.resolved_mode()
        scale = self.scale(mode, floored=False)
        typical = float(np.median(scale))
        floor = np.full(self.dim, floor_frac * typical)
        drop = tuple(sorted(set(self.drop) | {int(i) for i in np.flatnonzero(scale < drop_frac * typical)}))
        out = dataclasses.replace(self, mode=mode, std_floor=floor, clip=clip, drop=drop)
        if range_margin is not None:
            if self.min is None or self.max is None:
                raise ValueError("range_margin needs the data's min / max in the stats")
            low, high = normalize_unclipped(self.min, out, mode), normalize_unclipped(self.max, out, mode)
            out = dataclasses.replace(out, clip_low=low - range_margin, clip_high=high + range_margin)
        return out

    def scale(self, mode: NormMode, floored: bool = True) -> np.ndarray:
        """Raw units per normalised unit, per dim: std (z-score) or half the q01-q99 range (quantile)."""
        if mode == "zscore":
            raw = self.std + _EPS
        elif mode == "quantile":
            raw = (self.q99 - self.q01 + _EPS) / 2.0
        else:
            raise ValueError(f"unknown normalisation mode {mode!r}")
        if floored and self.std_floor is not None:
            raw = np.maximum(raw, self.std_floor)
        return raw

    def to_json(self) -> dict:
        out: dict = {k: np.asarray(getattr(self, k), dtype=np.float64).tolist()
                     for k in ("mean", "std", "q01", "q99", "min", "max", "std_floor", "clip_low", "clip_high")
                     if getattr(self, k) is not None}
        if self.mode is not None:
            out["mode"] = self.mode
        if self.clip is not None:
            out["clip"] = float(self.clip)
        if self.drop:
            out["drop"] = list(self.drop)
        return out

    @classmethod
    def from_json(cls, data: Mapping) -> "NormStats":
        missing = {"mean", "std"} - set(data)
        if missing:
            raise KeyError(f"norm stats entry lacks {sorted(missing)}")

        def arr(key):
            return None if data.get(key) is None else np.asarray(data[key], dtype=np.float64)

        mean, std = arr("mean"), arr("std")
        # Stats written without quantiles (some z-score-only files) fall back to mean -/+ 2.33 std.
        q01 = arr("q01") if "q01" in data else mean - 2.326 * std
        q99 = arr("q99") if "q99" in data else mean + 2.326 * std
        return cls(mean=mean, std=std, q01=q01, q99=q99, min=arr("min"), max=arr("max"), mode=data.get("mode"),
                   std_floor=arr("std_floor"), clip=data.get("clip"), drop=tuple(int(d) for d in data.get("drop", ())),
                   clip_low=arr("clip_low"), clip_high=arr("clip_high"))


def normalize(x: np.ndarray, stats: NormStats, mode: NormMode | None = None) -> np.ndarray:
    """Raw [..., d] -> normalised, clipped, dropped dims 0 (METHODS.md §2): z-score (x - mean) / scale,
    quantile (x - q01) / scale - 1 (q01 -> -1, q99 -> +1), with `NormStats.scale` (floored).

    The entry's own mode wins over `mode` (the model's default). Quantile mode without a recorded clip
    clips to [-1, 1], as openpi's π0.5 inputs are bounded there.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.shape[-1] != stats.dim:
        raise ValueError(f"normalize: last dim {x.shape[-1]} does not match the stats' {stats.dim}")
    mode = stats.resolved_mode(mode)
    out = normalize_unclipped(x, stats, mode)
    clip = stats.clip if stats.clip is not None else (1.0 if mode == "quantile" and stats.clip_low is None else None)
    if clip is not None:
        out = np.clip(out, -clip, clip)
    if stats.clip_low is not None:
        out = np.clip(out, stats.clip_low, stats.clip_high)
    if stats.drop:
        out[..., list(stats.drop)] = 0.0
    return out


def normalize_unclipped(x: np.ndarray, stats: NormStats, mode: NormMode) -> np.ndarray:
    """The affine part of `normalize`: z-score (x - mean) / scale, quantile (x - q01) / scale - 1."""
    x = np.asarray(x, dtype=np.float64)
    scale = stats.scale(mode)
    return (x - stats.mean) / scale if mode == "zscore" else (x - stats.q01) / scale - 1.0


def unnormalize(x: np.ndarray, stats: NormStats, mode: NormMode | None = None) -> np.ndarray:
    """Inverse of `normalize` on [..., >= d] (extra padded dims are cut); exact where no clip acted."""
    x = np.asarray(x, dtype=np.float64)[..., : stats.dim]
    mode = stats.resolved_mode(mode)
    if mode == "zscore":
        return x * stats.scale(mode) + stats.mean
    return (x + 1.0) * stats.scale(mode) + stats.q01


def save_norm_stats(stats: Mapping[str, NormStats], path: str | os.PathLike) -> None:
    """openpi's layout: {"norm_stats": {"state": {...}, "actions": {...}}}."""
    payload = {"norm_stats": {k: v.to_json() for k, v in stats.items()}}
    Path(path).write_text(json.dumps(payload, indent=2))


def load_norm_stats(path: str | os.PathLike) -> dict[str, NormStats]:
    data = json.loads(Path(path).read_text())
    data = data.get("norm_stats", data)
    return {_KEY_ALIASES.get(k, k): NormStats.from_json(v) for k, v in data.items()}


def raw_to_normalized_std(raw_std: float | Sequence[float], stats: NormStats, mode: NormMode | None = None
                          ) -> np.ndarray:
    """A std in the env's raw action units (one value, or one per dim) -> normalised units per dim:
    r_i / s_i with s_i the dim's scale (METHODS.md §2 "Exploration in the env's units")."""
    raw = np.atleast_1d(np.asarray(raw_std, dtype=np.float64))
    if raw.shape == (1,):
        raw = np.full(stats.dim, raw[0])
    if raw.shape != (stats.dim,):
        raise ValueError(f"a raw std needs one value or {stats.dim} (one per action dim), got {raw.shape[0]}")
    if np.any(raw < 0):
        raise ValueError(f"a raw std must be >= 0, got {raw.tolist()}")
    return raw / stats.scale(stats.resolved_mode(mode))
