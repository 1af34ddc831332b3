"""The chunked Q critic of QGF (METHODS.md §5): Q(obs, executed chunk) on frozen policy features.

    obs embedding  e(s)   = [standardised frozen policy features, normalised real state dims]
    Q_j(s, a_{t:t+h})     = MLP_j([e(s), a_{t:t+h} flattened]),  j = 1, 2   (actions normalised,
                            the executed h steps and the real action dims only)
    V(s)                  = MLP([e(s)]), expectile regression (kappa = 0.9) towards min_j Qbar_j
    y                     = sum_{i<h} gamma^i r_{t+i} + gamma^h * m * V(s_{t+h}),  m = prod not-done
    Qbar                  <- (1 - tau) Qbar + tau Q   (Polyak, tau = 0.005)

The policy is frozen, so its features are a fixed function of the observation: the trainer computes
them once per dataset frame (`pirl.critic.data`), and guidance computes them once per observation
(`ChunkCritic.bind`), after which every Q evaluation is a small MLP, differentiable in the actions.

Features (`feature_source`): "expert" = the action expert's output tokens, mean-pooled, from one
expert pass at the fixed input x = 0, t = 1 (what π0's PPO value head reads, `pirl.critic.value`);
"prefix" = the VLM prefix's valid tokens, mean-pooled (π0.5's value features); "both" = the two
concatenated; "auto" = expert for π0, prefix for π0.5.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from vla.checkpoint import atomic_file
from vla.policy import FlowPolicy, Prefix

FEATURE_SOURCES = ("auto", "expert", "prefix", "both")
CRITIC_FORMAT = "pirl-chunk-critic"


# -- the math (pure functions) ------------------------------------------------------------------------
def chunk_return_and_discount(rewards: Tensor, terminated: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """For chunks of h steps (METHODS.md §5): (sum_{i<h} gamma^i r_i, gamma^h * m), m = prod_i (1 - done_i).

    rewards, terminated: [..., h] (terminated: bool or 0/1, the env ended the episode after step i;
    a time-limit truncation is not a termination and must not be passed here). Returns two [...]
    tensors: the discounted reward sum and the bootstrap factor of V(s_{t+h}).
    """
    h = rewards.shape[-1]
    powers = gamma ** torch.arange(h, dtype=torch.float64, device=rewards.device)
    reward_sum = (rewards.double() * powers).sum(-1)
    not_done = (1.0 - terminated.double()).prod(-1)
    return reward_sum.to(rewards.dtype), (gamma**h * not_done).to(rewards.dtype)


def chunk_td_target(rewards: Tensor, terminated: Tensor, next_value: Tensor, gamma: float) -> Tensor:
    """Chunked TD target y = sum_{i<h} gamma^i r_{t+i} + gamma^h * m * V(s_{t+h}) (METHODS.md §5).

    rewards, terminated: [B, h]; next_value: [B], V of the observation after the chunk (any finite
    value where m = 0). Chunks crossing an episode end never reach this function: the data loader
    drops them (`pirl.critic.data.chunk_windows`).
    """
    reward_sum, discount = chunk_return_and_discount(rewards, terminated, gamma)
    return reward_sum + discount * next_value


def expectile_loss(diff: Tensor, kappa: float) -> Tensor:
    """IQL's expectile loss of diff = target - prediction (METHODS.md §5: V towards min_j Qbar_j):
    mean of |kappa - 1(diff < 0)| * diff^2. kappa = 0.5 is half the MSE; kappa -> 1 approaches the max."""
    if not 0.0 < kappa < 1.0:
        raise ValueError(f"expectile kappa must be in (0, 1), got {kappa}")
    weight = torch.where(diff < 0, 1.0 - kappa, kappa)
    return (weight * diff.pow(2)).mean()


@torch.no_grad()
def polyak_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """target <- (1 - tau) * target + tau * online, parameter by parameter (METHODS.md §5, tau 0.005).
    After n updates towards a constant online w from t0: target = w + (1 - tau)^n (t0 - w)."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"polyak tau must be in [0, 1], got {tau}")
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.lerp_(o.detach(), tau)


