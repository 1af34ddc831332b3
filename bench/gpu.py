"""GPU benchmark at the published π0 / π0.5 sizes: chunk latency against the FLOP floor, PPO minibatch steps.

    python bench/gpu.py --out bench/results/gpu            # on a GPU (bf16, random weights)
    python bench/gpu.py --dry-run --out /tmp/gpu           # CPU plumbing check: tiny configs, fp32

Parts (each one is measured independently; a failing part is reported in one line and the rest still run):

- `matmul`: the GPU's achieved bf16 matrix-product rate (8192^3), the practical ceiling beside the spec peak.
- `latency`: one action chunk (prefix once + K expert steps, the rollout path) for π0 and π0.5 at batch
  1 / 8 / 32 and K = 10; FLOPs counted by torch's FlopCounterMode on the same call, so the floor is
  FLOPs / peak; plus the prefix-only time and, at batch 8, the "recompute the prefix at every step"
  variant (the prefix cache's speedup at real shapes).
- `transformers`: pirl against transformers' independent `PI0` on the same weights, inputs and noise
  (latency ratio and max action difference), π0 at batch 1 and 8.
- `ppo`: one PPO optimizer step (prefix + hybrid Flow-SDE recompute of the one stochastic step + value
  head, backward, AdamW) at minibatch 32 and 128 with the VLM frozen (πRL's setting); at 32 also all
  denoising steps stochastic and the VLM trainable, for the ratios.

Models are random-init, built directly on the device and cast with `FlowPolicy.to_mixed_precision`
(weights bf16, norms fp32). The optimizer here is torch AdamW on those bf16 weights; DeepSpeed's bf16
mode keeps fp32 master weights too (+12 bytes per trainable parameter, reported as
`deepspeed_master_extra_gb`). Writes OUT.json and OUT.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from pirl.algos.config import PPOConfig, ValueLossConfig  # noqa: E402
from pirl.flow.grid import DenoiseGrid  # noqa: E402
from pirl.flow.likelihood import reduce_chain_log_prob  # noqa: E402
from pirl.flow.policy import sample_chain  # noqa: E402
from pirl.train.common import set_trainable  # noqa: E402
from pirl.train.rl_core import Agent, LocalLearner, OptimConfig, PPOMinibatch, SamplerConfig, mask_exec, ppo_loss  # noqa: E402
from vla.config import get_config  # noqa: E402
from vla.policy import FlowPolicy  # noqa: E402
from vla.testing import LIBERO_PROMPT_TOKENS, libero_layout, random_inputs, third_camera_absent  # noqa: E402

# Dense bf16 tensor-core peak from the vendors' datasheets (SXM parts), TFLOP/s.
SPEC_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "B200": 2250.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def peak_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """Fused attention with grouped KV heads (torch's own formula asserts equal head counts):
    QK^T and attention x V, 2 FLOPs per multiply-add, for every query head."""
    b, heads, lq, d = query_shape
    lk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * heads * lq * lk * (d + dv)


_FUSED_ATTENTION_OPS = [getattr(torch.ops.aten, name) for name in (
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)]


def count_flops(fn) -> int:
    with FlopCounterMode(display=False, custom_mapping={op: _attention_flops for op in _FUSED_ATTENTION_OPS}) as counter:
        fn()
    return int(counter.get_total_flops())


def build_policy(name: str, device: torch.device, dtype: str) -> FlowPolicy:
    torch.manual_seed(0)
    with device:
        policy = FlowPolicy(get_config(name))
    if dtype == "bf16":
        policy.to_mixed_precision(torch.bfloat16)
    return policy.eval()


@torch.no_grad()
def sample_recompute(policy: FlowPolicy, inputs, noise: torch.Tensor, steps: int) -> torch.Tensor:
    """K Euler steps, each a joint prefix + suffix forward (a policy without a prefix cache)."""
    x, b = noise, noise.shape[0]
    for k in range(steps):
        t_now, t_next = 1.0 - k / steps, 1.0 - (k + 1) / steps
        out, _ = policy.forward_joint(inputs, x, torch.full((b,), t_now, device=x.device))
        x = x - (t_now - t_next) * out.velocity
    return x


def part_matmul(device: torch.device, dry: bool) -> dict:
    n = 512 if dry else 8192
    dtype = torch.float32 if dry else torch.bfloat16
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = median_ms(lambda: a @ b, device, repeats=10, warmup=3)
    return {"n": n, "dtype": str(dtype), "ms": ms, "tflops": 2 * n**3 / (ms * 1e-3) / 1e12}


def graph_recorder(device: torch.device):
    """CUDA graphs on a GPU; on the CPU (dry run) `EagerRecorder`, which checks the plumbing around them."""
    from vla.graphs import EagerRecorder

    return None if device.type == "cuda" else EagerRecorder


def part_latency(name: str, device: torch.device, dtype: str, batches: list[int], steps: int, repeats: int,
                 peak_tflops: float | None, recompute_batch: int) -> list[dict]:
    policy = build_policy(name, device, dtype)
    cfg = policy.config
    rows = []
    for b in batches:
        inputs = random_inputs(policy, b, pad_tokens=False).to(device)
        noise = torch.randn(b, cfg.action_horizon, cfg.action_dim, device=device)
        chunk = lambda: policy.sample_actions(inputs, noise=noise, num_steps=steps)  # noqa: E731
        prefix_only = lambda: policy.embed_prefix(inputs)  # noqa: E731
        reset_peak(device)
        with torch.no_grad():
            ms = median_ms(chunk, device, repeats)
            prefix_ms = median_ms(prefix_only, device, repeats)
            flops = count_flops(chunk)
            prefix_tokens = int(prefix_only().pad_mask.shape[1])
        row = {
            "config": name, "dtype": dtype, "batch": b, "K": steps, "prefix_tokens": prefix_tokens,
            "chunk_ms": ms, "prefix_ms": prefix_ms, "expert_step_ms": (ms - prefix_ms) / steps,
            "gflops_per_chunk": flops / 1e9, "peak_memory_mb": peak_mb(device),
        }
        if peak_tflops:
            row["floor_ms"] = flops / (peak_tflops * 1e12) * 1e3
            row["ratio_to_floor"] = ms / row["floor_ms"]
        # the LIBERO layout, eager: the third camera and the prompt's unused columns dropped before the VLM
        libero = libero_layout(inputs, LIBERO_PROMPT_TOKENS.get(name, 8))
        with torch.no_grad():
            row["libero_prefix_tokens"] = int(policy.embed_prefix(libero, hidden=False).pad_mask.shape[1])
            row["libero_chunk_ms"] = median_ms(lambda: policy.sample_actions(libero, noise=noise, num_steps=steps),
                                               device, repeats)
        # the same chunk replayed from CUDA graphs (`FlowPolicy.use_cuda_graphs`): first call = capture
        with torch.no_grad():
            eager_actions = chunk()
            policy.use_cuda_graphs(recorder_factory=graph_recorder(device))
            reset_peak(device)
            sync(device)
            start = time.perf_counter()
            graphed_actions = chunk()
            sync(device)
            row["graphs_capture_ms"] = 1e3 * (time.perf_counter() - start)
            row["graphs_chunk_ms"] = median_ms(chunk, device, repeats)
            row["graphs_prefix_ms"] = median_ms(prefix_only, device, repeats)
            row["graphs_max_diff"] = (graphed_actions.float() - eager_actions.float()).abs().max().item()
            row["graphs_peak_memory_mb"] = peak_mb(device)
            policy.use_cuda_graphs(False)
        row["graphs_speedup"] = ms / row["graphs_chunk_ms"]
        if peak_tflops:
            row["graphs_ratio_to_floor"] = row["graphs_chunk_ms"] / row["floor_ms"]
        if b == recompute_batch:
            with torch.no_grad():
                row["recompute_ms"] = median_ms(lambda: sample_recompute(policy, inputs, noise, steps), device,
                                                max(3, repeats // 2))
            row["prefix_cache_speedup"] = row["recompute_ms"] / ms
        rows.append(row)
        print(f"  latency {name} b={b}: {ms:.1f} ms/chunk, prefix {prefix_ms:.1f} ms, {flops / 1e9:.0f} GFLOP"
              + (f", {row['ratio_to_floor']:.1f}x floor" if peak_tflops else "")
              + f"; CUDA graphs {row['graphs_chunk_ms']:.1f} ms/chunk ({row['graphs_speedup']:.2f}x), "
              f"max diff {row['graphs_max_diff']:.1e}", flush=True)
    del policy
    return rows


def part_transformers(name: str, device: torch.device, dtype: str, batches: list[int], steps: int,
                      repeats: int) -> list[dict]:
    """pirl against transformers' independent PI0 on the same weights, inputs and noise (π0 only)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.hf_reference import hf_inputs, hf_pi0
    from vla.checkpoint import canonical_name

    cfg = get_config(name)
    with device:
        reference = hf_pi0(cfg, seed=0)
        policy = FlowPolicy(cfg)
    state = {canonical_name(k): v for k, v in reference.state_dict().items()}
    policy.load_state_dict({k: v for k, v in state.items() if k in policy.state_dict()}, strict=True)
    if dtype == "bf16":
        policy.to_mixed_precision(torch.bfloat16)
        reference.to(torch.bfloat16)
    policy.eval(), reference.eval()
    rows = []
    # every camera present at each batch size; then openpi's π0 LIBERO inputs (the third camera
    # absent, which pirl drops before SigLIP) at the smallest
    for b, cameras in [(b, "all") for b in batches] + [(batches[0], "third absent")]:
        inputs = random_inputs(policy, b, pad_tokens=False)
        inputs.tokens = inputs.tokens.clamp(max=cfg.vocab_size - 2)  # the last id is the image placeholder
        inputs.image_masks[:] = True
        if cameras != "all":
            inputs = third_camera_absent(inputs)
        hf_kwargs = {k: v.to(device=device, dtype=torch.bfloat16 if dtype == "bf16" and v.is_floating_point() else v.dtype)
                     for k, v in hf_inputs(cfg, inputs).items()}
        inputs = inputs.to(device)
        noise = torch.randn(b, cfg.action_horizon, cfg.action_dim, device=device)
        ours_fn = lambda: policy.sample_actions(inputs, noise=noise, num_steps=steps)  # noqa: E731
        theirs_fn = lambda: reference.sample_actions(noise=noise.to(hf_kwargs["pixel_values"].dtype), num_steps=steps, **hf_kwargs)  # noqa: E731
        with torch.no_grad():
            diff = (ours_fn().float() - theirs_fn().float()).abs().max().item()
            policy.use_cuda_graphs(recorder_factory=graph_recorder(device))
            graphs, policy.graphs = policy.graphs, None
            ours, theirs, ours_graphed = [], [], []
            for _ in range(repeats):  # interleaved, so clock changes hit all alike
                ours.append(median_ms(ours_fn, device, 1, warmup=0 if ours else 2))
                theirs.append(median_ms(theirs_fn, device, 1, warmup=0 if theirs else 2))
                policy.graphs = graphs
                ours_graphed.append(median_ms(ours_fn, device, 1, warmup=0 if ours_graphed else 2))
                policy.graphs = None
        row = {"config": name, "dtype": dtype, "batch": b, "cameras": cameras, "K": steps, "pirl_ms": statistics.median(ours),
               "transformers_ms": statistics.median(theirs), "max_action_diff": diff,
               "pirl_graphs_ms": statistics.median(ours_graphed)}
        row["latency_ratio"] = row["pirl_ms"] / row["transformers_ms"]
        row["graphs_latency_ratio"] = row["pirl_graphs_ms"] / row["transformers_ms"]
        rows.append(row)
        print(f"  transformers PI0 {name} b={b} cameras {cameras}: pirl {row['pirl_ms']:.1f} ms, transformers "
              f"{row['transformers_ms']:.1f} ms ({row['latency_ratio']:.2f}x), pirl with CUDA graphs "
              f"{row['pirl_graphs_ms']:.1f} ms ({row['graphs_latency_ratio']:.2f}x), max diff {diff:.2e}", flush=True)
    return rows


def part_profile(name: str, device: torch.device, dtype: str, steps: int, out: Path) -> dict:
    """torch.profiler over one batch-1 chunk: where the time goes when the GPU is far from its floor."""
    from torch.profiler import ProfilerActivity, profile

    policy = build_policy(name, device, dtype)
    cfg = policy.config
    inputs = random_inputs(policy, 1, pad_tokens=False).to(device)
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, device=device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        for _ in range(2):
            policy.sample_actions(inputs, noise=noise, num_steps=steps)
        sync(device)
        with profile(activities=activities) as prof:
            policy.sample_actions(inputs, noise=noise, num_steps=steps)
            sync(device)
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table_cpu = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)
    table_dev = prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60)
    text = f"== by self CPU time\n{table_cpu}\n== by {sort}\n{table_dev}\n"
    out.with_suffix(".profile.txt").write_text(text)
    print(text, flush=True)
    events = prof.key_averages()
    return {"ops": len(events), "cuda_launches": sum(e.count for e in events if "cudaLaunchKernel" in e.key),
            "syncs": sum(e.count for e in events if "Synchronize" in e.key),
            "memcpy": sum(e.count for e in events if "Memcpy" in e.key)}


