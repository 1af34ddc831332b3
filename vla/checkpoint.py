"""Checkpoints: pirl's own format, and importers for openpi, LeRobot and transformers π0 / π0.5 files.

pirl format (a directory, written atomically):
    config.json          {"format": "pirl-policy", "version": 1, "model": ModelConfig, "extra": {...}}
    model.safetensors    parameters under openpi's names (see vla/backbone.py)
    norm_stats.json      optional, openpi layout
    <name>.safetensors   optional extra modules (noise head, value head), listed in config "extra"
    tokenizer.model      optional, the SentencePiece model the prompts are tokenised with
    rollout.json         optional, the settings the policy was trained / fine-tuned with, which
                         `pirl eval`, `pirl collect` and `pirl serve` take as defaults (command-line
                         overrides win): {"env": {simulator, task, ..., max_episode_steps},
                         "num_steps": K, "n_exec": n, "camera_map": {model camera: env camera}}.
                         A separate file, so adding it does not change the policy's identity
                         (`pirl.critic.q.file_ident` hashes config.json). RL trainer checkpoints
                         without one are read from their recorded trainer config.

The image preprocessing convention travels in the model config (`image_resize_antialias`): pirl's
own checkpoints resize with antialiasing; `pirl import` records the home framework's (openpi's
PyTorch port and LeRobot: none).

Importers read the safetensors header first (names, shapes) and compare it with the model the config
describes, so a wrong-size config fails with a full list of missing / unexpected / mis-shaped keys
before a single weight is read. Names are canonicalised from every known writer:
- openpi PyTorch export:  paligemma_with_expert.*, action_*; norm stats in assets/<robot>/norm_stats.json
- LeRobot π0 / π0.5:     the same names under "model."; SigLIP as vision_tower.vision_model.* (files
                          written under transformers 4) or vision_tower.* (transformers 5)
- older transformers 4:   paligemma.language_model.model.* / paligemma.vision_tower.* (pre-4.52 layout)
- transformers' PI0:      model.vlm.*, model.dit.*, embed_action_time.*
Norm stats: openpi's assets/<id>/norm_stats.json, a norm_stats.json, or (LeRobot 0.5+) the
normaliser steps of policy_preprocessor.json / policy_postprocessor.json and their *.safetensors
state ({"observation.state.mean": ..., "action.std": ...}; `read_lerobot_processor_stats`).
Weights present in a file but unused at inference (LM heads, the expert's token embedding) are
reported in the result and dropped; PaliGemma's tied LM head stands in for a missing token table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vla.config import ModelConfig, unknown_keys_message
from vla.policy import FlowPolicy
from vla.processor import NormStats, load_norm_stats, save_norm_stats

FORMAT = "pirl-policy"
VERSION = 1

# Present in published files, never used to produce actions.
UNUSED_KEYS = (
    "paligemma_with_expert.paligemma.lm_head.weight",
    "paligemma_with_expert.gemma_expert.lm_head.weight",
    "paligemma_with_expert.gemma_expert.model.embed_tokens.weight",
)
TOKEN_TABLE = "paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"
TIED_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"


class CheckpointMismatch(ValueError):
    """The file's tensors do not fit the configured model; the message lists every difference,
    `one_line` summarises them (what the CLI prints)."""

    def __init__(self, message: str, one_line: str | None = None):
        super().__init__(message)
        self.one_line = one_line or message.splitlines()[0]


class CorruptCheckpoint(ValueError):
    """A checkpoint file is truncated or not in the format its name says."""


ROLLOUT_FILE = "rollout.json"
ROLLOUT_KEYS = ("env", "num_steps", "n_exec", "camera_map")


@dataclasses.dataclass
class ImportReport:
    source: Path
    format: str
    unused_keys: list[str]
    norm_stats_file: Path | None


# -- atomic directories ----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary sibling directory; on success it replaces `path` in (near) one rename.

    A crash leaves either the old directory or the new one at `path`, never a half-written one; the
    previous version is moved aside first and removed only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def atomic_file(path: str | os.PathLike, write) -> None:
    """`write(tmp_path)` to a temporary sibling, fsync, then one rename onto `path`: a reader sees the old
    file or the new one, never half of one (for single files in a directory that holds other things)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# -- naming ----------------------------------------------------------------------------------------
