"""From an env observation to `ModelInputs`, and from normalised action chunks back to env actions.

Observation contract (DESIGN.md): {"images": {cam: uint8 [B, H, W, 3]}, "state": float32 [B, S],
"prompt": list[str]}. Transforms, each small and testable:
- images: resize with padding to the model's square size (aspect kept, black bars), scale to [-1, 1],
  with or without antialiasing as the checkpoint's home framework did (`ModelConfig.image_resize_antialias`);
  a camera absent from the observation becomes a black image with its mask False;
- state / actions: normalised with dataset statistics (`vla.normalize.NormStats`: z-score for π0,
  1st-99th percentile to [-1, 1] for π0.5, std floors, clipping and dropped dims as recorded in
  `norm_stats.json`), zero-padded to the model's action dim;
- prompt: tokenised with a SentencePiece model (a real PaliGemma `tokenizer.model`, or a tiny one built
  for tests); π0.5 puts the state, discretised into 256 bins, inside the prompt.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vla.config import ModelConfig
from vla.inputs import ModelInputs
from vla.normalize import NormMode, NormStats, load_norm_stats, normalize, save_norm_stats, unnormalize

__all__ = ["NormStats", "load_norm_stats", "save_norm_stats", "normalize", "unnormalize", "Processor",
           "PromptTokenizer", "resize_with_pad", "discretize_state", "build_test_tokenizer", "pad_last"]

def pad_last(x: np.ndarray, dim: int) -> np.ndarray:
    if x.shape[-1] > dim:
        raise ValueError(f"cannot pad width {x.shape[-1]} into the model's action dim {dim}")
    return np.concatenate([x, np.zeros((*x.shape[:-1], dim - x.shape[-1]), dtype=x.dtype)], -1)


def resize_with_pad(images: torch.Tensor, size: int, antialias: bool = True) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, size, size] in [-1, 1]; aspect kept, padding is black (-1).

    Bilinear (align_corners=False) to the largest size that fits, centred. antialias: True is pirl's
    convention (`ModelConfig.image_resize_antialias`, what pirl-trained checkpoints saw); openpi's
    PyTorch port and LeRobot resize without antialiasing, so imported checkpoints use False. The two
    differ only when an image is downscaled.
    """
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [B, H, W, 3], got {images.dtype} {tuple(images.shape)}")
    b, h, w, _ = images.shape
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=antialias).clamp(-1, 1)
    top, left = (size - nh) // 2, (size - nw) // 2
    out = torch.full((b, 3, size, size), -1.0)
    out[:, :, top : top + nh, left : left + nw] = x
    return out


def discretize_state(state: np.ndarray, bins: int) -> np.ndarray:
    """π0.5: normalised state in [-1, 1] -> integer bins 0..bins-1 (values outside are clipped)."""
    edges = np.linspace(-1.0, 1.0, bins + 1)[:-1]
    return np.clip(np.digitize(np.asarray(state), edges) - 1, 0, bins - 1)


