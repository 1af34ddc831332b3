"""The π0 / π0.5 model: cached path, masks, reference equality, layouts, training signal."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.hf_reference import hf_inputs, hf_pi0
from vla.checkpoint import canonical_name
from vla.config import ModelConfig, from_dict, get_config, tiny
from vla.policy import PROMPT_BUCKET, FlowPolicy, masked_velocity_mse
from vla.testing import random_inputs, tiny_policy

VARIANTS = ["pi0", "pi05"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_cached_path_equals_joint_forward(variant):
    """Prefix once + expert passes == one joint forward of prefix and suffix (fp32, 1e-5)."""
    policy = tiny_policy(1, variant)
    inputs = random_inputs(policy, 4, seed=1)  # padded prompts and one missing camera
    prefix = policy.embed_prefix(inputs)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x_t = torch.randn(4, policy.config.action_horizon, policy.config.action_dim, generator=g)
        t = torch.rand(4, generator=g)
        cached = policy.expert_forward(prefix, x_t, t)
        joint, prefix_hidden = policy.forward_joint(inputs, x_t, t)
        torch.testing.assert_close(cached.velocity, joint.velocity, atol=1e-5, rtol=0)
        torch.testing.assert_close(cached.hidden, joint.hidden, atol=1e-5, rtol=0)
        torch.testing.assert_close(prefix.hidden, prefix_hidden, atol=1e-5, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_velocity_calls_never_mutate_the_prefix(variant):
    policy = tiny_policy(2, variant)
    inputs = random_inputs(policy, 3, seed=2)
    prefix = policy.embed_prefix(inputs)
    snapshot = [(k.clone(), v.clone()) for k, v in prefix.kv]
    h, d = policy.config.action_horizon, policy.config.action_dim
    x1, x2 = torch.randn(3, h, d), torch.randn(3, h, d)
    first = policy.velocity(prefix, x1, torch.full((3,), 0.7))
    policy.velocity(prefix, x2, torch.full((3,), 0.2))  # an unrelated call in between
    again = policy.velocity(prefix, x1, torch.full((3,), 0.7))
    assert torch.equal(first, again)
    for (k, v), (k0, v0) in zip(prefix.kv, snapshot, strict=True):
        assert torch.equal(k, k0) and torch.equal(v, v0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefix_never_sees_the_suffix(variant):
    """Perturbing actions, time (and π0's state token) leaves prefix outputs bit-identical."""
    policy = tiny_policy(3, variant)
    inputs = random_inputs(policy, 2, seed=3)
    h, d = policy.config.action_horizon, policy.config.action_dim
    x_t = torch.randn(2, h, d)
    out_a, prefix_a = policy.forward_joint(inputs, x_t, torch.tensor([0.3, 0.9]))
    changed = copy.copy(inputs)
    changed.state = inputs.state + 5.0
    out_b, prefix_b = policy.forward_joint(changed, x_t * -3.0 + 1.0, torch.tensor([0.8, 0.1]))
    assert torch.equal(prefix_a, prefix_b)
    assert not torch.allclose(out_a.velocity, out_b.velocity)  # the suffix did change


@pytest.mark.parametrize("variant", VARIANTS)
def test_velocity_depends_on_valid_observation_only(variant):
    policy = tiny_policy(4, variant)
    inputs = random_inputs(policy, 2, seed=4)
    x_t = torch.randn(2, policy.config.action_horizon, policy.config.action_dim)
    t = torch.tensor([0.5, 0.5])
    base = policy.velocity(policy.embed_prefix(inputs), x_t, t)
    # Padded prompt tokens and the missing camera's pixels are invisible.
    hidden_change = copy.copy(inputs)
    hidden_change.tokens = torch.where(inputs.token_masks, inputs.tokens, torch.full_like(inputs.tokens, 7))
    hidden_change.images = inputs.images.clone()
    hidden_change.images[-1, -1] = 0.5
    same = policy.velocity(policy.embed_prefix(hidden_change), x_t, t)
    torch.testing.assert_close(base, same, atol=1e-6, rtol=0)
    # A visible pixel change does reach the actions.
    visible = copy.copy(inputs)
    visible.images = inputs.images.clone()
    visible.images[0, 0] = -visible.images[0, 0]
    assert (policy.velocity(policy.embed_prefix(visible), x_t, t) - base).abs().max() > 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_prefix_columns_no_row_attends_to_are_dropped_without_changing_anything(variant, monkeypatch):
    """A camera absent from the whole batch and the prompt columns after every row's last token are
    masked everywhere, so dropping them before SigLIP and the VLM is exact (fp32)."""
    policy = tiny_policy(6, variant)
    cfg = policy.config
    tokens_per_image = cfg.vision.tokens_per_image
    per_row = random_inputs(policy, 3, seed=6)  # the last row misses the last camera: kept, masked there
    everywhere = copy.copy(per_row)
    everywhere.image_masks = per_row.image_masks.clone()
    everywhere.image_masks[:, -1] = False
    nothing = copy.copy(per_row)
    nothing.image_masks = torch.zeros_like(per_row.image_masks)
    short = copy.copy(per_row)  # prompts of 5, 2 and 3 tokens: one bucket of columns is kept
    short.token_masks = torch.arange(cfg.max_token_len)[None, :] < torch.tensor([[5], [2], [3]])
    short.tokens = per_row.tokens * short.token_masks
    short_everywhere = copy.copy(everywhere)
    short_everywhere.tokens, short_everywhere.token_masks = short.tokens, short.token_masks
    x_t = torch.randn(3, cfg.action_horizon, cfg.action_dim)
    t = torch.tensor([0.9, 0.5, 0.2])

    def run(inputs):
        prefix = policy.embed_prefix(inputs)
        joint, prefix_hidden = policy.forward_joint(inputs, x_t, t)
        valid = prefix.pad_mask[..., None].float()
        joint_pooled = (prefix_hidden * valid).sum(1) / valid.sum(1)  # the joint pass's valid prefix tokens
        return prefix, policy.velocity(prefix, x_t, t), prefix.pooled(), joint.velocity, joint_pooled

    full_length = len(cfg.camera_names) * tokens_per_image + cfg.max_token_len
    assert PROMPT_BUCKET < cfg.max_token_len
    cases = ((per_row, 0), (everywhere, 1), (nothing, len(cfg.camera_names)), (short, 0), (short_everywhere, 1))
    for inputs, dropped in cases:
        used = int(inputs.token_masks.sum(1).max())
        prompt_columns = min(cfg.max_token_len, -(-used // PROMPT_BUCKET) * PROMPT_BUCKET)
        prefix, *outputs = run(inputs)
        assert prefix.pad_mask.shape[1] == (full_length - dropped * tokens_per_image
                                            - (cfg.max_token_len - prompt_columns))
        with monkeypatch.context() as m:  # the reference: every column kept and masked
            m.setattr(FlowPolicy, "_drop_masked_columns", staticmethod(lambda inputs, trim_prompt=True: inputs))
            ref_prefix, *refs = run(inputs)
        assert ref_prefix.pad_mask.shape[1] == full_length
        for out, ref in zip(outputs, refs):
            torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    assert run(short)[0].pad_mask.shape[1] == full_length - cfg.max_token_len + PROMPT_BUCKET
    # Negative controls: the camera the batch lacks and the prompt's later tokens did reach the actions.
    assert (run(per_row)[1] - run(everywhere)[1])[:2].abs().max() > 1e-4
    assert (run(per_row)[1] - run(short)[1]).abs().max() > 1e-4


def test_actions_equal_transformers_pi0_reference():
    """Same weights and initial noise as transformers' independent PI0 -> the same action chunk."""
    cfg = tiny("pi0")
    reference = hf_pi0(cfg, seed=5)
    policy = FlowPolicy(cfg).eval()
    state = {canonical_name(k): v for k, v in reference.state_dict().items()}
    missing = policy.load_state_dict({k: v for k, v in state.items() if k in policy.state_dict()}, strict=True)
    assert not missing.missing_keys
    inputs = random_inputs(policy, 3, seed=5)
    inputs.tokens = inputs.tokens.clamp(max=cfg.vocab_size - 2)  # the last id is the image placeholder
    inputs.image_masks[:] = True
    noise = torch.randn(3, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(5))
    ours = policy.sample_actions(inputs, noise=noise.clone())
    with torch.no_grad():
        theirs = reference.sample_actions(noise=noise.clone(), **hf_inputs(cfg, inputs))
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    assert ours.abs().mean() > 0.1  # a non-trivial output
    # The last camera absent from every row (pirl drops it before SigLIP; transformers masks its tokens).
    inputs.image_masks[:, -1] = False
    ours_absent = policy.sample_actions(inputs, noise=noise.clone())
    with torch.no_grad():
        theirs_absent = reference.sample_actions(noise=noise.clone(), **hf_inputs(cfg, inputs))
    torch.testing.assert_close(ours_absent, theirs_absent, atol=1e-5, rtol=0)
    assert (ours_absent - ours).abs().max() > 1e-3  # the camera did matter


def _openpi_reference_layout(variant: str) -> dict[str, tuple[int, ...]]:
    """openpi's parameter names/shapes, from transformers' full-size PI0 and its published renaming.

    transformers maps openpi/LeRobot files onto its PI0 with: paligemma_with_expert.paligemma.model ->
    model.vlm, paligemma_with_expert.gemma_expert.model -> model.dit, action/state projections ->
    embed_action_time.*; its SigLIP drops openpi's `vision_model` level. Invert that here. π0.5 (not in
    transformers) differs from π0 exactly as openpi's PI0Pytorch does: no state_proj / action_time_mlp,
    a time MLP, and every expert norm becomes adaRMS (`dense`: width -> 3 * width).
    """
    from transformers import PI0Config, PI0ForConditionalGeneration

    with torch.device("meta"):
        ref = PI0ForConditionalGeneration(PI0Config())
    layout = {}
    for name, p in ref.state_dict().items():
        if name == "model.dit.embed_tokens.weight":
            continue  # openpi removes the expert's token table
        name = name.replace("model.vlm.vision_tower.", "model.vlm.vision_tower.vision_model.")
        name = name.replace("model.vlm.", "paligemma_with_expert.paligemma.model.")
        name = name.replace("model.dit.", "paligemma_with_expert.gemma_expert.model.")
        name = name.replace("embed_action_time.", "")
        layout[name] = tuple(p.shape)
    if variant == "pi05":
        width = layout["action_in_proj.weight"][0]
        for k in [k for k in layout if k.startswith(("state_proj", "action_time_mlp"))]:
            del layout[k]
        for k in ("time_mlp_in", "time_mlp_out"):
            layout[f"{k}.weight"], layout[f"{k}.bias"] = (width, width), (width,)
        for k in [k for k in layout if ".gemma_expert." in k and k.endswith("norm.weight")]:
            del layout[k]
            base = k[: -len(".weight")]
            layout[f"{base}.dense.weight"], layout[f"{base}.dense.bias"] = (3 * width, width), (3 * width,)
    return layout


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_size_configs_match_the_openpi_layout(variant):
    cfg = get_config(variant)
    with torch.device("meta"):
        policy = FlowPolicy(cfg)
    ours = {k: tuple(v.shape) for k, v in policy.state_dict().items()}
    expected = _openpi_reference_layout(variant)
    assert sorted(set(ours) - set(expected)) == []
    assert sorted(set(expected) - set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}
    n_params = sum(p.numel() for p in policy.parameters())
    # π0 is ~3.3B parameters (PaliGemma 2.9B incl. the 257k-token table, expert ~0.3B).
    assert 3.1e9 < n_params < 3.6e9, n_params


def test_sft_loss_decreases_on_a_small_dataset():
    """A few Adam steps on 8 fixed (observation, chunk) pairs cut the flow-matching loss clearly."""
    policy = tiny_policy(6).train()
    inputs = random_inputs(policy, 8, seed=6)
    g = torch.Generator().manual_seed(6)
    h, d = policy.config.action_horizon, policy.config.action_dim
    # Actions depend on the state, so the model must read its inputs to fit them.
    actions = torch.tanh(inputs.state[:, None, :] * torch.linspace(0.5, 1.5, h)[None, :, None])
    dim_mask = torch.arange(d) < d - 1  # the last dim is padding
    fixed_noise = torch.randn(8, h, d, generator=g)
    fixed_t = torch.rand(8, generator=g) * 0.9 + 0.05

    def evaluate():
        with torch.no_grad():
            return policy.flow_matching_loss(inputs, actions, dim_mask, noise=fixed_noise, t=fixed_t).item()

    before = evaluate()
    opt = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(40):
        loss = policy.flow_matching_loss(inputs, actions, dim_mask, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = evaluate()
    assert after < 0.5 * before, (before, after)


def test_loss_ignores_padded_dims_and_steps():
    """The masked MSE sees only real dims and in-episode steps, and averages over exactly those."""
    g = torch.Generator().manual_seed(7)
    v, u = torch.randn(2, 6, 4, generator=g), torch.randn(2, 6, 4, generator=g)
    dim_mask = torch.tensor([True, True, True, False])
    step_mask = torch.ones(2, 6, dtype=torch.bool)
    step_mask[1, 4:] = False
    base = masked_velocity_mse(v, u, dim_mask, step_mask)
    expected = ((v - u) ** 2)[:, :, :3][step_mask].mean()
    torch.testing.assert_close(base, expected)
    v2 = v.clone()
    v2[:, :, 3] = 100.0  # padded dim
    v2[1, 4:] = -100.0  # steps past the episode end
    torch.testing.assert_close(masked_velocity_mse(v2, u, dim_mask, step_mask), base)
    # Through the model: padding the targets' dims does not move the loss when x_t is unchanged.
    policy = tiny_policy(7)
    inputs = random_inputs(policy, 2, seed=7)
    h, d = policy.config.action_horizon, policy.config.action_dim
    out, _ = policy.forward_joint(inputs, torch.randn(2, h, d, generator=g), torch.tensor([0.3, 0.6]))
    target = torch.randn(2, h, d, generator=g)
    mask = torch.arange(d) < d - 2
    moved = target.clone()
    moved[..., d - 2 :] += 50.0
    torch.testing.assert_close(
        masked_velocity_mse(out.velocity, target, mask), masked_velocity_mse(out.velocity, moved, mask)
    )


def test_time_distribution_is_beta_1p5_1():
    policy = tiny_policy(0)
    t = policy.sample_time(200_000, torch.Generator().manual_seed(0))
    assert t.min() >= 0.001 and t.max() <= 1.0
    # Beta(1.5, 1): mean a/(a+b) = 0.6, var ab/((a+b)^2 (a+b+1)) = 1.5/21.875; mapped by 0.999 u + 0.001.
    assert abs(t.mean().item() - (0.6 * 0.999 + 0.001)) < 3e-3
    assert abs(t.var().item() - 1.5 / 21.875 * 0.999**2) < 2e-3


def test_euler_sampling_is_deterministic_given_noise():
    policy = tiny_policy(8)
    inputs = random_inputs(policy, 2, seed=8)
    noise = torch.randn(2, policy.config.action_horizon, policy.config.action_dim)
    a = policy.sample_actions(inputs, noise=noise)
    b = policy.sample_actions(inputs, noise=noise)
    assert torch.equal(a, b)
    # One step from t=1 is exactly x - v(x, 1).
    prefix = policy.embed_prefix(inputs)
    one = policy.sample_actions(inputs, noise=noise, num_steps=1)
    torch.testing.assert_close(one, noise - policy.velocity(prefix, noise, torch.ones(2)), atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_keeps_norms_in_float32_and_stays_close(variant):
    policy = tiny_policy(9, variant)
    inputs = random_inputs(policy, 2, seed=9)
    noise = torch.randn(2, policy.config.action_horizon, policy.config.action_dim)
    full = policy.sample_actions(inputs, noise=noise)
    mixed = copy.deepcopy(policy).to_mixed_precision(torch.bfloat16)
    dtypes = {name: p.dtype for name, p in mixed.named_parameters()}
    gemma_norms = [n for n in dtypes if "layernorm" in n and "vision" not in n or ".model.norm." in n]
    assert len(gemma_norms) >= 4 * policy.config.vlm.depth
    assert all(dtypes[n] == torch.float32 for n in gemma_norms)
    assert dtypes["action_in_proj.weight"] == torch.bfloat16
    assert dtypes["paligemma_with_expert.gemma_expert.model.layers.0.mlp.up_proj.weight"] == torch.bfloat16
    low = mixed.sample_actions(inputs, noise=noise)
    assert low.dtype == torch.float32
    assert (low - full).abs().mean() < 0.05 * full.abs().mean() + 0.02


def test_bad_inputs_fail_clearly():
    policy = tiny_policy(0)
    inputs = random_inputs(policy, 2)
    prefix = policy.embed_prefix(inputs)
    h, d = policy.config.action_horizon, policy.config.action_dim
    with pytest.raises(ValueError, match="x_t: expected shape"):
        policy.velocity(prefix, torch.randn(2, h, d + 1), torch.ones(2))
    with pytest.raises(ValueError, match="t: expected"):
        policy.velocity(prefix, torch.randn(2, h, d), torch.ones(3))
    wrong = copy.copy(inputs)
    wrong.images = inputs.images[:, :1]
    with pytest.raises(ValueError, match="ModelInputs.images"):
        policy.embed_prefix(wrong)
    with pytest.raises(ValueError, match="noise: expected shape"):
        policy.sample_actions(inputs, noise=torch.randn(2, h + 1, d))


def test_configs_are_typed_and_strict():
    cfg = from_dict(ModelConfig, {"variant": "pi05", "expert": {"width": 512}, "camera_names": ["a"]})
    assert cfg.expert.width == 512 and cfg.expert.depth == 18 and cfg.camera_names == ("a",)
    with pytest.raises(KeyError, match="unknown config key"):
        from_dict(ModelConfig, {"action_horizen": 10})
    with pytest.raises(KeyError, match=r"in expert\."):
        from_dict(ModelConfig, {"expert": {"widht": 3}})
    with pytest.raises(ValueError, match="shared attention"):
        ModelConfig(expert=tiny().expert)
    assert ModelConfig.from_dict(get_config("pi05").to_dict()) == get_config("pi05")


@pytest.mark.parametrize("name", ["tiny", "tiny_pi05", "pi0", "pi05"])
def test_model_yaml_configs_equal_the_presets(name):
    from pathlib import Path

    from vla.config import load_yaml

    path = Path(__file__).resolve().parents[1] / "configs" / "model" / f"{name}.yaml"
    assert load_yaml(str(path)) == get_config(name)
