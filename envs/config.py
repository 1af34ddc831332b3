"""Typed, frozen env configs. Unknown keys are an error (DESIGN.md: never silently dropped)."""
from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass
from typing import Any, Mapping

MANISKILL_TASKS: dict[str, str] = {
    # Language instructions for the ManiSkill3 tasks that need no asset download.
    "PickCube-v1": "pick up the red cube and move it to the goal position",
    "PushCube-v1": "push the cube to the goal region",
    "StackCube-v1": "stack the red cube on top of the green cube",
    "PullCube-v1": "pull the cube to the goal region",
    "LiftPegUpright-v1": "lift the peg and stand it upright",
    "PegInsertionSide-v1": "insert the peg into the hole on the side of the box",
    "PlugCharger-v1": "plug the charger into the receptacle",
    "PokeCube-v1": "use the peg to poke the cube to the goal",
    "PlaceSphere-v1": "place the sphere into the bin",
    "RollBall-v1": "roll the ball to the goal region",
    "PushT-v1": "push the T-shaped block onto the target",
    "StackPyramid-v1": "stack the cubes into a pyramid",
}

LIBERO_SUITES: dict[str, int] = {
    # Max env steps per episode after the no-op steps, as used by openpi's LIBERO evaluation.
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}

REWARD_MODES = ("sparse", "normalized_dense", "dense", "shaped_diff", "dense_diff", "shaped_dense_diff")
CONTROL_MODES = ("pd_ee_delta_pose", "pd_joint_delta_pos", "pd_ee_delta_pos", "pd_joint_pos")


class ConfigError(ValueError):
    """A config has an unknown key, a wrong type or an invalid value."""


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Validate (and lightly coerce: list->tuple, int->float) one field against its annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in args:
            try:
                return _check_type(name, value, arg)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(f"{name}: {value!r} matches none of {annotation}")
    if annotation is type(None):
        if value is not None:
            raise ConfigError(f"{name}: expected None, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a sequence, got {type(value).__name__}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_check_type(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{name}: expected {len(args)} items, got {len(value)}")
        return tuple(_check_type(f"{name}[{i}]", v, a) for i, (v, a) in enumerate(zip(value, args)))
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an int, got {value!r}")
        return value
    if annotation in (str, bool):
        if not isinstance(value, annotation):
            raise ConfigError(f"{name}: expected {annotation.__name__}, got {value!r}")
        return value
    return value