def part_guidance(name: str, device: torch.device, dtype: str, batch: int, steps: int, repeats: int) -> list[dict]:
    """Every guided sampler of `pirl.guidance` on a bf16 policy with a known differentiable Q
    (a quadratic around a target chunk on the executed steps): runs, stays finite, raises Q, and costs
    what it costs per chunk relative to plain ODE sampling."""
    from pirl.guidance import GuidanceConfig, guided_sample

    policy = build_policy(name, device, dtype)
    cfg = policy.config
    inputs = random_inputs(policy, batch).to(device)
    target = torch.full((cfg.action_horizon, cfg.action_dim), 0.5, device=device)

    def q_fn(actions: torch.Tensor) -> torch.Tensor:
        return -((actions[:, :10, :7].float() - target[:10, :7]) ** 2).sum((1, 2))

    methods = [GuidanceConfig(), GuidanceConfig("qgf", weight=0.5, clip=None),
               GuidanceConfig("qgf_jacobian", weight=0.5, clip=None), GuidanceConfig("ood", weight=0.5),
               GuidanceConfig("bptt", weight=0.5), GuidanceConfig("gradstep", gradstep_size=0.05),
               GuidanceConfig("best_of_n", n=4), GuidanceConfig("qgf_best_of_n", weight=0.5, n=4, clip=None)]
    rows, base_ms = [], None
    with torch.no_grad():
        prefix = policy.embed_prefix(inputs)
    for g in methods:
        gen = torch.Generator(device=device).manual_seed(0)
        noise_shape = (g.num_candidates, batch) if g.method in ("best_of_n", "qgf_best_of_n") else (batch,)
        noise = torch.randn(*noise_shape, cfg.action_horizon, cfg.action_dim, device=device, generator=gen)
        run = lambda: guided_sample(policy, prefix, q_fn if g.method != "none" else None, g,  # noqa: E731
                                    grid=DenoiseGrid.uniform(steps), noise=noise)
        with torch.no_grad():
            out = run()
            ms = median_ms(run, device, repeats, warmup=1)
        base_ms = base_ms or ms
        q = q_fn(out.actions)
        rows.append({"config": name, "dtype": dtype, "batch": batch, "K": steps, "method": g.method,
                     "weight": g.weight, "n": g.num_candidates, "ms": ms, "x_plain": ms / base_ms,
                     "mean_q": float(q.mean()), "finite": bool(torch.isfinite(out.actions).all()),
                     **out.stats.per_chunk()})
        print(f"  guidance {g.method}: {ms:.1f} ms ({ms / base_ms:.2f}x plain), mean Q {float(q.mean()):.2f}", flush=True)
    # real-time chunking (docs/serve.md): the same expert backward per step, pulled onto an old plan that holds
    # the target chunk on its first H - 5 steps, 2 of them committed
    from pirl.guidance import Inpainting, inpaint_weights, inpainted_sample

    overlap = cfg.action_horizon - 5
    weights = inpaint_weights(cfg.action_horizon, 2, overlap).to(device)[None, :, None].expand(batch, -1, cfg.action_dim)
    inpainting = Inpainting(target.expand(batch, -1, -1), weights.contiguous(), torch.full((batch,), 5.0, device=device))
    noise = torch.randn(batch, cfg.action_horizon, cfg.action_dim, device=device,
                        generator=torch.Generator(device=device).manual_seed(0))
    run = lambda: inpainted_sample(policy, prefix, noise, inpainting, grid=DenoiseGrid.uniform(steps))  # noqa: E731
    with torch.no_grad():
        out = run()
        ms = median_ms(run, device, repeats, warmup=1)
    q = q_fn(out.actions)
    rows.append({"config": name, "dtype": dtype, "batch": batch, "K": steps, "method": "inpaint (RTC, beta 5)",
                 "weight": None, "n": 1, "ms": ms, "x_plain": ms / base_ms, "mean_q": float(q.mean()),
                 "finite": bool(torch.isfinite(out.actions).all()), **out.stats.per_chunk()})
    print(f"  real-time chunking: {ms:.1f} ms ({ms / base_ms:.2f}x plain)", flush=True)
    return rows


