"""Chunk-sampling latency with the prefix KV cache vs recomputing the prefix at every step.

    python bench/model.py                          # tiny config, CPU (the default used in bench/results)
    python bench/model.py --config pi0 --device cuda --dtype bf16 --batch 8   # on a GPU

Both variants run K Euler steps from the same noise; "recompute" runs the joint prefix+suffix forward at
every step (what a policy without a cache does), "cached" runs the VLM once and only the expert K times.
The ratio is measured in one run. Writes bench/results/model.json and bench/results/model.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from vla.config import get_config  # noqa: E402
from vla.policy import FlowPolicy  # noqa: E402
from vla.testing import random_inputs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


@torch.no_grad()
def sample_recompute(policy: FlowPolicy, inputs, noise: torch.Tensor, steps: int) -> torch.Tensor:
    x = noise
    b = x.shape[0]
    for k in range(steps):
        t_now, t_next = 1.0 - k / steps, 1.0 - (k + 1) / steps
        out, _ = policy.forward_joint(inputs, x, torch.full((b,), t_now, device=x.device))
        x = x - (t_now - t_next) * out.velocity
    return x


def timed(fn, repeats: int, device: torch.device) -> list[float]:
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default=str(RESULTS / "model"))
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    device = torch.device(args.device)
    torch.manual_seed(0)
    with device:
        policy = FlowPolicy(get_config(args.config)).eval()
    if args.dtype == "bf16":
        policy.to_mixed_precision(torch.bfloat16)
    inputs = random_inputs(policy, args.batch).to(device)
    cfg = policy.config
    noise = torch.randn(args.batch, cfg.action_horizon, cfg.action_dim, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    cached_fn = lambda: policy.sample_actions(inputs, noise=noise, num_steps=args.steps)  # noqa: E731
    recompute_fn = lambda: sample_recompute(policy, inputs, noise, args.steps)  # noqa: E731
    # Same result either way (up to float rounding): the benchmark compares equal work.
    max_diff = (cached_fn() - recompute_fn()).abs().max().item()
    cached, recompute = [], []
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        cached += timed(cached_fn, 1, device)
        recompute += timed(recompute_fn, 1, device)
    result = {
        "config": args.config,
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "batch": args.batch,
        "steps": args.steps,
        "params": sum(p.numel() for p in policy.parameters()),
        "cached_ms_median": 1e3 * statistics.median(cached),
        "recompute_ms_median": 1e3 * statistics.median(recompute),
        "speedup_cached_vs_recompute": statistics.median(recompute) / statistics.median(cached),
        "max_abs_diff_cached_vs_recompute": max_diff,
        "peak_memory_mb": (
            torch.cuda.max_memory_allocated(device) / 2**20
            if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process max RSS",
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    rows = [
        "| config | device | dtype | batch | K | cached (ms) | recompute prefix each step (ms) | speedup | peak memory (MB) |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| {result['config']} | {result['device']} | {args.dtype} | {args.batch} | {args.steps} | "
        f"{result['cached_ms_median']:.1f} | {result['recompute_ms_median']:.1f} | "
        f"{result['speedup_cached_vs_recompute']:.2f}x | {result['peak_memory_mb']:.0f} ({result['peak_memory_kind']}) |",
    ]
    out.with_suffix(".md").write_text("\n".join(rows) + "\n")
    print("\n".join(rows))
    return result


if __name__ == "__main__":
    main()