_RENAMES: list[tuple[re.Pattern, str]] = [
    # transformers' PI0 layout
    (re.compile(r"^model\.vlm\."), "paligemma_with_expert.paligemma.model."),
    (re.compile(r"^model\.dit\."), "paligemma_with_expert.gemma_expert.model."),
    (re.compile(r"^embed_action_time\."), ""),
    # LeRobot: everything under "model."
    (re.compile(r"^model\.(?=paligemma_with_expert\.|action_|state_proj|time_mlp)"), ""),
    # pre-4.52 transformers PaliGemma layout
    (re.compile(r"\.paligemma\.language_model\.model\."), ".paligemma.model.language_model."),
    (re.compile(r"\.paligemma\.language_model\.lm_head\."), ".paligemma.lm_head."),
    (re.compile(r"\.paligemma\.(vision_tower|multi_modal_projector)\."), r".paligemma.model.\1."),
    # transformers 5 SigLIP without the vision_model level
    (re.compile(r"\.vision_tower\.(?!vision_model\.)"), ".vision_tower.vision_model."),
]


def canonical_name(name: str) -> str:
    """Maps a parameter name from any known writer onto pirl's (= openpi's) names."""
    for pattern, repl in _RENAMES:
        name = pattern.sub(repl, name)
    return name


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every parameter the configured model has (built on the meta device)."""
    with torch.device("meta"):
        model = FlowPolicy(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_header(path: Path, check_data: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors file's JSON header; no tensor byte is read.

    Layout: 8-byte little-endian header length N, the JSON header {name: {dtype, shape, data_offsets}},
    then the tensor bytes. A file cut short (an interrupted copy or download) is named as such, with
    where its header / data should end and how long the file is. check_data: also check that the file
    holds every tensor byte the header promises (before weights are read; a config mismatch is
    reported from the header alone first).
    """
    path = Path(path)
    where = f"checkpoint {path.parent}: {path.name}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    file_size = path.stat().st_size
    fix = "copy or download it again"
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CorruptCheckpoint(f"{where} is truncated or corrupt (file has {file_size} bytes, less than "
                                    f"the 8-byte header length); {fix}")
        size = int.from_bytes(raw, "little")
        if size <= 0 or size > 100_000_000:
            raise CorruptCheckpoint(f"{where} is not a safetensors file (header length field {size}); {fix}")
        if 8 + size > file_size:
            raise CorruptCheckpoint(f"{where} is truncated or corrupt (header ends at byte {8 + size}, file has "
                                    f"{file_size} bytes); {fix}")
        try:
            header = json.loads(f.read(size))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CorruptCheckpoint(f"{where} is corrupt (its header is not valid JSON: {err}); {fix}") from None
    if not isinstance(header, dict):
        raise CorruptCheckpoint(f"{where} is corrupt (header is not a JSON object); {fix}")
    try:
        tensors = {k: v for k, v in header.items() if k != "__metadata__"}
        data_end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        shapes = {k: tuple(v["shape"]) for k, v in tensors.items()}
    except (KeyError, TypeError, IndexError, ValueError):
        raise CorruptCheckpoint(f"{where} is corrupt (header entries lack shape / data_offsets); {fix}") from None
    if check_data and 8 + size + data_end > file_size:
        raise CorruptCheckpoint(f"{where} is truncated or corrupt (tensor data ends at byte {8 + size + data_end}, "
                                f"file has {file_size} bytes); {fix}")
    return shapes


