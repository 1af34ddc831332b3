"""Request layout and validation: which request keys feed which model camera, the state and the prompt.

A request is one observation (no batch dim), as openpi clients send it. Nested dicts are read with "/"
joined keys, so pirl's own observation contract ({"images": {"base_camera": ...}, "state": ..., "prompt":
...}, one env's row) and openpi's flat keys ("observation/image", ...) are both just key paths.

Presets (`inputs=` in configs/serve.yaml), like openpi's per-robot input transforms:

    pirl       images/<env camera>       state            prompt   what `envs` produce (one row); the
                                                                    cameras the checkpoint was trained on
    libero     observation/image (agentview), observation/wrist_image, observation/state [8], prompt
               (openpi's examples/libero/main.py keys; images already flipped upright by the client)
    maniskill  observation/image (base camera), observation/state, prompt

`camera_map` (model camera -> request key) overrides the preset's cameras. A camera listed in the layout
is required: a robot that forgets to send a camera gets an error instead of a policy acting blind.
Reserved request keys: "seed" (int, reproducible sampling) and "noise_index" (int, which draw of that
seed's generator: chunk k of an episode); "prev_actions" (float [L, d], the current chunk's actions still
to run from this observation on, raw units) with "prev_delay" (int, how many of them run before the new
chunk takes over) ask for real-time chunking (`parse_remaining`, docs/serve.md). Other keys are ignored
(openpi clients send extras).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

MAX_SEED = 2**63 - 1
MAX_NOISE_INDEX = 100_000
MAX_BETA = 100.0  # a larger cap on real-time chunking's step scale only overshoots (the Euler step is dt * beta)

PRESET_CAMERAS: dict[str, dict[str, str]] = {
    "libero": {"base_0_rgb": "observation/image", "left_wrist_0_rgb": "observation/wrist_image"},
    "maniskill": {"base_0_rgb": "observation/image"},
}
PRESET_KEYS: dict[str, tuple[str, str]] = {  # (state key, prompt key)
    "pirl": ("state", "prompt"),
    "libero": ("observation/state", "prompt"),
    "maniskill": ("observation/state", "prompt"),
}
PRESETS = tuple(PRESET_KEYS)


class RequestError(ValueError):
    """A malformed request; the message names the key and what is wrong with it."""


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Request keys -> the observation contract of `vla.processor.Processor` (one row)."""

    cameras: Mapping[str, str]
    """model camera name -> request key path (uint8 [H, W, 3])."""
    state_key: str
    state_dim: int
    prompt_key: str
    default_prompt: str | None
    max_image_side: int
    preset: str = "custom"

    @classmethod
    def build(cls, preset: str, model_cameras: tuple[str, ...], trained_cameras: Mapping[str, str] | None,
              state_dim: int, camera_map: Mapping[str, str] | None = None, state_key: str | None = None,
              prompt_key: str | None = None, default_prompt: str | None = None,
              max_image_side: int = 1024) -> "InputSpec":
        """trained_cameras: model camera -> env camera the checkpoint was trained with (SFT config), or None
        when unknown (imported checkpoints: every preset camera the model has)."""
        if preset not in PRESETS:
            raise ValueError(f"inputs must be one of {list(PRESETS)}, got {preset!r}")
        if camera_map:
            cameras = dict(camera_map)
        elif preset == "pirl":
            cameras = {m: f"images/{e}" for m, e in (trained_cameras or {}).items()}
        else:
            cameras = {m: k for m, k in PRESET_CAMERAS[preset].items()
                       if m in model_cameras and (trained_cameras is None or m in trained_cameras)}
        unknown = sorted(set(cameras) - set(model_cameras))
        if unknown:
            raise ValueError(f"camera_map names {unknown}, which the model lacks ({list(model_cameras)})")
        default_state, default_prompt_key = PRESET_KEYS[preset]
        return cls(cameras=cameras, state_key=state_key or default_state, state_dim=state_dim,
                   prompt_key=prompt_key or default_prompt_key, default_prompt=default_prompt,
                   max_image_side=max_image_side, preset=preset)

    def describe(self) -> dict:
        """For the metadata frame: what a client must send."""
        return {
            "preset": self.preset,
            "cameras": {m: {"key": k, "dtype": "uint8", "shape": "[H, W, 3]", "max_side": self.max_image_side}
                        for m, k in self.cameras.items()},
            "state": {"key": self.state_key, "dtype": "float32", "shape": [self.state_dim]},
            "prompt": {"key": self.prompt_key, "required": self.default_prompt is None,
                       "default": self.default_prompt},
            "reserved": {"seed": f"int in [0, 2^63): reproducible sampling (default: drawn by the server, "
                                 f"returned in the response)",
                         "noise_index": f"int in [0, {MAX_NOISE_INDEX}]: the seed's k-th noise draw (default 0)",
                         "prev_actions": "float [L, action_dim], L <= action_horizon: the current chunk's actions "
                                         "still to run from this observation on (raw units); with prev_delay: "
                                         "real-time chunking",
                         "prev_delay": "int in [0, L]: how many of prev_actions run before the new chunk takes over",
                         "prev_beta": f"float in (0, {MAX_BETA:g}] (default 5): how hard the new chunk is pulled "
                                      "onto prev_actions"},
            "nested_keys": "nested dicts are addressed with '/'-joined keys",
        }

    def parse(self, request: Any) -> tuple[dict, int | None, int]:
        """A decoded request -> (one observation row {"images": {cam: [H,W,3]}, "state": [S], "prompt": str},
        seed or None, noise_index). Raises RequestError naming the problem."""
        if not isinstance(request, Mapping):
            raise RequestError(f"a request must be a map of observation keys, got {type(request).__name__}")
        flat = _flatten(request)
        images = {}
        for cam, key in self.cameras.items():
            images[cam] = self._image(flat, key)
        state = self._state(flat)
        prompt = flat.get(self.prompt_key, self.default_prompt)
        if prompt is None:
            raise RequestError(f"missing key {self.prompt_key!r} (the task prompt, a string; "
                               f"the server has no default_prompt)")
        if isinstance(prompt, np.ndarray) and prompt.dtype.kind in "SU" and prompt.size == 1:
            prompt = str(prompt.reshape(()).item())
        if isinstance(prompt, bytes):
            prompt = prompt.decode("utf-8", errors="replace")
        if not isinstance(prompt, str):
            raise RequestError(f"{self.prompt_key!r} must be a string, got {type(prompt).__name__}")
        seed = _int_field(flat, "seed", 0, MAX_SEED)
        index = _int_field(flat, "noise_index", 0, MAX_NOISE_INDEX)
        return {"images": images, "state": state, "prompt": prompt}, seed, 0 if index is None else index

    def _image(self, flat: dict, key: str) -> np.ndarray:
        if key not in flat:
            raise RequestError(f"missing key {key!r} (camera image, uint8 [H, W, 3]); request has {sorted(flat)}")
        img = flat[key]
        if not isinstance(img, np.ndarray):
            raise RequestError(f"{key!r} must be a numpy uint8 array [H, W, 3], got {type(img).__name__}")
        if img.ndim == 3 and img.shape[0] == 3 and img.shape[-1] != 3:
            img = np.moveaxis(img, 0, -1)  # openpi clients also send [3, H, W]
        if img.dtype != np.uint8:
            raise RequestError(f"{key!r} has dtype {img.dtype}; expected uint8 [H, W, 3] (0-255)")
        if img.ndim != 3 or img.shape[-1] != 3:
            raise RequestError(f"{key!r} has shape {tuple(img.shape)}; expected [H, W, 3]")
        if min(img.shape[:2]) < 1 or max(img.shape[:2]) > self.max_image_side:
            raise RequestError(f"{key!r} is {img.shape[0]}x{img.shape[1]} pixels; each side must be in "
                               f"[1, {self.max_image_side}] (max_image_side)")
        return img

    def _state(self, flat: dict) -> np.ndarray:
        key = self.state_key
        if key not in flat:
            raise RequestError(f"missing key {key!r} (state, float32 [{self.state_dim}]); request has {sorted(flat)}")
        state = flat[key]
        if isinstance(state, list | tuple):
            state = np.asarray(state)
        if not isinstance(state, np.ndarray):
            raise RequestError(f"{key!r} must be a float array [{self.state_dim}], got {type(state).__name__}")
        if state.dtype.kind != "f":
            raise RequestError(f"{key!r} has dtype {state.dtype}; expected a float dtype (float32)")
        if state.shape != (self.state_dim,):
            raise RequestError(f"{key!r} has shape {tuple(state.shape)}; expected ({self.state_dim},)")
        if not np.all(np.isfinite(state)):
            bad = np.flatnonzero(~np.isfinite(state)).tolist()
            raise RequestError(f"{key!r} has non-finite values (NaN or inf) at indices {bad[:8]}")
        return state.astype(np.float32)