def make_minibatch(agent: Agent, sampler: SamplerConfig, size: int, n_exec: int, real_dims: int,
                   device: torch.device) -> PPOMinibatch:
    """A minibatch as a rollout would store it: chains sampled by the same agent, random advantages."""
    policy, cfg = agent.policy, agent.policy.config
    g = torch.Generator(device=device).manual_seed(0)
    inputs = random_inputs(policy, size).to(device)
    m_exec = mask_exec(cfg.action_horizon, n_exec).to(device)
    m_dims = (torch.arange(cfg.action_dim) < real_dims).to(device)
    with torch.no_grad():
        chain = sample_chain(policy, prefix=policy.embed_prefix(inputs), rule=agent.rule(sampler),
                             grid=DenoiseGrid.uniform(sampler.num_steps), step_mask=sampler.mask, generator=g)
    old = reduce_chain_log_prob(chain, sampler.reduction, mask_exec=m_exec, mask_dims=m_dims)
    return PPOMinibatch(inputs=inputs, chain=chain, old_log_probs=old,
                        advantages=torch.randn(size, device=device, generator=g),
                        returns=torch.randn(size, device=device, generator=g),
                        old_values=torch.zeros(size, device=device), valid=torch.ones(size, device=device),
                        mask_exec=m_exec, mask_dims=m_dims)


