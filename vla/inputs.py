"""What the policy consumes: tensors produced by `vla.processor.Processor` from an env observation."""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor


@dataclasses.dataclass
class ModelInputs:
    """One batch of processed observations.

    images: float [B, n_cams, 3, S, S] in [-1, 1], cameras in `config.camera_names` order.
    image_masks: bool [B, n_cams], False for a camera that is missing in that sample.
    tokens: long [B, L] prompt tokens (π0.5: the discretised state is inside the prompt).
    token_masks: bool [B, L], False on padding.
    state: float [B, state width] normalised, zero-padded state (π0 feeds it to the expert).
    """

    images: Tensor
    image_masks: Tensor
    tokens: Tensor
    token_masks: Tensor
    state: Tensor

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]

    def to(self, device: torch.device | str) -> "ModelInputs":
        return ModelInputs(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})

    def select(self, index: Tensor) -> "ModelInputs":
        """Rows `index` (may repeat) of every field."""
        return ModelInputs(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    def validate(self, num_cameras: int, image_size: int, max_token_len: int, state_dim: int) -> None:
        """Clear errors for shape/dtype mismatches before any model code runs."""
        b = self.tokens.shape[0]
        expected = {
            "images": (b, num_cameras, 3, image_size, image_size),
            "image_masks": (b, num_cameras),
            "tokens": (b, max_token_len),
            "token_masks": (b, max_token_len),
            "state": (b, state_dim),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"ModelInputs.{name}: expected shape {shape}, got {got}")
        if self.image_masks.dtype != torch.bool or self.token_masks.dtype != torch.bool:
            raise TypeError("ModelInputs.image_masks and token_masks must be bool tensors")
        if self.tokens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"ModelInputs.tokens must be integer, got {self.tokens.dtype}")
        if not self.images.is_floating_point() or not self.state.is_floating_point():
            raise TypeError("ModelInputs.images and state must be floating point (images in [-1, 1])")