class _Config:
    """Mixin: build from a mapping with type checks; unknown keys raise ConfigError."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{cls.__name__}: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**dict(data))

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            checked = _check_type(f"{type(self).__name__}.{f.name}", getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, checked)
        self.validate()

    def validate(self) -> None:  # overridden
        pass

    def replace(self, **changes):
        return self.from_dict({**dataclasses.asdict(self), **changes})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class CommonEnvConfig(_Config):
    num_envs: int = 1
    seed: int = 0
    # Image size for every camera (height, width).
    image_size: tuple[int, int] = (128, 128)
    # Envs whose episodes are written to mp4 (indices into the batch); empty = no video.
    record_video_envs: tuple[int, ...] = ()
    video_dir: str = "videos"
    video_fps: int = 20
    # A worker process that does not answer within this many seconds per env of the call counts as
    # crashed (a process hosting k envs gets k times as long: it serves them one after the other).
    worker_timeout_s: float = 300.0
    # Process-pool simulators (ManiSkill CPU, LIBERO): envs hosted by one worker process, stepped one
    # after the other for a whole chunk per message. None = ceil(num_envs / CPU cores), one process
    # per core: on 2 cores a PickCube step of 16 envs costs ~3.3 ms of CPU in 2 processes, ~4.5 ms
    # in 16 (bench/results/rl_throughput.md). 1 = one process per env (LIBERO's default, see there).
    envs_per_process: int | None = None

    def process_layout(self) -> int:
        """Envs per worker process: the configured number, or one process per CPU core (None)."""
        if self.envs_per_process is not None:
            return min(self.envs_per_process, self.num_envs)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(1, math.ceil(self.num_envs / max(1, cores)))

    def validate(self) -> None:
        if self.num_envs < 1:
            raise ConfigError("num_envs must be >= 1")
        if self.envs_per_process is not None and self.envs_per_process < 1:
            raise ConfigError(f"envs_per_process must be >= 1 (or None: one process per core), "
                              f"got {self.envs_per_process}")
        if any(s < 8 for s in self.image_size):
            raise ConfigError(f"image_size {self.image_size} too small (>= 8 px)")
        bad = [i for i in self.record_video_envs if not 0 <= i < self.num_envs]
        if bad:
            raise ConfigError(f"record_video_envs {bad} outside [0, {self.num_envs})")


@dataclass(frozen=True)
class ManiSkillConfig(CommonEnvConfig):
    task: str = "PickCube-v1"
    # Multi-task batch (CPU backend): env i runs tasks[i % len(tasks)] with that task's instruction;
    # when set, `task` is ignored. The tasks must give observations of one shape (obs_mode "rgb" with
    # shared state_keys does; "state" vectors differ between most tasks).
    tasks: tuple[str, ...] = ()
    # "cpu": SAPIEN CPU sim, one scene per env in worker processes (envs_per_process); "gpu": one
    # process, num_envs batched on CUDA.
    backend: str = "cpu"
    # "state": privileged flat state vector, no images; "rgb": cameras + proprio state.
    obs_mode: str = "state"
    control_mode: str = "pd_ee_delta_pose"
    reward_mode: str = "normalized_dense"
    # None = the task's own limit (PickCube: 50). Scripted demos need ~80-100 steps.
    max_episode_steps: int | None = None
    terminate_on_success: bool = True
    # Rebuild the scene on auto-resets too (reset() always does): bit-exact seeded episodes
    # whatever ran before, at ~20 ms of CPU per reset in a worker (~0.2 s before the worker setup of
    # envs.maniskill.prepare_worker_process; rgb ~0.25 s) instead of ~3 ms (CPU backend).
    hard_reset: bool = False
    cameras: tuple[str, ...] = ("base_camera",)
    # Proprio state in "rgb" mode: keys of ManiSkill's obs dict, "group/key". Ignored in "state".
    state_keys: tuple[str, ...] = ("agent/qpos", "extra/tcp_pose")
    # Overrides the instruction from MANISKILL_TASKS.
    prompt: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.backend not in ("cpu", "gpu"):
            raise ConfigError(f"backend {self.backend!r}: cpu | gpu")
        if self.obs_mode not in ("state", "rgb"):
            raise ConfigError(f"obs_mode {self.obs_mode!r}: state | rgb")
        if self.control_mode not in CONTROL_MODES:
            raise ConfigError(f"control_mode {self.control_mode!r}: one of {CONTROL_MODES}")
        if self.reward_mode not in REWARD_MODES:
            raise ConfigError(f"reward_mode {self.reward_mode!r}: one of {REWARD_MODES}")
        for task in self.tasks or (self.task,):
            if self.prompt is None and task not in MANISKILL_TASKS:
                raise ConfigError(
                    f"task {task!r} has no built-in instruction; known: {sorted(MANISKILL_TASKS)}"
                    " (or set prompt=...)")
        if self.tasks and self.backend != "cpu":
            raise ConfigError("tasks (a multi-task batch) needs backend 'cpu': the GPU sim runs one task")
        if self.tasks and self.prompt is not None:
            raise ConfigError("prompt overrides one task's instruction; it cannot be set with tasks")
        if self.max_episode_steps is not None and self.max_episode_steps < 1:
            raise ConfigError("max_episode_steps must be >= 1")
        if self.obs_mode == "rgb" and not self.cameras:
            raise ConfigError("obs_mode 'rgb' needs at least one camera")

    @property
    def instruction(self) -> str:
        return self.prompt if self.prompt is not None else MANISKILL_TASKS[self.task]

    def env_task(self, index: int) -> ManiSkillConfig:
        """The single-task config of env `index` (itself when there is no task list)."""
        if not self.tasks:
            return self
        return dataclasses.replace(self, task=self.tasks[index % len(self.tasks)], tasks=())


@dataclass(frozen=True)
class LiberoConfig(CommonEnvConfig):
    suite: str = "libero_spatial"
    # Task ids inside the suite; env i runs task_ids[i % len(task_ids)]. Empty = all tasks, cycled.
    task_ids: tuple[int, ...] = (0,)
    # Init state of an episode: the shipped state number (seed + episode) % 50, or fixed here.
    init_state_id: int | None = None
    # Empty: no camera observations and no rendering (state-only, ~10x faster).
    cameras: tuple[str, ...] = ("agentview_image", "robot0_eye_in_hand_image")
    # 10 steps of a "do nothing" action after reset let objects settle (openpi's LIBERO eval).
    num_noop_steps: int = 10
    # None = per-suite openpi limit (LIBERO_SUITES).
    max_episode_steps: int | None = None
    # MuJoCo headless renderer: "egl" or "osmesa" (both software rendering on a CPU box).
    render_backend: str = "egl"
    # LIBERO images come upside down; flip both axes (openpi does the same).
    flip_images: bool = True
    # State: eef pos (3) + eef axis-angle (3) + gripper qpos (2) = 8, openpi's LIBERO state.
    terminate_on_success: bool = True
    # One env per process by default: robosuite renders into whichever GL context was made current
    # last, so envs with cameras cannot share a process. State-only envs (cameras: []) may.
    envs_per_process: int | None = 1

    def validate(self) -> None:
        super().validate()
        if self.suite not in LIBERO_SUITES:
            raise ConfigError(f"suite {self.suite!r}: one of {sorted(LIBERO_SUITES)}")
        if self.render_backend not in ("egl", "osmesa"):
            raise ConfigError(f"render_backend {self.render_backend!r}: egl | osmesa")
        if self.num_noop_steps < 0:
            raise ConfigError("num_noop_steps must be >= 0")
        if self.init_state_id is not None and self.init_state_id < 0:
            raise ConfigError("init_state_id must be >= 0")
        allowed = {"agentview_image", "robot0_eye_in_hand_image"}
        if set(self.cameras) - allowed:
            raise ConfigError(f"cameras {self.cameras}: a subset of {sorted(allowed)} (empty: no rendering)")
        if self.cameras and self.process_layout() > 1:
            raise ConfigError("LIBERO envs with cameras need one process each (envs_per_process: 1): robosuite "
                              "renders into whichever GL context was made current last")

    @property
    def episode_limit(self) -> int:
        return self.max_episode_steps if self.max_episode_steps is not None else LIBERO_SUITES[self.suite]


@dataclass(frozen=True)
class ToyConfig(CommonEnvConfig):
    """A learnable toy task that runs in microseconds (envs/toy.py): an RL sanity check.

    Each episode lasts `episode_steps` steps; it succeeds (reward 1 at the last step, 0 otherwise)
    iff the mean of action dim `action_index` over the episode exceeds `threshold` (env units). The
    state is a fixed random vector per episode. A correct RL setup raises the success rate within a
    few iterations; a sign, ratio or masking bug leaves it flat or lowers it.
    """

    state_dim: int = 8
    action_dim: int = 7
    episode_steps: int = 5
    action_index: int = 0
    threshold: float = 0.0
    state_scale: float = 0.1
    """Std of the random state (raw units; with `state_stats`, in units of the training std)."""
    cue_period: int = 0
    """0: the task above. k > 0: the cued task, which checks that the policy learns to read its state
    and that each chunk gets its own credit. State dim `cue_dim` holds a cue of +-cue_scale (with
    `state_stats`: the training mean +- cue_scale stds), redrawn every k steps (k = n_exec: one cue
    per chunk); each step pays 1 / episode_steps when action dim `action_index` minus `threshold` has
    the cue's sign, and the episode succeeds iff at least 3/4 of its steps paid. A chunk's reward
    depends only on that chunk's action and cue."""
    cue_scale: float = 0.1
    cue_dim: int = 0
    """State dim that holds the cue."""
    state_stats: str | None = None
    """A policy's norm_stats.json: states are drawn as mean + state_scale * std * N(0, 1) per dim and
    the cue as mean +- cue_scale * std, i.e. inside the distribution the policy was trained on. Without
    it, dims whose training std is tiny get normalised values of +-100, and a policy cannot learn to
    read a cue among them (a cued run on the shipped policy stayed at 50% for 100 iterations)."""
    prompt: str = "move along the first action axis"
    envs_per_process: int | None = None
    """None: every env in this process, as numpy arrays. k: worker processes of k envs each, as
    ManiSkill's CPU envs run (checks a pipelined rollout or a crashed worker in seconds)."""

    def validate(self) -> None:
        super().validate()
        if min(self.state_dim, self.action_dim, self.episode_steps) < 1:
            raise ConfigError("state_dim, action_dim and episode_steps must be >= 1")
        if self.cue_period < 0:
            raise ConfigError(f"cue_period must be >= 0, got {self.cue_period}")
        if not 0 <= self.cue_dim < self.state_dim:
            raise ConfigError(f"cue_dim {self.cue_dim} outside [0, state_dim={self.state_dim})")
        if not 0 <= self.action_index < self.action_dim:
            raise ConfigError(f"action_index {self.action_index} outside [0, action_dim={self.action_dim})")