def _plan(header: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]], source: Path):
    """source name -> model name for every model parameter; raises listing all mismatches."""
    canonical: dict[str, str] = {}
    for name in header:
        canonical.setdefault(canonical_name(name), name)
    plan: dict[str, str] = {}
    missing, bad_shape = [], []
    for name, shape in expected.items():
        src = canonical.get(name)
        if src is None and name == TOKEN_TABLE:
            src = canonical.get(TIED_HEAD)  # tied weights saved once, under the LM head's name
        if src is None:
            missing.append(name)
        elif tuple(header[src]) != tuple(shape):
            bad_shape.append(f"{name}: file {tuple(header[src])} vs config {tuple(shape)}")
        else:
            plan[name] = src
    used = set(plan.values())
    unused = sorted(n for c, n in canonical.items() if n not in used and c in UNUSED_KEYS)
    unexpected = sorted(n for c, n in canonical.items() if n not in used and c not in UNUSED_KEYS)
    if missing or bad_shape or unexpected:
        counts = ", ".join(f"{len(items)} {title}" for title, items in
                           (("missing", missing), ("unexpected", unexpected), ("mis-shaped", bad_shape)) if items)
        example = (bad_shape or missing or unexpected)[0]
        one_line = (f"checkpoint {source} does not match the model config ({counts}; e.g. {example}); "
                    "use the model config it was saved with (model= / --model)")
        lines = [f"checkpoint {source} does not match the configured model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shape)):
            if items:
                shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {x}" for x in shown)
        raise CheckpointMismatch("\n".join(lines), one_line)
    return plan, unused


def _load_into(model: FlowPolicy, path: Path, plan: Mapping[str, str]) -> None:
    read_header(path, check_data=True)
    params = model.state_dict()
    with safe_open(str(path), framework="pt") as f, torch.no_grad():
        for name, src in plan.items():
            target = params[name]
            target.copy_(f.get_tensor(src).to(device=target.device, dtype=target.dtype))


# -- pirl format -----------------------------------------------------------------------------------
def save_policy(
    path: str | os.PathLike,
    policy: FlowPolicy,
    norm_stats: Mapping[str, NormStats] | None = None,
    extra_modules: Mapping[str, torch.nn.Module] | None = None,
    metadata: Mapping | None = None,
    tokenizer_file: str | os.PathLike | None = None,
    rollout: Mapping | None = None,
) -> Path:
    """Writes a pirl checkpoint directory atomically (float32 weights are kept bit for bit).

    tokenizer_file: a SentencePiece model copied in as `tokenizer.model`, so the directory is a
    self-contained policy (`tokenizer_path` finds it).
    rollout: the settings to act with by default (`rollout.json`, see the module doc); None takes them
    from an RL trainer config in metadata["config"] when there is one.
    """
    path = Path(path)
    if rollout is None and isinstance((metadata or {}).get("config"), Mapping):
        rollout = rollout_from_train_config(metadata["config"]) or None
    rollout = validate_rollout(rollout, path) if rollout else None
    extra_modules = dict(extra_modules or {})
    for name in extra_modules:
        if not re.fullmatch(r"[A-Za-z0-9_]+", name) or name == "model":
            raise ValueError(f"extra module name {name!r} must be [A-Za-z0-9_]+ and not 'model'")
    with atomic_directory(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        for name, module in extra_modules.items():
            sd = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
            save_file(sd, str(tmp / f"{name}.safetensors"))
        if norm_stats is not None:
            save_norm_stats(norm_stats, tmp / "norm_stats.json")
        if tokenizer_file is not None:
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.model")
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": policy.config.to_dict(),
            "extra": sorted(extra_modules),
            "metadata": dict(metadata or {}),
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
        if rollout:
            (tmp / ROLLOUT_FILE).write_text(json.dumps(rollout, indent=2, sort_keys=True) + "\n")
    return path


def validate_rollout(rollout: Mapping, where: str | os.PathLike) -> dict:
    """The rollout settings as plain data; unknown keys and bad values are errors naming `where`."""
    rollout = json.loads(json.dumps(dict(rollout)))
    unknown = unknown_keys_message(rollout, ROLLOUT_KEYS, kind="rollout setting")
    if unknown:
        raise ValueError(f"{where}: {unknown}")
    for key in ("env", "camera_map"):
        if key in rollout and not isinstance(rollout[key], dict):
            raise ValueError(f"{where}: rollout {key} must be a mapping, got {rollout[key]!r}")
    for key in ("num_steps", "n_exec"):
        if key in rollout and not (isinstance(rollout[key], int) and rollout[key] >= 1):
            raise ValueError(f"{where}: rollout {key} must be an integer >= 1, got {rollout[key]!r}")
    steps = rollout.get("env", {}).get("max_episode_steps")
    if steps is not None and not (isinstance(steps, int) and steps >= 1):
        raise ValueError(f"{where}: rollout env.max_episode_steps must be an integer >= 1, got {steps!r}")
    return rollout


def rollout_from_train_config(config: Mapping) -> dict:
    """The rollout settings recorded by an RL trainer config (`pirl train`: env, sampler.num_steps,
    run.n_exec, run.camera_map); {} when `config` is not one."""
    run, sampler, env = config.get("run"), config.get("sampler"), config.get("env")
    if not (isinstance(run, Mapping) and isinstance(sampler, Mapping) and isinstance(env, Mapping)):
        return {}
    out = {"env": {k: v for k, v in env.items() if k not in ("num_envs", "seed", "record_video_envs", "video_dir")}}
    if sampler.get("num_steps") is not None:
        out["num_steps"] = int(sampler["num_steps"])
    if run.get("n_exec") is not None:
        out["n_exec"] = int(run["n_exec"])
    if run.get("camera_map") is not None:
        out["camera_map"] = dict(run["camera_map"])
    return out


def read_rollout(path: str | os.PathLike) -> dict:
    """The settings a checkpoint acts with by default: its rollout.json, else those of the RL trainer
    config it records, else {}."""
    path = Path(path)
    file = path / ROLLOUT_FILE
    if file.is_file():
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise CorruptCheckpoint(f"checkpoint {path}: {ROLLOUT_FILE} is not valid JSON ({err})") from None
        return validate_rollout(data, file)
    config = read_metadata(path).get("config")
    return rollout_from_train_config(config) if isinstance(config, Mapping) else {}


def _config_json(path: str | os.PathLike) -> dict:
    """config.json of a checkpoint directory, with one-line errors for the usual mistakes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path}: no such directory (pass the directory of a pirl policy, "
                                "e.g. checkpoint=assets/pickcube_tiny_sft_v3)")
    if not path.is_dir():
        raise NotADirectoryError(f"checkpoint {path}: is a file, not a checkpoint directory")
    file = path / "config.json"
    if not file.is_file():
        hint = ("; convert it with `pirl import`" if (path / "model.safetensors").exists()
                else " (not a pirl policy directory)")
        raise FileNotFoundError(f"checkpoint {path}: no config.json{hint}")
    try:
        return json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptCheckpoint(f"checkpoint {path}: config.json is truncated or corrupt ({err})") from None


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The checkpoint's own tokenizer.model, if it carries one."""
    file = Path(path) / "tokenizer.model"
    return file if file.exists() else None


def read_metadata(path: str | os.PathLike) -> dict:
    return _config_json(path).get("metadata", {})


def read_config(path: str | os.PathLike) -> ModelConfig:
    meta = _config_json(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pirl checkpoint (format {meta.get('format')!r}); use import_checkpoint")
    if meta.get("version") != VERSION:
        raise ValueError(f"{path}: checkpoint version {meta.get('version')} is not supported (expected {VERSION})")
    return ModelConfig.from_dict(meta["model"])


def load_policy(
    path: str | os.PathLike,
    config: ModelConfig | None = None,
    device: str | torch.device = "cpu",
    extra_modules: Mapping[str, torch.nn.Module] | None = None,
) -> tuple[FlowPolicy, dict[str, NormStats] | None]:
    """Loads a pirl checkpoint. `config`, if given, must equal the stored one (sizes are checked)."""
    path = Path(path)
    stored = read_config(path)
    if config is not None:  # the image convention is the checkpoint's own, whatever the request says
        config = dataclasses.replace(config, image_resize_antialias=stored.image_resize_antialias)
    if config is not None and config != stored:
        diff = {k: (v, getattr(config, k)) for k, v in dataclasses.asdict(stored).items() if getattr(config, k) != v}
        message = f"{path}: stored config differs from the requested one (stored, requested): {diff}"
        raise CheckpointMismatch(message, f"checkpoint {message}; use the model config it was saved with")
    plan, _ = _plan(read_header(path / "model.safetensors"), expected_shapes(stored), path)
    with torch.device(device):
        policy = FlowPolicy(stored)
    _load_into(policy, path / "model.safetensors", plan)
    for name, module in (extra_modules or {}).items():
        file = path / f"{name}.safetensors"
        if not file.exists():
            raise FileNotFoundError(f"{path} has no extra module {name!r}")
        with safe_open(str(file), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        module.load_state_dict(state, strict=True)
    stats = load_norm_stats(path / "norm_stats.json") if (path / "norm_stats.json").exists() else None
    return policy.eval(), stats


# -- importers -------------------------------------------------------------------------------------
def detect_format(path: Path) -> str:
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such checkpoint directory")
    if (path / "config.json").exists():
        meta = json.loads((path / "config.json").read_text())
        if meta.get("format") == FORMAT:
            return "pirl"
        if meta.get("model_type") == "pi0":
            return "transformers"
        return "lerobot"
    if (path / "model.safetensors").exists():
        return "openpi"
    raise FileNotFoundError(f"{path}: no model.safetensors / config.json found")


def _find_norm_stats(path: Path, asset_id: str | None) -> Path | None:
    candidates = sorted(path.glob("assets/*/norm_stats.json")) + sorted(path.glob("norm_stats.json"))
    if asset_id is not None:
        candidates = [c for c in candidates if c.parent.name == asset_id]
        if not candidates:
            raise FileNotFoundError(f"{path}: no assets/{asset_id}/norm_stats.json")
    if len(candidates) > 1:
        names = [str(c.relative_to(path)) for c in candidates]
        raise ValueError(f"{path}: several norm stats {names}; choose one with asset_id")
    return candidates[0] if candidates else None


# LeRobot's NormalizationMode -> pirl's NormStats mode (IDENTITY: the feature is not normalised).
_LEROBOT_MODES = {"MEAN_STD": "zscore", "QUANTILES": "quantile"}
_LEROBOT_KEYS = {"observation.state": "state", "action": "actions"}


def read_lerobot_processor_stats(path: str | os.PathLike) -> tuple[dict[str, NormStats], list[Path]] | None:
    """Norm stats from LeRobot 0.5+ processor files next to the weights, or None if there are none.

    `policy_preprocessor*.json` lists its steps; the "normalizer_processor" step's config carries the
    features ({"observation.state": {"type": "STATE", "shape": [..]}, "action": {...}}) and norm_map
    ({"STATE": "MEAN_STD", "ACTION": "MEAN_STD", "VISUAL": "IDENTITY"}), its `state_file` (a safetensors
    file) the statistics as "<feature>.<stat>" tensors ("observation.state.mean", "action.std", ...).
    The postprocessor's "unnormalizer_processor" holds the action stats the same way. Returns the
    state / actions entries (with the mode LeRobot normalises them in) and the files read.
    """
    path = Path(path)
    found: dict[str, dict[str, np.ndarray]] = {}
    modes: dict[str, str] = {}
    files: list[Path] = []
    for config_file in sorted(path.glob("policy_preprocessor*.json")) + sorted(path.glob("policy_postprocessor*.json")):
        try:
            pipeline = json.loads(config_file.read_text())
        except json.JSONDecodeError as err:
            raise CorruptCheckpoint(f"{config_file}: not valid JSON ({err})") from None
        for step in pipeline.get("steps", []):
            name = step.get("registry_name") or step.get("class", "")
            if not any(k in name.lower() for k in ("normalizer_processor", "normalizerprocessorstep")):
                continue
            step_cfg = step.get("config", {})
            features = step_cfg.get("features", {})
            norm_map = step_cfg.get("norm_map", {})
            if not step.get("state_file"):
                continue
            state_file = path / step["state_file"]
            if not state_file.is_file():
                raise FileNotFoundError(f"{config_file} names {step['state_file']}, which is missing from {path}")
            read_header(state_file, check_data=True)  # truncation check with a clear message
            files += [config_file, state_file]
            with safe_open(str(state_file), framework="pt") as f:
                for key in f.keys():
                    feature, stat = key.rsplit(".", 1)
                    if feature in _LEROBOT_KEYS:
                        found.setdefault(_LEROBOT_KEYS[feature], {})[stat] = f.get_tensor(key).double().numpy()
            for feature, ours in _LEROBOT_KEYS.items():
                ftype = (features.get(feature) or {}).get("type")
                mode = norm_map.get(ftype) if ftype else None
                if mode is not None:
                    modes[ours] = mode
    if not found:
        return None
    stats: dict[str, NormStats] = {}
    for key, entry in found.items():
        mode = modes.get(key)
        if mode is not None and mode not in _LEROBOT_MODES:
            raise ValueError(f"{path}: LeRobot normalises {key} with {mode}, which pirl does not implement "
                             f"(supported: {sorted(_LEROBOT_MODES)})")
        data = {k: v.reshape(-1).tolist() for k, v in entry.items()}
        if mode is not None:
            data["mode"] = _LEROBOT_MODES[mode]
        stats[key] = NormStats.from_json(data)
    return stats, sorted(set(files))


def import_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    device: str | torch.device = "cpu",
    asset_id: str | None = None,
    home_preprocessing: bool = True,
) -> tuple[FlowPolicy, dict[str, NormStats] | None, ImportReport]:
    """Loads an openpi / LeRobot / transformers π0-family directory into a `FlowPolicy` of `config`.

    The checkpoint's shapes are validated against `config` from the file header before loading.
    Norm stats come from openpi's assets/<id>/norm_stats.json, a norm_stats.json, or LeRobot's
    processor files. home_preprocessing: the policy's config records its home framework's image
    convention (openpi / LeRobot: no antialiasing); False keeps `config`'s.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "pirl":
        policy, stats = load_policy(path, config, device)
        return policy, stats, ImportReport(path, fmt, [], path / "norm_stats.json" if stats else None)
    if home_preprocessing:
        config = dataclasses.replace(config, image_resize_antialias=False)
    weights = path / "model.safetensors"
    plan, unused = _plan(read_header(weights), expected_shapes(config), path)
    with torch.device(device):
        policy = FlowPolicy(config)
    _load_into(policy, weights, plan)
    stats_file = _find_norm_stats(path, asset_id)
    stats = load_norm_stats(stats_file) if stats_file else None
    if stats is None:
        lerobot = read_lerobot_processor_stats(path)
        if lerobot is not None:
            stats, files = lerobot
            stats_file = files[0]
    return policy.eval(), stats, ImportReport(path, fmt, unused, stats_file)


def export_openpi(path: str | os.PathLike, policy: FlowPolicy, norm_stats: Mapping[str, NormStats] | None = None,
                  asset_id: str = "robot", include_unused: bool = False) -> Path:
    """Writes `policy` in openpi's PyTorch layout (model.safetensors + assets/<id>/norm_stats.json).

    include_unused adds the expert LM head that openpi's exports carry, to exercise import reports.
    """
    with atomic_directory(path) as tmp:
        state = {k: v.detach().contiguous().cpu() for k, v in policy.state_dict().items()}
        if include_unused:
            cfg = policy.config
            state["paligemma_with_expert.gemma_expert.lm_head.weight"] = torch.zeros(cfg.vocab_size, cfg.expert.width)
        save_file(state, str(tmp / "model.safetensors"))
        if norm_stats is not None:
            (tmp / "assets" / asset_id).mkdir(parents=True)
            save_norm_stats(norm_stats, tmp / "assets" / asset_id / "norm_stats.json")
    return Path(path)