# -- policy features ------------------------------------------------------------------------------------
def resolve_feature_source(policy: FlowPolicy, source: str) -> str:
    if source not in FEATURE_SOURCES:
        raise ValueError(f"critic feature_source must be one of {FEATURE_SOURCES}, got {source!r}")
    if source == "auto":
        return "prefix" if policy.config.variant == "pi05" else "expert"
    return source


def feature_dim(policy: FlowPolicy, source: str) -> int:
    source = resolve_feature_source(policy, source)
    cfg = policy.config
    return {"expert": cfg.expert.width, "prefix": cfg.vlm.width, "both": cfg.expert.width + cfg.vlm.width}[source]


@torch.no_grad()
def policy_features(policy: FlowPolicy, prefix: Prefix, source: str) -> Tensor:
    """Frozen observation features [B, F] (float32) of the policy for one prefix (see module doc)."""
    source = resolve_feature_source(policy, source)
    parts = []
    if source in ("expert", "both"):
        cfg, param = policy.config, next(policy.parameters())
        x = torch.zeros(prefix.batch_size, cfg.action_horizon, cfg.action_dim, device=param.device)
        ones = torch.ones(prefix.batch_size, device=param.device)
        parts.append(policy.expert_forward(prefix, x, ones).pooled().float())
    if source in ("prefix", "both"):
        parts.append(prefix.pooled().float())
    return torch.cat(parts, -1)


# -- the critic -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CriticConfig:
    """Shapes and architecture of a `ChunkCritic` (saved in critic.json)."""

    feature_dim: int
    """Width of the frozen policy features (`policy_features`)."""
    state_dim: int
    """Real (unpadded) state dims appended to the features, normalised by the policy's stats."""
    horizon: int
    """h: executed steps the critic scores (= n_exec of the policy it steers)."""
    action_dims: int
    """Real action dims d; the critic reads actions[:, :h, :d] of a padded [B, H, D] chunk."""
    feature_source: str = "expert"
    """expert | prefix | both (resolved; see the module doc)."""
    hidden: tuple[int, ...] = (256, 256)
    """Widths of every MLP (the Q heads and V)."""
    num_q: int = 2
    """Q ensemble size; Q used for guidance and for the V target is the min over the heads."""
    layer_norm: bool = True
    """LayerNorm after every hidden layer (stabilises TD learning)."""

    def __post_init__(self) -> None:
        if self.horizon < 1 or self.action_dims < 1 or self.num_q < 1 or self.feature_dim < 0 or self.state_dim < 0:
            raise ValueError(f"critic config: bad sizes {dataclasses.asdict(self)}")
        if self.feature_source not in ("expert", "prefix", "both"):
            raise ValueError(f"critic feature_source must be expert, prefix or both, got {self.feature_source!r}")

    @property
    def obs_dim(self) -> int:
        return self.feature_dim + self.state_dim

    @property
    def action_in(self) -> int:
        return self.horizon * self.action_dims


def mlp(in_dim: int, hidden: tuple[int, ...], layer_norm: bool) -> nn.Sequential:
    """in -> [Linear, (LayerNorm), GELU] per hidden width -> scalar. GELU keeps dQ/da smooth for guidance."""
    layers: list[nn.Module] = []
    width = in_dim
    for h in hidden:
        layers += [nn.Linear(width, h), *([nn.LayerNorm(h)] if layer_norm else []), nn.GELU()]
        width = h
    layers.append(nn.Linear(width, 1))
    return nn.Sequential(*layers)