def part_ppo(name: str, device: torch.device, dtype: str, cases: list[tuple[int, str, str]], steps: int,
             repeats: int) -> list[dict]:
    """cases: (minibatch size, trainable "expert"/"all", sampler mask "hybrid"/"all")."""
    rows = []
    for size, trainable, mask in cases:
        policy = build_policy(name, device, dtype)
        n_train = sum(p.numel() for p in set_trainable(policy, trainable))
        sampler = SamplerConfig(num_steps=steps, mask=mask)
        agent = Agent.build(policy, sampler).to(device)
        params = [p for p in agent.parameters() if p.requires_grad]
        learner = LocalLearner(agent, torch.optim.AdamW(params, lr=1e-6), max_grad_norm=1.0)
        loss_fn = functools.partial(ppo_loss, sampler=sampler, optim=OptimConfig(), ppo=PPOConfig(),
                                    value_cfg=ValueLossConfig())
        mb = make_minibatch(agent, sampler, size, n_exec=min(10, policy.config.action_horizon), real_dims=7,
                            device=device)
        reset_peak(device)
        ms = median_ms(lambda: learner.train_step(mb, loss_fn), device, repeats, warmup=1)
        row = {"config": name, "dtype": dtype, "minibatch": size, "trainable": trainable, "mask": mask, "K": steps,
               "trainable_params_m": n_train / 1e6, "step_ms": ms, "samples_per_s": size / (ms * 1e-3),
               "peak_memory_mb": peak_mb(device), "deepspeed_master_extra_gb": 12 * n_train / 2**30}
        rows.append(row)
        print(f"  ppo {name} mb={size} trainable={trainable} mask={mask}: {ms:.0f} ms/step"
              + (f", peak {row['peak_memory_mb']:.0f} MB" if row["peak_memory_mb"] else ""), flush=True)
        del learner, agent, policy, mb
    return rows


