"""Typed model configurations: `tiny` (CPU tests), `pi0` and `pi05` (the published sizes).

Every size, the action horizon, the padded action dim, the camera names and the number of denoising
steps are fields, never constants in the model code. Configs are frozen dataclasses; building one from
a mapping with an unknown key raises (`from_dict`), so a typo in a YAML file cannot be silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal, TypeVar

Variant = Literal["pi0", "pi05"]


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """SigLIP vision tower (So400m/14 for π0/π0.5)."""

    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
    """One Gemma transformer stack (the VLM decoder or the action expert)."""

    width: int
    depth: int
    mlp_dim: int
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0


# openpi's variants: gemma_2b (VLM decoder) and gemma_300m (action expert).
GEMMA_2B = GemmaConfig(width=2048, depth=18, mlp_dim=16_384)
GEMMA_300M = GemmaConfig(width=1024, depth=18, mlp_dim=4096)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A π0 / π0.5 policy: PaliGemma (SigLIP + Gemma) plus a Gemma action expert.

    variant: "pi0" feeds the state as a continuous token to the expert and conditions the expert on
        time by concatenating a sinusoidal embedding to each action token (MLP); "pi05" discretises
        the state into `state_bins` bins inside the prompt and conditions the expert on time through
        adaptive RMSNorm (scale, shift, gate) in every expert norm.
    action_horizon: H, actions predicted per chunk.
    action_dim: D, padded action width the projections expect.
    state_dim: padded state width (None = action_dim, as openpi's 32/32).
    max_token_len: prompt length in tokens (48 for π0, 200 for π0.5 which also carries the state).
    camera_names: camera slots, in the order their image tokens enter the prefix.
    num_steps: K, Euler denoising steps at inference.
    """

    variant: Variant = "pi0"
    vision: VisionConfig = VisionConfig()
    vlm: GemmaConfig = GEMMA_2B
    expert: GemmaConfig = GEMMA_300M
    vocab_size: int = 257_152
    action_horizon: int = 50
    action_dim: int = 32
    state_dim: int | None = None
    max_token_len: int = 48
    camera_names: tuple[str, ...] = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")
    num_steps: int = 10
    state_bins: int = 256
    # π0 training-time distribution: t ~ Beta(1.5, 1) mapped into (offset, offset + scale).
    time_beta_alpha: float = 1.5
    time_beta_beta: float = 1.0
    time_scale: float = 0.999
    time_offset: float = 0.001
    # Sinusoidal time-embedding periods (openpi).
    time_min_period: float = 4e-3
    time_max_period: float = 4.0
    # Image preprocessing convention (vla.processor.resize_with_pad): True = pirl's antialiased bilinear
    # downscale (what pirl-trained checkpoints saw); False = openpi's PyTorch port and LeRobot (plain
    # bilinear, no antialiasing). `pirl import` records False for openpi / LeRobot / transformers files.
    image_resize_antialias: bool = True

    def __post_init__(self) -> None:
        if self.variant not in ("pi0", "pi05"):
            raise ValueError(f"variant must be 'pi0' or 'pi05', got {self.variant!r}")
        # The two stacks share one attention per layer: heads, KV heads and head dim must agree.
        for field in ("depth", "num_heads", "num_kv_heads", "head_dim"):
            a, b = getattr(self.vlm, field), getattr(self.expert, field)
            if a != b:
                raise ValueError(f"vlm.{field}={a} and expert.{field}={b} must be equal (shared attention)")
        if self.expert.width % 2:
            raise ValueError("expert.width must be even (sinusoidal time embedding)")
        if self.vision.image_size % self.vision.patch_size:
            raise ValueError("vision.image_size must be a multiple of vision.patch_size")
        if not self.camera_names:
            raise ValueError("camera_names must name at least one camera")
        for name in ("action_horizon", "action_dim", "max_token_len", "num_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")

    @property
    def state_width(self) -> int:
        return self.action_dim if self.state_dim is None else self.state_dim

    @property
    def prefix_len(self) -> int:
        return len(self.camera_names) * self.vision.tokens_per_image + self.max_token_len

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelConfig":
        return from_dict(cls, data)

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


T = TypeVar("T")


def unknown_keys_message(data: Mapping[str, Any], valid: Iterable[str], path: str = "", kind: str = "key"
                         ) -> str | None:
    """The one wording of a strict loader's error, or None when every key of `data` is in `valid`:
    `unknown config key(s) in PATH: [...]; valid keys: [...]` (`pirl.cli` parses this form to point at
    the closest valid key). `kind` names other things with keys ("section", "rollout setting")."""
    valid = set(valid)
    unknown = sorted(set(data) - valid)
    if not unknown:
        return None
    where = f" in {path}" if path else ""
    return f"unknown config {kind}(s){where}: {unknown}; valid {kind}s: {sorted(valid)}"


def from_dict(cls: type[T], data: Mapping[str, Any], path: str = "") -> T:
    """Builds a (nested) config dataclass; an unknown key is an error naming its full path."""
    if not isinstance(data, Mapping):
        raise TypeError(f"{path or cls.__name__}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = unknown_keys_message(data, fields, path)
    if unknown:
        raise KeyError(unknown)
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        field = fields[name]
        if field.default is not dataclasses.MISSING:
            current = field.default
        elif field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            current = field.default_factory()  # type: ignore[misc]
        else:
            current = None
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            # Nested configs start from the field's own default, so partial overrides work.
            merged = {**dataclasses.asdict(current), **value}
            kwargs[name] = from_dict(type(current), merged, f"{path}{name}.")
        elif isinstance(current, tuple) and isinstance(value, list | tuple):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)


def _tiny_gemma(width: int, mlp_dim: int) -> GemmaConfig:
    return GemmaConfig(width=width, depth=2, mlp_dim=mlp_dim, num_heads=2, num_kv_heads=1, head_dim=16)


def tiny(variant: Variant = "pi0") -> ModelConfig:
    """A random-init model of the same code at toy size: a forward pass takes milliseconds on CPU."""
    return ModelConfig(
        variant=variant,
        vision=VisionConfig(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=8, image_size=32),
        vlm=_tiny_gemma(64, 128),
        expert=_tiny_gemma(32, 64),
        vocab_size=512,
        action_horizon=10,
        action_dim=8,
        max_token_len=32 if variant == "pi0" else 48,
        camera_names=("base_0_rgb", "wrist_0_rgb"),
        num_steps=10,
    )


def pi0() -> ModelConfig:
    """π0 (openpi `pi0`): SigLIP So400m/14 @224, Gemma-2B VLM, Gemma-300M expert, H=50, D=32."""
    return ModelConfig(variant="pi0", max_token_len=48)


def pi05() -> ModelConfig:
    """π0.5 (openpi `pi05`): as π0, with adaRMS time conditioning and the state in a 200-token prompt."""
    return ModelConfig(variant="pi05", max_token_len=200)


PRESETS = {
    "tiny": lambda: tiny("pi0"),
    "tiny_pi05": lambda: tiny("pi05"),
    "pi0": pi0,
    "pi05": pi05,
}


def get_config(name: str) -> ModelConfig:
    try:
        return PRESETS[name]()
    except KeyError:
        raise KeyError(f"unknown model config {name!r}; known: {sorted(PRESETS)}") from None


def load_yaml(path: str) -> ModelConfig:
    """A model config from a YAML file of ModelConfig fields (configs/model/*.yaml); strict keys."""
    import yaml

    with open(path) as f:
        return ModelConfig.from_dict(yaml.safe_load(f))
