"""The π0 / π0.5 flow policy: prefix KV cache, action-expert velocity, flow-matching loss, Euler sampling.

Time convention (METHODS.md §1, openpi's): x_t = (1 - t) a + t eps, t = 1 is noise, t = 0 the clean
chunk; the network regresses u = eps - a; Euler sampling runs t from 1 to 0: x <- x - d v.

Inference reuses one prefix pass: `embed_prefix` runs SigLIP and the VLM decoder once and keeps every
layer's keys/values; `velocity` runs only the action expert on [state token,] H action tokens that
attend to that cache. The cache is never modified (each call concatenates into fresh tensors), so any
number of velocity calls, in any order, on the same prefix give the same result.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

from vla import draw
from vla.backbone import AdaptiveRMSNorm, KVCache, PaliGemmaWithExpert, Stream, block_attention
from vla.config import ModelConfig
from vla.graphs import GraphCache
from vla.inputs import ModelInputs

PROMPT_BUCKET = 16  # prompt columns are kept in multiples of this (`FlowPolicy._drop_masked_columns`)


@dataclasses.dataclass(frozen=True)
class Prefix:
    """The VLM's output for one batch of observations, reused across denoising steps.

    kv: per layer (keys, values) [B, kv_heads, L, head_dim] with RoPE applied.
    pad_mask: bool [B, L]; state: [B, D] (π0).
    hidden: final-normed VLM hidden states [B, L, W_vlm] (value / critic features), or None for a prefix
        embedded with `hidden=False` (denoising reads only the keys and values).
    """

    kv: KVCache
    pad_mask: Tensor
    hidden: Tensor | None
    state: Tensor

    @property
    def batch_size(self) -> int:
        return self.pad_mask.shape[0]

    def select(self, index: Tensor) -> "Prefix":
        """Rows `index` of the batch (indices may repeat: one prefix row per stochastic step)."""
        return Prefix(
            kv=tuple((k[index], v[index]) for k, v in self.kv),
            pad_mask=self.pad_mask[index],
            hidden=None if self.hidden is None else self.hidden[index],
            state=self.state[index],
        )

    def pooled(self) -> Tensor:
        """Mean of the valid prefix tokens' final hidden states [B, W_vlm] (π0.5 value features)."""
        if self.hidden is None:
            raise ValueError("this prefix was embedded without its hidden states (embed_prefix(hidden=False))")
        w = self.pad_mask.to(self.hidden.dtype)[..., None]
        return (self.hidden * w).sum(1) / w.sum(1).clamp_min(1.0)


@dataclasses.dataclass(frozen=True)
class ExpertOutput:
    velocity: Tensor  # [B, H, D] float32
    hidden: Tensor  # [B, H, W_expert] final-normed action-token states (noise-head / value features)

    def pooled(self) -> Tensor:
        """Mean over action tokens [B, W_expert] (π0 value features)."""
        return self.hidden.mean(1)


def sinusoidal_time_embedding(t: Tensor, dim: int, min_period: float, max_period: float) -> Tensor:
    """openpi's sine-cosine embedding of scalar times t [B] -> [B, dim], computed in float32."""
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=torch.float64, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angular = (2 * math.pi / period).to(torch.float32)
    phase = angular[None, :] * t.float()[:, None]
    return torch.cat([phase.sin(), phase.cos()], dim=1)


