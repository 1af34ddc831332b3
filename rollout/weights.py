"""Versioned weight snapshots: trainable parameters packed into one flat byte buffer.

A :class:`WeightSnapshot` is what travels from learner rank 0 to the rollout workers. All trainable
tensors are laid end to end (8-byte aligned) in a single numpy ``uint8`` buffer plus a small index
(name, dtype, shape, offset). Ray serialises numpy buffers out of band: ``ray.put`` writes the
bytes once into the node's shared-memory object store and every reader on that node maps them
without a copy, so the only copy a worker makes is the final ``param.copy_`` into its model.
Any dtype travels (bf16 included: the bytes are reinterpreted, never converted), so the round trip
is bit-exact.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

_ALIGN = 8


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside the flat buffer."""

    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32", "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class WeightSnapshot:
    """Trainable parameters of one model at one optimizer step.

    ``version`` increases with every learner update; workers refuse to go back to an older one.
    """

    version: int
    buffer: np.ndarray  # uint8, all tensors end to end
    entries: tuple[TensorEntry, ...]

    @property
    def nbytes(self) -> int:
        return int(self.buffer.nbytes)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def tensors(self) -> dict[str, torch.Tensor]:
        """Views (no copy) of every tensor; read-only memory when the buffer came from Ray."""
        buf = self.buffer
        out = {}
        with warnings.catch_warnings():  # a Ray-mapped buffer is read-only; we only ever read it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(buf)
        for e in self.entries:
            dtype = getattr(torch, e.dtype)
            out[e.name] = flat[e.offset : e.offset + e.nbytes].view(dtype).view(e.shape)
        return out


def trainable_parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    """Name -> parameter for every parameter with ``requires_grad`` (what RL updates and syncs)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad}


def pack(named: dict[str, torch.Tensor], version: int) -> WeightSnapshot:
    """Copy ``named`` tensors (any device or dtype) into one flat CPU byte buffer."""
    entries, offset = [], 0
    for name, t in named.items():
        nbytes = t.numel() * t.element_size()
        entries.append(TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
        offset += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    buffer = np.empty(offset, dtype=np.uint8)
    flat = torch.from_numpy(buffer)
    for e, t in zip(entries, named.values()):
        src = t.detach().contiguous().reshape(-1).view(torch.uint8)
        flat[e.offset : e.offset + e.nbytes].copy_(src)
    return WeightSnapshot(version=int(version), buffer=buffer, entries=tuple(entries))


@torch.no_grad()
def load_into(module: nn.Module, snapshot: WeightSnapshot) -> None:
    """Copy a snapshot into ``module``'s trainable parameters, in place.

    The snapshot must name exactly the module's trainable parameters with matching shapes and
    dtypes; anything else is an error (a silently half-loaded policy is the worst bug to chase).
    """
    params = trainable_parameters(module)
    got = set(snapshot.names())
    if got != set(params):
        raise KeyError(
            "weight snapshot does not match the model's trainable parameters: "
            f"missing {sorted(set(params) - got)}, unexpected {sorted(got - set(params))}"
        )
    for name, src in snapshot.tensors().items():
        dst = params[name]
        if dst.shape != src.shape or dst.dtype != src.dtype:
            raise ValueError(
                f"weight snapshot {name}: {src.dtype}{tuple(src.shape)} != model {dst.dtype}{tuple(dst.shape)}"
            )
        dst.copy_(src)
