"""Strict typed configs for pirl's entry points.

One rule everywhere: a config is a frozen dataclass; building it from a mapping (a Hydra/YAML node)
with an unknown key raises and names the key and its path. `load_section` is that builder: vla's
`from_dict` (pirl imports vla, not the other way round), so pirl and vla share one implementation and
one message (`vla.config.unknown_keys_message`, also used for RLConfig's sections and a checkpoint's
rollout settings). `envs` keeps its own typed loader (`envs.config`): envs imports neither vla nor pirl.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, TypeVar

from vla.config import from_dict

T = TypeVar("T")


def load_section(cls: type[T], data: Mapping[str, Any] | None, path: str = "") -> T:
    """`cls` from `data` (None -> all defaults); unknown keys are errors."""
    return from_dict(cls, dict(data or {}), path)


def check_device(value: str, key: str, here: bool = True) -> None:
    """A device setting is a torch device string (cpu, cuda, cuda:N) and, with `here`, one this process can
    use: a clear error at config time instead of torch's traceback at the first tensor moved there."""
    import torch

    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{key}={value!r} is not a device: cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{key}={value!r}: pirl runs on cpu or cuda")
    if here and device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{key}={value}, but torch sees no CUDA device here (torch {torch.__version__}"
                             + (", built without CUDA)" if torch.version.cuda is None else ")"))
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{key}={value}, but only {torch.cuda.device_count()} CUDA device(s) are visible")


def to_container(node: Any) -> Any:
    """An OmegaConf node (or plain data) as plain dicts/lists, interpolations resolved."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        return node
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node