def parse_remaining(request: Mapping, horizon: int, action_dims: int, default_beta: float
                    ) -> tuple[np.ndarray, int, float] | None:
    """The request's "prev_actions" [L, d] (1 <= L <= horizon, finite), "prev_delay" (0 <= delay <= L) and
    "prev_beta" (> 0, default `default_beta`) for real-time chunking, or None when it sends none of them.
    Raises RequestError naming the problem."""
    remaining, delay = request.get("prev_actions"), _int_field(request, "prev_delay", 0, horizon)
    beta = request.get("prev_beta")
    if remaining is None:
        if delay is not None or beta is not None:
            raise RequestError("'prev_delay' and 'prev_beta' need 'prev_actions' (the current chunk's actions "
                               "still to run)")
        return None
    if beta is None:
        beta = default_beta
    if isinstance(beta, np.ndarray) and beta.shape == ():
        beta = beta.item()
    if isinstance(beta, bool) or not isinstance(beta, int | float | np.floating) or not 0 < float(beta) <= MAX_BETA:
        raise RequestError(f"'prev_beta' must be a number in (0, {MAX_BETA:g}] (the cap on the pull onto "
                           f"prev_actions; 5 is real-time chunking's), got {beta!r}")
    if isinstance(remaining, list | tuple):
        remaining = np.asarray(remaining)
    if not isinstance(remaining, np.ndarray) or remaining.dtype.kind != "f":
        raise RequestError(f"'prev_actions' must be a float array [L, {action_dims}] (raw units)")
    if remaining.ndim != 2 or not 1 <= remaining.shape[0] <= horizon or remaining.shape[1] != action_dims:
        raise RequestError(f"'prev_actions' has shape {tuple(remaining.shape)}; expected [L, {action_dims}] "
                           f"with 1 <= L <= {horizon} (the action horizon)")
    if not np.all(np.isfinite(remaining)):
        raise RequestError("'prev_actions' has non-finite values (NaN or inf)")
    if delay is None or delay > remaining.shape[0]:
        raise RequestError(f"'prev_delay' (int in [0, L = {remaining.shape[0]}]: the steps of 'prev_actions' "
                           f"that run before the new chunk takes over) is {'missing' if delay is None else delay}")
    return remaining.astype(np.float32), delay, float(beta)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key.decode() if isinstance(key, bytes) else key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "/"))
        else:
            out[name] = value
    return out


def _int_field(flat: dict, key: str, low: int, high: int) -> int | None:
    if key not in flat or flat[key] is None:
        return None
    value = flat[key]
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value.item()
    if isinstance(value, np.integer):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key!r} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise RequestError(f"{key!r} = {value} is outside [{low}, {high}]")
    return value