def run_part(results: dict, key: str, fn) -> None:
    start = time.perf_counter()
    try:
        results[key] = fn()
    except Exception as err:  # a benchmark part must not take the others down with it
        results[key] = {"error": f"{type(err).__name__}: {err}"}
        print(f"  {key}: FAILED: {type(err).__name__}: {err}", flush=True)
        if os.environ.get("PIRL_DEBUG") or results.get("dry_run"):
            traceback.print_exc()
    results.setdefault("part_seconds", {})[key] = time.perf_counter() - start
    reset_peak(results["_device"])


def fmt(x, spec=".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(lines: list[str], rows, title: str, header: list[str], cells) -> None:
    """Appends a markdown table of `rows` (a part's result list), or the part's error in one line."""
    if isinstance(rows, list):
        lines += [title, "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in cells(x)) + " |" for x in rows] + [""]
    elif rows:
        lines += [f"{title} FAILED: {rows}", ""]


def to_markdown(r: dict) -> str:
    lines = [f"GPU benchmark on {r['device_name']} (torch {r['torch']}, spec bf16 peak "
             f"{fmt(r['spec_peak_tflops'], '.0f')} TFLOP/s).", ""]
    mm = r.get("matmul", {})
    if "tflops" in mm:
        lines += [f"Achieved matrix product ({mm['n']}^3, {mm['dtype']}): {mm['tflops']:.0f} TFLOP/s.", ""]
    for key, title in (("latency_pi0", "π0"), ("latency_pi05", "π0.5")):
        rows = r.get(key)
        if not isinstance(rows, list):
            lines += [f"{title} latency: {rows}", ""] if rows else []
            continue
        lines += [f"Chunk latency, {title} ({rows[0]['dtype']}, K = {rows[0]['K']}, {rows[0]['prefix_tokens']} prefix tokens): "
                  "prefix once + K expert steps; "
                  "floor = counted FLOPs / spec peak.", "",
                  "| batch | chunk (ms) | prefix (ms) | per expert step (ms) | GFLOP/chunk | floor (ms) | x floor "
                  "| recompute prefix each step (ms) | cache speedup | peak memory (MB) |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            lines.append(f"| {row['batch']} | {row['chunk_ms']:.1f} | {row['prefix_ms']:.1f} | {row['expert_step_ms']:.2f} "
                         f"| {row['gflops_per_chunk']:.0f} | {fmt(row.get('floor_ms'), '.2f')} "
                         f"| {fmt(row.get('ratio_to_floor'))} | {fmt(row.get('recompute_ms'))} "
                         f"| {fmt(row.get('prefix_cache_speedup'), '.2f')} | {fmt(row['peak_memory_mb'], '.0f')} |")
        lines.append("")
        if "libero_chunk_ms" in rows[0]:
            lines += ["The LIBERO layout, eager (the third camera absent and a LIBERO-length prompt, both dropped "
                      "before the VLM; `FlowPolicy._drop_masked_columns`):", "",
                      "| batch | prefix tokens | chunk (ms) | of the all-camera, full-prompt chunk |", "|---|---|---|---|"]
            for row in rows:
                lines.append(f"| {row['batch']} | {row['libero_prefix_tokens']} | {row['libero_chunk_ms']:.1f} "
                             f"| {row['libero_chunk_ms'] / row['chunk_ms']:.2f}x |")
            lines.append("")
        if "graphs_chunk_ms" in rows[0]:
            lines += [f"The same chunks replayed from CUDA graphs (`FlowPolicy.use_cuda_graphs`: the prefix pass and "
                      "the expert step, one graph each per batch size; actions against the eager chunk's):", "",
                      "| batch | eager chunk (ms) | graphed chunk (ms) | speedup | graphed prefix (ms) | x floor "
                      "| capture, first chunk (ms) | max action diff | peak memory (MB) |",
                      "|---|---|---|---|---|---|---|---|---|"]
            for row in rows:
                lines.append(f"| {row['batch']} | {row['chunk_ms']:.1f} | {row['graphs_chunk_ms']:.1f} "
                             f"| {row['graphs_speedup']:.2f} | {row['graphs_prefix_ms']:.1f} "
                             f"| {fmt(row.get('graphs_ratio_to_floor'))} | {row['graphs_capture_ms']:.0f} "
                             f"| {row['graphs_max_diff']:.1e} | {fmt(row['graphs_peak_memory_mb'], '.0f')} |")
            lines.append("")
    table(lines, r.get("transformers_pi0"), "pirl against transformers' PI0 (same weights, inputs and noise; chunk "
          "latency; the three timed alternately):",
          ["config", "dtype", "batch", "cameras", "K", "pirl (ms)", "transformers (ms)", "ratio",
           "pirl, CUDA graphs (ms)", "ratio", "max action diff"],
          lambda x: [x["config"], x["dtype"], x["batch"], x.get("cameras", "all"), x["K"], f"{x['pirl_ms']:.1f}", f"{x['transformers_ms']:.1f}",
                     f"{x['latency_ratio']:.2f}", fmt(x.get("pirl_graphs_ms")), fmt(x.get("graphs_latency_ratio"), ".2f"),
                     f"{x['max_action_diff']:.1e}"])
    table(lines, r.get("guidance"), "Guided sampling (`pirl.guidance`) with a known quadratic Q, per chunk of the batch:",
          ["config", "batch", "K", "method", "w", "N", "ms", "x plain", "mean Q", "finite"],
          lambda x: [x["config"], x["batch"], x["K"], x["method"], x["weight"], x["n"], f"{x['ms']:.1f}",
                     f"{x['x_plain']:.2f}", f"{x['mean_q']:.2f}", x["finite"]])
    table(lines, r.get("ppo"), "One PPO optimizer step (prefix, chain log-prob recompute, value head, backward, AdamW):",
          ["config", "minibatch", "trainable (M params)", "stochastic steps", "step (ms)", "samples/s",
           "peak memory (MB)", "+ DeepSpeed fp32 master (GB)"],
          lambda x: [x["config"], x["minibatch"], f"{x['trainable']} ({x['trainable_params_m']:.0f})",
                     f"{x['mask']} of K={x['K']}", f"{x['step_ms']:.0f}", f"{x['samples_per_s']:.1f}",
                     fmt(x["peak_memory_mb"], ".0f"), f"{x['deepspeed_master_extra_gb']:.1f}"])
    lines.append("Seconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in r.get("part_seconds", {}).items()))
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "gpu"))
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny configs, fp32: checks the plumbing")
    parser.add_argument("--parts", nargs="+", default=["matmul", "latency", "transformers", "guidance", "ppo"],
                        help="also: profile (torch.profiler over one batch-1 π0 chunk)")
    parser.add_argument("--steps", type=int, default=10, help="K for chunk latency")
    parser.add_argument("--ppo-steps", type=int, default=4, help="K during RL (πRL: 4 for π0)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args(argv)
    dry = args.dry_run
    device = torch.device("cpu" if dry or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not dry:
        raise SystemExit("bench/gpu.py: no CUDA device visible; use --dry-run for the CPU plumbing check")
    torch.set_num_threads(max(1, int(os.environ["OMP_NUM_THREADS"])))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = next((v for k, v in SPEC_PEAK_TFLOPS.items() if k in name), None)
    dtype = "fp32" if dry else "bf16"
    pi0, pi05 = ("tiny", "tiny_pi05") if dry else ("pi0", "pi05")
    batches = [1, 2] if dry else [1, 8, 32]
    repeats = 2 if dry else args.repeats
    results: dict = {"device_name": name, "torch": torch.__version__, "spec_peak_tflops": peak, "dry_run": dry,
                     "_device": device}
    print(f"bench/gpu.py on {name}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def part(key: str, fn) -> None:
        run_part(results, key, fn)
        # written after every part: a run stopped by its time limit keeps what it measured
        saved = {k: v for k, v in results.items() if k != "_device"}
        out.with_suffix(".json").write_text(json.dumps(saved, indent=2, default=str))
        out.with_suffix(".md").write_text(to_markdown(saved))

    if "matmul" in args.parts:
        part("matmul", lambda: part_matmul(device, dry))
    if "latency" in args.parts:
        part("latency_pi0", lambda: part_latency(pi0, device, dtype, batches, args.steps, repeats, peak,
                                                 batches[-1] if dry else 8))
        part("latency_pi05", lambda: part_latency(pi05, device, dtype, batches, args.steps, repeats, peak,
                                                  batches[-1] if dry else 8))
    if "transformers" in args.parts:
        part("transformers_pi0", lambda: part_transformers(pi0, device, dtype, [1, 8] if not dry else [2],
                                                           args.steps, repeats))
    if "guidance" in args.parts:
        part("guidance", lambda: part_guidance(pi0, device, dtype, 2 if dry else 8, args.steps, repeats))
    if "profile" in args.parts:
        part("profile_pi0", lambda: part_profile(pi0, device, dtype, args.steps, Path(args.out)))
    if "ppo" in args.parts:
        cases = [(2, "expert", "hybrid"), (2, "all", "hybrid")] if dry else [
            (32, "expert", "hybrid"), (128, "expert", "hybrid"), (32, "expert", "all"), (32, "all", "hybrid")]
        part("ppo", lambda: part_ppo(pi0, device, dtype, cases, args.ppo_steps, max(3, repeats // 2)))
    results.pop("_device")
    print(to_markdown(results))
    return results


if __name__ == "__main__":
    main()
