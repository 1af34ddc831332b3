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


def to_container(node: Any) -> Any:
    """An OmegaConf node (or plain data) as plain dicts/lists, interpolations resolved."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        return node
    if isinstance(node, DictConfig | ListConfig):
        return OmegaConf.to_container(node, resolve=True)
    return node
