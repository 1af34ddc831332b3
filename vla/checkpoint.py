"""Checkpoints: pirl's own format, and importers for openpi, LeRobot and transformers π0 / π0.5 files.

pirl format (a directory, written atomically):
    config.json          {"format": "pirl-policy", "version": 1, "model": ModelConfig, "extra": {...}}
    model.safetensors    parameters under openpi's names (see vla/backbone.py)
    norm_stats.json      optional, openpi layout
    <name>.safetensors   optional extra modules (noise head, value head), listed in config "extra"

Importers read the safetensors header first (names, shapes) and compare it with the model the config
describes, so a wrong-size config fails with a full list of missing / unexpected / mis-shaped keys
before a single weight is read. Names are canonicalised from every known writer:
- openpi PyTorch export:  paligemma_with_expert.*, action_*; norm stats in assets/<robot>/norm_stats.json
- LeRobot π0 / π0.5:     the same names under "model."; SigLIP as vision_tower.vision_model.* (files
                          written under transformers 4) or vision_tower.* (transformers 5)
- older transformers 4:   paligemma.language_model.model.* / paligemma.vision_tower.* (pre-4.52 layout)
- transformers' PI0:      model.vlm.*, model.dit.*, embed_action_time.*
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

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vla.config import ModelConfig
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
    """The file's tensors do not fit the configured model; the message lists every difference."""


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


def read_header(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors file's JSON header; no tensor byte is read.

    Layout: 8-byte little-endian header length, then the JSON header {name: {dtype, shape, offsets}}.
    """
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if size <= 0 or size > 100_000_000:
            raise ValueError(f"{path}: not a safetensors file (header length {size})")
        header = json.loads(f.read(size))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


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
        lines = [f"checkpoint {source} does not match the configured model:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", bad_shape)):
            if items:
                shown = items[:40] + ([f"... and {len(items) - 40} more"] if len(items) > 40 else [])
                lines.append(f"  {title} ({len(items)}):")
                lines.extend(f"    {x}" for x in shown)
        raise CheckpointMismatch("\n".join(lines))
    return plan, unused


def _load_into(model: FlowPolicy, path: Path, plan: Mapping[str, str]) -> None:
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
) -> Path:
    """Writes a pirl checkpoint directory atomically (float32 weights are kept bit for bit).

    tokenizer_file: a SentencePiece model copied in as `tokenizer.model`, so the directory is a
    self-contained policy (`tokenizer_path` finds it).
    """
    path = Path(path)
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
    return path


def tokenizer_path(path: str | os.PathLike) -> Path | None:
    """The checkpoint's own tokenizer.model, if it carries one."""
    file = Path(path) / "tokenizer.model"
    return file if file.exists() else None


def read_metadata(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / "config.json").read_text()).get("metadata", {})


def read_config(path: str | os.PathLike) -> ModelConfig:
    meta = json.loads((Path(path) / "config.json").read_text())
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
    if config is not None and config != stored:
        diff = {k: (v, getattr(config, k)) for k, v in dataclasses.asdict(stored).items() if getattr(config, k) != v}
        raise CheckpointMismatch(f"{path}: stored config differs from the requested one (stored, requested): {diff}")
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


def import_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    device: str | torch.device = "cpu",
    asset_id: str | None = None,
) -> tuple[FlowPolicy, dict[str, NormStats] | None, ImportReport]:
    """Loads an openpi / LeRobot / transformers π0-family directory into a `FlowPolicy` of `config`.

    The checkpoint's shapes are validated against `config` from the file header before loading.
    """
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "pirl":
        policy, stats = load_policy(path, config, device)
        return policy, stats, ImportReport(path, fmt, [], path / "norm_stats.json" if stats else None)
    weights = path / "model.safetensors"
    plan, unused = _plan(read_header(weights), expected_shapes(config), path)
    with torch.device(device):
        policy = FlowPolicy(config)
    _load_into(policy, weights, plan)
    stats_file = _find_norm_stats(path, asset_id)
    stats = load_norm_stats(stats_file) if stats_file else None
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