def flow_matching_target(actions: Tensor, noise: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """x_t = (1 - t) a + t eps and the target velocity u = eps - a (METHODS.md §1)."""
    tt = t[:, None, None]
    return (1 - tt) * actions + tt * noise, noise - actions


def masked_velocity_mse(v_pred: Tensor, u_target: Tensor, dim_mask: Tensor, step_mask: Tensor | None = None) -> Tensor:
    """Mean squared velocity error over valid (unpadded) action dims and steps (METHODS.md §1).

    dim_mask: bool [D] or [B, D] real action dims; step_mask: bool [B, H] steps inside the episode.
    """
    b, h, d = v_pred.shape
    weight = dim_mask.to(v_pred.dtype).expand(b, d)[:, None, :].expand(b, h, d)
    if step_mask is not None:
        weight = weight * step_mask.to(v_pred.dtype)[:, :, None]
    return ((v_pred.float() - u_target.float()) ** 2 * weight).sum() / weight.sum().clamp_min(1.0)


class FlowPolicy(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.paligemma_with_expert = PaliGemmaWithExpert(config)
        width, dim = config.expert.width, config.action_dim
        self.action_in_proj = nn.Linear(dim, width)
        self.action_out_proj = nn.Linear(width, dim)
        if config.variant == "pi05":
            self.time_mlp_in = nn.Linear(width, width)
            self.time_mlp_out = nn.Linear(width, width)
        else:
            self.state_proj = nn.Linear(config.state_width, width)
            self.action_time_mlp_in = nn.Linear(2 * width, width)
            self.action_time_mlp_out = nn.Linear(width, width)
        # π0.5 suffix: H action tokens in one block. π0: the state token (block 1), then actions (2).
        n_state = 0 if config.variant == "pi05" else 1
        blocks = [1] * n_state + [n_state + 1] * config.action_horizon
        self.register_buffer("suffix_blocks", torch.tensor(blocks, dtype=torch.long), persistent=False)
        self._graphs: GraphCache | None = None  # `use_cuda_graphs`

    # -- precision ------------------------------------------------------------------------------
    @property
    def compute_dtype(self) -> torch.dtype:
        return self.action_in_proj.weight.dtype

    def to_mixed_precision(self, dtype: torch.dtype = torch.bfloat16) -> "FlowPolicy":
        """Casts weights to `dtype` but keeps every norm (plain and adaptive) in float32."""
        self.to(dtype)
        for module in self.modules():
            if isinstance(module, GemmaRMSNorm | AdaptiveRMSNorm):
                module.float()
        return self

    # -- CUDA graphs ----------------------------------------------------------------------------
    def use_cuda_graphs(self, enabled: bool = True, max_graphs: int = 16, recorder_factory=None) -> "FlowPolicy":
        """Replay the inference passes (prefix, expert step) from captured CUDA graphs (`vla.graphs`).

        Only calls without gradients are replayed; training runs the same functions eagerly. One graph
        per pass and input shape, captured at first use (a few warm-up calls); at most `max_graphs`.
        Graphs read the weights in place, so `load_state_dict` and optimizer steps are seen; moving or
        casting the policy (`.to`, `to_mixed_precision`) drops them. If a capture fails, the policy
        says so once and runs eagerly from then on. `recorder_factory` replaces the CUDA recorder (tests).
        """
        if not enabled:
            self._graphs = None
            return self
        if recorder_factory is None and self.action_in_proj.weight.device.type != "cuda":
            raise ValueError("use_cuda_graphs: the policy is not on a CUDA device")
        self._graphs = GraphCache(max_graphs, recorder_factory)
        return self

    @property
    def graphs(self) -> GraphCache | None:
        """The captured graphs (None: eager). Assigning a cache back turns the same graphs on again, so a
        benchmark can alternate eager and graphed calls without capturing anew."""
        return self._graphs

    @graphs.setter
    def graphs(self, cache: GraphCache | None) -> None:
        self._graphs = cache

    def _run(self, name: str, fn, tensors: list[Tensor]) -> list[Tensor]:
        """fn(*tensors) -> tensors: replayed from a CUDA graph when graphs are on and no gradient is
        needed, else called."""
        graphs = self.graphs
        if graphs is None or torch.is_grad_enabled():
            return list(fn(*tensors))
        try:
            return graphs(name, fn, tensors)
        except Exception as err:  # noqa: BLE001 - any capture failure leaves the eager path, which is exact
            self._graphs = None
            warnings.warn(f"CUDA graphs off for this policy ({name} pass: {type(err).__name__}: {err}); "
                          "running eagerly", RuntimeWarning, stacklevel=3)
            return list(fn(*tensors))

    def _apply(self, fn, *args, **kwargs):
        # .to() / .cuda() / .half() replace the parameter tensors the graphs were recorded on.
        if self.graphs is not None:
            self.graphs.clear()
        return super()._apply(fn, *args, **kwargs)

    # -- prefix ---------------------------------------------------------------------------------
    def _embed_prefix_tokens(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor
                             ) -> tuple[Tensor, Tensor]:
        b, n_cams = image_masks.shape
        backbone = self.paligemma_with_expert
        if n_cams == 0:  # no row of the batch has any camera (`_drop_masked_columns`): the prompt alone
            return backbone.embed_tokens(tokens).to(self.compute_dtype), token_masks
        embedded = backbone.embed_images(images.flatten(0, 1))  # [B*n, T, W]
        embedded = embedded.reshape(b, n_cams * embedded.shape[1], embedded.shape[2])
        tokens_per_image = embedded.shape[1] // n_cams
        image_pad = image_masks[:, :, None].expand(b, n_cams, tokens_per_image).reshape(b, -1)
        text = backbone.embed_tokens(tokens).to(embedded.dtype)
        return torch.cat([embedded, text], 1), torch.cat([image_pad, token_masks], 1)

    def _checked(self, inputs: ModelInputs) -> ModelInputs:
        """`inputs` validated against the config, without the columns no row attends to
        (`_drop_masked_columns`)."""
        cfg = self.config
        inputs.validate(len(cfg.camera_names), cfg.vision.image_size, cfg.max_token_len, cfg.state_width)
        # Captured graphs are per input shape: with them on, the prompt keeps its full width, so that the
        # server's warm-up captures every graph its requests will replay (one per batch size).
        return self._drop_masked_columns(inputs, trim_prompt=self.graphs is None)

    @staticmethod
    def _drop_masked_columns(inputs: ModelInputs, trim_prompt: bool = True) -> ModelInputs:
        """`inputs` without the cameras that no row of the batch has, and (`trim_prompt`) without the
        prompt's trailing padding columns that no row fills (kept up to a multiple of `PROMPT_BUCKET`).

        Masked prefix tokens are masked out of every attention and do not advance the RoPE positions,
        so they change no valid token: dropping them gives the same keys, values and valid hidden states
        for less work. A π0 with its third camera absent, as pirl's and openpi's LIBERO inputs have it,
        embeds 560 prefix tokens instead of 816; a π0.5 prompt (task and discretised state) fills about
        a third of its 200 columns. The prefix is shorter by the dropped tokens, its pad mask with it.
        Rounding the prompt up to a bucket bounds the number of distinct prefix shapes. Reads the masks
        on the host once per prefix, outside any captured pass. A camera or a column that some rows have
        stays, masked where absent.
        """
        if inputs.image_masks.is_meta:  # shapes only (size checks of the full configs): nothing to read
            return inputs
        n_cams, max_len = inputs.image_masks.shape[1], inputs.tokens.shape[1]
        present = torch.cat([inputs.image_masks.any(0), inputs.token_masks.any(0)]).cpu()
        cameras, columns = present[:n_cams], present[n_cams:]
        used = int(columns.nonzero().max()) + 1 if bool(columns.any()) else 0
        keep_len = min(max_len, max(1, -(-used // PROMPT_BUCKET)) * PROMPT_BUCKET) if trim_prompt else max_len
        dropped = {}
        if keep_len < max_len:
            dropped.update(tokens=inputs.tokens[:, :keep_len], token_masks=inputs.token_masks[:, :keep_len])
        if not bool(cameras.all()):
            keep = cameras.nonzero().flatten().to(inputs.images.device)
            dropped.update(images=inputs.images[:, keep], image_masks=inputs.image_masks[:, keep])
        return dataclasses.replace(inputs, **dropped) if dropped else inputs

    def embed_prefix(self, inputs: ModelInputs, hidden: bool = True) -> Prefix:
        """Runs SigLIP and the VLM decoder once; the keys/values serve every later velocity call.

        hidden=False: only the keys/values, for denoising alone: the VLM's last layer then stops at them
        (its attention, output projection and MLP make only the final hidden states, ~1/depth of the VLM's
        work) and `Prefix.hidden` is None. The keys/values are the same either way.
        """
        inputs = self._checked(inputs)
        tensors = [inputs.images, inputs.image_masks, inputs.tokens, inputs.token_masks]
        if hidden:
            pad, hidden_states, *kv = self._run("prefix_hidden", self._prefix_pass_hidden, tensors)
        else:
            (pad, *kv), hidden_states = self._run("prefix", self._prefix_pass_kv, tensors), None
        return Prefix(kv=tuple(zip(kv[0::2], kv[1::2], strict=True)), pad_mask=pad, hidden=hidden_states,
                      state=inputs.state)

    def _prefix_pass(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor, hidden: bool
                     ) -> list[Tensor]:
        """[pad mask, final hidden states (when `hidden`), keys and values of every layer]: tensors in and
        out, so that a CUDA graph can replay it (`_run`)."""
        embeds, pad = self._embed_prefix_tokens(images, image_masks, tokens, token_masks)
        positions = pad.long().cumsum(1) - 1
        blocks = torch.zeros_like(positions)
        attend = block_attention(pad, blocks, blocks)
        outputs, kv = self.paligemma_with_expert([Stream(embeds, 0)], positions, attend, keep_kv=True,
                                                 kv_only=not hidden)
        return [pad] + ([outputs[0]] if hidden else []) + [x for layer in kv for x in layer]

    def _prefix_pass_hidden(self, *tensors: Tensor) -> list[Tensor]:
        return self._prefix_pass(*tensors, hidden=True)

    def _prefix_pass_kv(self, *tensors: Tensor) -> list[Tensor]:
        return self._prefix_pass(*tensors, hidden=False)

    # -- suffix ---------------------------------------------------------------------------------
    def embed_suffix(self, state: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor | None]:
        """Suffix tokens for the expert and (π0.5) the adaRMS conditioning vector."""
        cfg = self.config
        dtype = self.compute_dtype
        time_emb = sinusoidal_time_embedding(t, cfg.expert.width, cfg.time_min_period, cfg.time_max_period)
        actions = self.action_in_proj(x_t.to(dtype))
        if cfg.variant == "pi05":
            cond = F.silu(self.time_mlp_out(F.silu(self.time_mlp_in(time_emb.to(dtype)))))
            return actions, cond
        fused = torch.cat([actions, time_emb.to(dtype)[:, None, :].expand_as(actions)], dim=2)
        fused = self.action_time_mlp_out(F.silu(self.action_time_mlp_in(fused)))
        state_token = self.state_proj(state.to(dtype))[:, None, :]
        return torch.cat([state_token, fused], 1), None

    def _check_suffix_inputs(self, x_t: Tensor, t: Tensor, batch: int) -> Tensor:
        h, d = self.config.action_horizon, self.config.action_dim
        if tuple(x_t.shape) != (batch, h, d):
            raise ValueError(f"x_t: expected shape {(batch, h, d)}, got {tuple(x_t.shape)}")
        t = torch.as_tensor(t, dtype=torch.float32, device=x_t.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if tuple(t.shape) != (batch,):
            raise ValueError(f"t: expected a scalar or shape {(batch,)}, got {tuple(t.shape)}")
        return t

    def expert_forward(self, prefix: Prefix, x_t: Tensor, t: Tensor, state: Tensor | None = None) -> ExpertOutput:
        """Velocity v(x_t, t, obs) [B, H, D] (float32) and the action tokens' hidden states.

        Only the action expert runs; it attends to the cached prefix keys/values (not modified).
        `state` defaults to the state the prefix was built from.
        """
        t = self._check_suffix_inputs(x_t, t, prefix.batch_size)
        state = prefix.state if state is None else state
        kv = [x for layer in prefix.kv for x in layer]
        velocity, hidden = self._run("expert", self._expert_pass, [x_t, t, prefix.pad_mask, state, *kv])
        return ExpertOutput(velocity=velocity, hidden=hidden)

    def _expert_pass(self, x_t: Tensor, t: Tensor, pad_mask: Tensor, state: Tensor, *kv: Tensor) -> list[Tensor]:
        """[velocity, action-token hidden states] from the prefix's flattened keys / values (`_run`)."""
        suffix, cond = self.embed_suffix(state, x_t, t)
        b, n = suffix.shape[:2]
        positions = pad_mask.long().sum(1, keepdim=True) + torch.arange(n, device=suffix.device)
        blocks = self.suffix_blocks[None, :].expand(b, n)
        prefix_blocks = torch.zeros_like(pad_mask, dtype=torch.long)
        attend = block_attention(
            torch.cat([pad_mask, torch.ones(b, n, dtype=torch.bool, device=suffix.device)], 1),
            blocks,
            torch.cat([prefix_blocks, blocks], 1),
        )
        past = tuple(zip(kv[0::2], kv[1::2], strict=True))
        (out,), _ = self.paligemma_with_expert([Stream(suffix, 1, cond)], positions, attend, past=past)
        hidden = out[:, -self.config.action_horizon :]
        return [self.action_out_proj(hidden).float(), hidden]

    def velocity(self, prefix: Prefix, x_t: Tensor, t: Tensor, state: Tensor | None = None) -> Tensor:
        return self.expert_forward(prefix, x_t, t, state).velocity

    # -- the joint (uncached) forward, used for SFT and as the reference of the cached path --------
    def forward_joint(self, inputs: ModelInputs, x_t: Tensor, t: Tensor) -> tuple[ExpertOutput, Tensor]:
        """Prefix and suffix through one attention per layer, as in π0 training.

        Returns the expert output and the prefix hidden states [B, L, W_vlm].
        """
        inputs = self._checked(inputs)
        prefix_embeds, prefix_pad = self._embed_prefix_tokens(inputs.images, inputs.image_masks, inputs.tokens,
                                                              inputs.token_masks)
        t = self._check_suffix_inputs(x_t, t, inputs.batch_size)
        suffix, cond = self.embed_suffix(inputs.state, x_t, t)
        b, n = suffix.shape[:2]
        pad = torch.cat([prefix_pad, torch.ones(b, n, dtype=torch.bool, device=suffix.device)], 1)
        blocks = torch.cat([torch.zeros_like(prefix_pad, dtype=torch.long), self.suffix_blocks[None].expand(b, n)], 1)
        positions = pad.long().cumsum(1) - 1
        (prefix_out, suffix_out), _ = self.paligemma_with_expert(
            [Stream(prefix_embeds, 0), Stream(suffix, 1, cond)], positions, block_attention(pad, blocks, blocks)
        )
        hidden = suffix_out[:, -self.config.action_horizon :]
        return ExpertOutput(velocity=self.action_out_proj(hidden).float(), hidden=hidden), prefix_out

    def sample_time(self, batch: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        """t ~ Beta(1.5, 1) mapped to (0.001, 1) (π0 training, METHODS.md §1)."""
        cfg = self.config
        # Beta(a, 1) by inversion: F^{-1}(u) = u^(1/a); Beta(a, b) in general via two Gammas.
        if cfg.time_beta_beta == 1.0:
            u = draw.uniform(batch, generator, device)
            beta = u ** (1.0 / cfg.time_beta_alpha)
        else:
            dist = torch.distributions.Beta(cfg.time_beta_alpha, cfg.time_beta_beta)
            beta = dist.sample((batch,)).to(device)
        return beta * cfg.time_scale + cfg.time_offset

    def forward(self, inputs: ModelInputs, actions: Tensor, dim_mask: Tensor, step_mask: Tensor | None = None,
                **kwargs) -> Tensor:
        """The training loss, `flow_matching_loss`. Data-parallel wrappers (DDP, DeepSpeed) hook
        `forward`: SFT must call the wrapped module, since calling the method on the bare policy
        would skip the gradient all-reduce and let the ranks drift apart."""
        return self.flow_matching_loss(inputs, actions, dim_mask, step_mask, **kwargs)

    def flow_matching_loss(
        self,
        inputs: ModelInputs,
        actions: Tensor,
        dim_mask: Tensor,
        step_mask: Tensor | None = None,
        noise: Tensor | None = None,
        t: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """π0's behaviour-cloning loss: MSE between v(x_t, t) and eps - a on real dims (METHODS.md §1).

        actions: [B, H, D] normalised, padded; dim_mask: bool [D] or [B, D]; step_mask: bool [B, H].
        """
        b = actions.shape[0]
        if noise is None:
            noise = draw.normal(actions.shape, generator, actions.device)
        if t is None:
            t = self.sample_time(b, generator, actions.device)
        x_t, u = flow_matching_target(actions.float(), noise.float(), t)
        out, _ = self.forward_joint(inputs, x_t, t)
        return masked_velocity_mse(out.velocity, u, dim_mask, step_mask)

    @torch.no_grad()
    def sample_actions(
        self,
        inputs: ModelInputs,
        noise: Tensor | None = None,
        num_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Deterministic Euler (ODE) sampling on the uniform grid t_k = 1 - k/K (METHODS.md §1).

        The same grid as `pirl.flow.DenoiseGrid.uniform(K)`; pirl's samplers add the stochastic rules.
        """
        cfg = self.config
        steps = num_steps or cfg.num_steps
        b = inputs.batch_size
        shape = (b, cfg.action_horizon, cfg.action_dim)
        x = draw.normal(shape, generator, inputs.state.device) if noise is None else noise.float()
        if tuple(x.shape) != shape:
            raise ValueError(f"noise: expected shape {shape}, got {tuple(x.shape)}")
        prefix = self.embed_prefix(inputs, hidden=False)
        for k in range(steps):
            t_now, t_next = 1.0 - k / steps, 1.0 - (k + 1) / steps
            v = self.velocity(prefix, x, torch.full((b,), t_now, device=x.device))
            x = x - (t_now - t_next) * v
        return x