class PromptTokenizer:
    """PaliGemma-style prompt tokenisation with a SentencePiece model (`<dir>/tokenizer.model`)."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        path = Path(path)
        model_file = path / "tokenizer.model" if path.is_dir() else path
        if not model_file.is_file():
            raise FileNotFoundError(
                f"no SentencePiece model at {model_file}; point the config at a directory holding the "
                "PaliGemma tokenizer.model"
            )
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        self.vocab_size = self.sp.get_piece_size()

    @staticmethod
    def clean(prompt: str) -> str:
        return prompt.strip().replace("_", " ").replace("\n", " ")

    def encode(self, prompt: str, state_bins: np.ndarray | None = None) -> list[int]:
        text = self.clean(prompt)
        if state_bins is None:  # π0: BOS + prompt + "\n"
            return self.sp.encode(text, add_bos=True) + self.sp.encode("\n")
        state_text = " ".join(str(int(v)) for v in state_bins)
        return self.sp.encode(f"Task: {text}, State: {state_text};\nAction: ", add_bos=True)

    def __call__(self, prompts: Sequence[str], max_len: int, states: np.ndarray | None = None):
        tokens = np.zeros((len(prompts), max_len), dtype=np.int64)
        masks = np.zeros((len(prompts), max_len), dtype=bool)
        for i, prompt in enumerate(prompts):
            ids = self.encode(prompt, None if states is None else states[i])
            if len(ids) > max_len:
                raise ValueError(
                    f"prompt {i} needs {len(ids)} tokens but max_token_len is {max_len}: {prompt!r}"
                )
            tokens[i, : len(ids)] = ids
            masks[i, : len(ids)] = True
        return torch.from_numpy(tokens), torch.from_numpy(masks)


@dataclasses.dataclass
class Processor:
    """Observation -> ModelInputs; normalised action chunk -> env actions.

    norm_stats: {"state": NormStats, "actions": NormStats}; their widths are the env's real dims.
    norm_mode: defaults to z-score for π0 and quantile for π0.5.
    camera_map: model camera name -> observation image key (e.g. {"base_0_rgb": "base_camera"}).
        None means the observation already uses the model's camera names (unknown ones are errors);
        with a map, observation cameras it does not name are ignored.
    """

    config: ModelConfig
    tokenizer: PromptTokenizer
    norm_stats: Mapping[str, NormStats]
    norm_mode: NormMode | None = None
    camera_map: Mapping[str, str] | None = None

    def __post_init__(self) -> None:
        if self.norm_mode is None:
            self.norm_mode = "quantile" if self.config.variant == "pi05" else "zscore"
        for key, width in (("state", self.config.state_width), ("actions", self.config.action_dim)):
            if key not in self.norm_stats:
                raise KeyError(f"norm_stats needs a {key!r} entry")
            if self.norm_stats[key].dim > width:
                raise ValueError(f"{key} has {self.norm_stats[key].dim} dims > the model's padded width {width}")
        if self.camera_map is not None:
            unknown = sorted(set(self.camera_map) - set(self.config.camera_names))
            if unknown:
                raise KeyError(f"camera_map names {unknown}, which the model lacks ({list(self.config.camera_names)})")
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"tokenizer vocab {self.tokenizer.vocab_size} > model vocab {self.config.vocab_size}")

    @property
    def action_dims(self) -> int:
        return self.norm_stats["actions"].dim

    def dim_mask(self) -> torch.Tensor:
        """bool [D]: the real action dims inside the padded chunk."""
        return torch.arange(self.config.action_dim) < self.action_dims

    def action_scale(self) -> np.ndarray:
        """Raw action units per normalised unit, per real action dim (METHODS.md §2)."""
        stats = self.norm_stats["actions"]
        return stats.scale(stats.resolved_mode(self.norm_mode))

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        return normalize(state, self.norm_stats["state"], self.norm_mode).astype(np.float32)

    def normalize_actions(self, actions: np.ndarray) -> np.ndarray:
        """Env-unit actions [..., d] -> normalised, padded [..., D] float32."""
        x = normalize(actions, self.norm_stats["actions"], self.norm_mode)
        return pad_last(x, self.config.action_dim).astype(np.float32)

    def unnormalize_actions(self, chunk: np.ndarray | torch.Tensor) -> np.ndarray:
        """Normalised padded chunk [..., D] -> env-unit actions [..., d] float32."""
        if isinstance(chunk, torch.Tensor):
            chunk = chunk.detach().float().cpu().numpy()
        return unnormalize(chunk, self.norm_stats["actions"], self.norm_mode).astype(np.float32)

    def __call__(self, obs: Mapping) -> ModelInputs:
        cfg = self.config
        for key in ("images", "state", "prompt"):
            if key not in obs:
                raise KeyError(f"observation lacks {key!r}; it has {sorted(obs)}")
        state = np.asarray(obs["state"], dtype=np.float32)
        if state.ndim != 2:
            raise ValueError(f"state must be [B, S], got shape {state.shape}")
        b = state.shape[0]
        prompts = list(obs["prompt"])
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for a batch of {b}")
        if self.camera_map is None:
            unknown = sorted(set(obs["images"]) - set(cfg.camera_names))
            if unknown:
                raise KeyError(f"unknown camera(s) {unknown}; the model has {list(cfg.camera_names)}")
            sources = {cam: cam for cam in cfg.camera_names}
        else:
            sources = dict(self.camera_map)
        size = cfg.vision.image_size
        images = torch.full((b, len(cfg.camera_names), 3, size, size), -1.0)
        image_masks = torch.zeros(b, len(cfg.camera_names), dtype=torch.bool)
        for i, cam in enumerate(cfg.camera_names):
            key = sources.get(cam)
            if key is not None and key in obs["images"]:
                frames = torch.as_tensor(np.asarray(obs["images"][key]))
                if frames.shape[0] != b:
                    raise ValueError(f"camera {cam!r} has {frames.shape[0]} frames for a batch of {b}")
                images[:, i] = resize_with_pad(frames, size, antialias=cfg.image_resize_antialias)
                image_masks[:, i] = True
        norm_state = self.normalize_state(state)
        bins = discretize_state(norm_state, cfg.state_bins) if cfg.variant == "pi05" else None
        tokens, token_masks = self.tokenizer(prompts, cfg.max_token_len, bins)
        return ModelInputs(
            images=images,
            image_masks=image_masks,
            tokens=tokens,
            token_masks=token_masks,
            state=torch.from_numpy(pad_last(norm_state, cfg.state_width)),
        )


def build_test_tokenizer(directory: str | os.PathLike, vocab_size: int = 400,
                         extra_corpus: Sequence[str] = ()) -> PromptTokenizer:
    """Trains a tiny SentencePiece model in milliseconds (tests have no PaliGemma tokenizer here).

    extra_corpus: more text (e.g. the task prompts) so those prompts tokenise into few pieces.
    """
    import sentencepiece

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    corpus = [
        "pick up the red cube and lift it",
        "push the cube to the goal region",
        "stack the red cube on top of the green cube",
        "pull the cube towards the robot",
        "lift the peg upright",
        "insert the peg into the hole on the side",
        "plug the charger into the wall receptacle",
        "put the black bowl on the plate",
        "Task: open the drawer, State: 0 1 2 3 4 5 6 7 8 9 10 128 255;\nAction: ",
        *extra_corpus,
    ] * 20
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(directory / "tokenizer"),
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        bos_id=2,
        eos_id=1,
        pad_id=0,
        unk_id=3,
        # As PaliGemma's tokenizer: no whitespace folding and no dummy prefix, so "\n" survives.
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        minloglevel=2,
    )
    return PromptTokenizer(directory)