class ChunkCritic(nn.Module):
    """Q ensemble, its Polyak targets and V, on an observation embedding (see the module doc).

    `feature_mean` / `feature_std` standardise the frozen policy features (fixed from the training
    data at the first run; saved with the weights).
    """

    def __init__(self, config: CriticConfig):
        super().__init__()
        self.config = config
        self.q_heads = nn.ModuleList(mlp(config.obs_dim + config.action_in, config.hidden, config.layer_norm)
                                     for _ in range(config.num_q))
        self.target_heads = copy.deepcopy(self.q_heads).requires_grad_(False)
        self.v_head = mlp(config.obs_dim, config.hidden, config.layer_norm)
        self.register_buffer("feature_mean", torch.zeros(config.feature_dim))
        self.register_buffer("feature_std", torch.ones(config.feature_dim))

    # -- pieces -----------------------------------------------------------------------------------
    def set_feature_stats(self, features: Tensor) -> None:
        """Standardise features by these [N, F] values' mean and std (floored at 1e-3)."""
        self.feature_mean.copy_(features.float().mean(0))
        self.feature_std.copy_(features.float().std(0).clamp_min(1e-3) if len(features) > 1
                               else torch.ones_like(self.feature_std))

    def embed(self, features: Tensor, state: Tensor) -> Tensor:
        """Observation embedding [B, F + S] from raw policy features [B, F] and normalised state [B, >= S]."""
        feats = (features.float() - self.feature_mean) / self.feature_std
        return torch.cat([feats, state[:, : self.config.state_dim].float()], -1)

    def executed(self, actions: Tensor) -> Tensor:
        """[B, H, D] normalised padded chunk (or [B, h, d]) -> [B, h * d]: executed steps, real dims."""
        cfg = self.config
        if actions.ndim != 3 or actions.shape[1] < cfg.horizon or actions.shape[2] < cfg.action_dims:
            raise ValueError(f"critic actions: expected [B, >= {cfg.horizon}, >= {cfg.action_dims}], "
                             f"got {tuple(actions.shape)}")
        return actions[:, : cfg.horizon, : cfg.action_dims].float().reshape(len(actions), -1)

    def q_all(self, embedding: Tensor, chunk: Tensor, target: bool = False) -> Tensor:
        """Every head's Q [num_q, B]; chunk [B, h * d] (`executed`). target: the Polyak copies."""
        x = torch.cat([embedding, chunk], -1)
        heads = self.target_heads if target else self.q_heads
        return torch.stack([head(x).squeeze(-1) for head in heads])

    def q(self, embedding: Tensor, chunk: Tensor, target: bool = False) -> Tensor:
        """min_j Q_j [B] (METHODS.md §5: the guided critic is the min over the ensemble)."""
        return self.q_all(embedding, chunk, target).min(0).values

    def v(self, embedding: Tensor) -> Tensor:
        return self.v_head(embedding).squeeze(-1)

    # -- the seam guidance codes against ---------------------------------------------------------
    def bind(self, policy: FlowPolicy, prefix: Prefix, state: Tensor | None = None, target: bool = True) -> "BoundQ":
        """Q for the observations of `prefix` as a function of the action chunk alone.

        Computes the frozen policy features once (one expert pass at most) and returns `q_fn` with
        q_fn(actions [B, H, D] normalised, padded) -> [B] = min_j Q_j, reading only the executed
        first h steps and the real dims, differentiable w.r.t. `actions` (call it under
        `torch.enable_grad()` to take gradients). `state`: the normalised state [B, >= S]; defaults
        to `prefix.state`. target: score with the Polyak target heads (QGF's choice), else the online ones.
        """
        source = self.config.feature_source
        features = policy_features(policy, prefix, source)
        if features.shape[-1] != self.config.feature_dim:
            raise ValueError(f"critic expects {self.config.feature_dim} {source} features, the policy gives "
                             f"{features.shape[-1]}: this critic was trained for another policy")
        state = prefix.state if state is None else state
        with torch.no_grad():
            embedding = self.embed(features.to(self.feature_mean.device), state.to(self.feature_mean.device))
        return BoundQ(self, embedding, target)


class BoundQ:
    """q_fn(actions [B, H, D]) -> Q [B]: a critic with its observation embedding fixed (`ChunkCritic.bind`).

    `select(index)` repeats / picks observations (e.g. N samples per observation for best-of-N:
    `q_fn.select(torch.arange(B).repeat_interleave(N))`) without recomputing features.
    """

    def __init__(self, critic: ChunkCritic, embedding: Tensor, target: bool = True):
        self.critic, self.embedding, self.target = critic, embedding, target

    @property
    def batch_size(self) -> int:
        return self.embedding.shape[0]

    def select(self, index: Tensor) -> "BoundQ":
        return BoundQ(self.critic, self.embedding[index.to(self.embedding.device)], self.target)

    def __call__(self, actions: Tensor) -> Tensor:
        if actions.shape[0] != self.batch_size:
            raise ValueError(f"q_fn was bound to {self.batch_size} observations, got {actions.shape[0]} chunks "
                             "(use q_fn.select to repeat observations)")
        chunk = self.critic.executed(actions.to(self.embedding.device))
        return self.critic.q(self.embedding, chunk, self.target).to(actions.device)


# -- checkpoints ----------------------------------------------------------------------------------------
def file_ident(checkpoint: str | os.PathLike) -> str:
    """A cheap identity of a policy checkpoint directory: sha256 of config.json, norm_stats.json and
    model.safetensors' size and first / last MiB (a full hash of a 7 GB π0 costs too much)."""
    path = Path(checkpoint)
    digest = hashlib.sha256()
    for name in ("config.json", "norm_stats.json"):
        if (path / name).exists():
            digest.update((path / name).read_bytes())
    weights = path / "model.safetensors"
    if weights.exists():
        size = weights.stat().st_size
        digest.update(str(size).encode())
        with open(weights, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def policy_config_dict(policy: FlowPolicy) -> dict:
    """The policy's model config as plain JSON data (what critic.json stores). The image convention is
    left out at its default, so critics written before `image_resize_antialias` existed still match."""
    data = json.loads(json.dumps(dataclasses.asdict(policy.config), default=str))
    if data.get("image_resize_antialias") is True:
        del data["image_resize_antialias"]
    return data


def save_critic(directory: str | os.PathLike, critic: ChunkCritic, metadata: dict | None = None) -> Path:
    """Writes DIR/critic.safetensors and DIR/critic.json (config, metadata, the weights' sha256), each
    file replaced atomically; `load_critic` checks that the two belong together."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in critic.state_dict().items()}
    weights = directory / "critic.safetensors"
    atomic_file(weights, lambda p: save_file(state, str(p)))
    meta = {"format": CRITIC_FORMAT, "config": dataclasses.asdict(critic.config),
            "weights_sha256": hashlib.sha256(weights.read_bytes()).hexdigest(), "metadata": metadata or {}}
    atomic_file(directory / "critic.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=str)))
    return directory


def read_critic_meta(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "critic.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory}: no critic.json (not a critic written by `pirl critic`)")
    meta = json.loads(path.read_text())
    if meta.get("format") != CRITIC_FORMAT:
        raise ValueError(f"{directory}: critic.json has format {meta.get('format')!r}, expected {CRITIC_FORMAT!r}")
    return meta


def load_critic(directory: str | os.PathLike, policy: FlowPolicy | None = None, device: str | torch.device = "cpu",
                policy_checkpoint: str | os.PathLike | None = None) -> ChunkCritic:
    """A critic saved by `save_critic` (e.g. `pirl critic`'s OUT directory), in eval mode.

    policy: the policy it will read features from; its model config must equal the one the critic
    was trained on (else ValueError). policy_checkpoint: also check that this checkpoint directory
    is the one the critic was trained on (`file_ident`).
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = read_critic_meta(directory)
    weights = directory / "critic.safetensors"
    if hashlib.sha256(weights.read_bytes()).hexdigest() != meta["weights_sha256"]:
        raise ValueError(f"{directory}: critic.safetensors does not match critic.json (interrupted write?)")
    config = CriticConfig(**{**meta["config"], "hidden": tuple(meta["config"]["hidden"])})
    info = meta.get("metadata", {})
    if policy is not None and info.get("policy_config") is not None:
        if policy_config_dict(policy) != info["policy_config"]:
            raise ValueError(f"{directory}: this critic was trained on the features of another policy "
                             f"({info.get('policy_checkpoint')}); its model config differs")
    if policy_checkpoint is not None and info.get("policy_ident") not in (None, file_ident(policy_checkpoint)):
        raise ValueError(f"{directory}: trained on {info.get('policy_checkpoint')} (ident {info.get('policy_ident')}), "
                         f"not on {policy_checkpoint} (ident {file_ident(policy_checkpoint)})")
    critic = ChunkCritic(config)
    critic.load_state_dict(load_file(str(weights)), strict=True)
    return critic.to(device).eval()
