"""Cost of the flow samplers and of training-time log-prob recomputation (pirl.flow).

Measures, in one run on one policy:
  * sampling (rollout, no grad) per step rule: ODE, Flow-SDE hybrid / all steps, Flow-Noise all steps,
    with the prefix embedded once outside the timed region and reported separately;
  * training recomputation (forward + backward of chain_log_prob) for hybrid vs all-steps Flow-SDE and
    all-steps Flow-Noise, with the prefix given (frozen VLM) and including the prefix forward.
Ratios are taken against the ODE sampler and the hybrid recomputation of the same run.

    python3 bench/flow.py [--model tiny] [--batch 16] [--num-steps 10] [--repeats 7]

Writes bench/results/flow.json and bench/results/flow.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pirl.flow import (  # noqa: E402
    DenoiseGrid,
    LearnedNoiseRule,
    NoiseHead,
    ODERule,
    SDERule,
    chain_log_prob,
    sample_chain,
)
from vla.config import get_config  # noqa: E402
from vla.testing import random_inputs, tiny_policy  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def summary(samples: list[float]) -> dict:
    return {"median_ms": 1e3 * statistics.median(samples), "min_ms": 1e3 * min(samples),
            "max_ms": 1e3 * max(samples), "repeats": len(samples)}


def timed_interleaved(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Time several callables round-robin, so drifts of a shared machine hit all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: summary(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="vla config preset (tiny, tiny_pi05, ...)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--num-steps", type=int, default=10, help="denoising steps K")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    config = get_config(args.model)
    policy = tiny_policy(seed=0, config=config)
    cfg = policy.config
    inputs = random_inputs(policy, args.batch, seed=0)
    grid = DenoiseGrid.uniform(args.num_steps)
    torch.manual_seed(0)
    noise_head = NoiseHead(cfg.action_dim, cfg.expert.width)
    with torch.no_grad():
        prefix = policy.embed_prefix(inputs)

    rules = {
        "ode": (ODERule(), "none"),
        "sde_hybrid": (SDERule(0.5), "hybrid"),
        "sde_all": (SDERule(0.5), "all"),
        "noise_all": (LearnedNoiseRule(noise_head), "all"),
    }
    results: dict = {
        "model": args.model, "batch": args.batch, "num_steps": args.num_steps,
        "action_horizon": cfg.action_horizon, "action_dim": cfg.action_dim, "threads": args.threads,
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }

    def embed():
        with torch.no_grad():
            policy.embed_prefix(inputs)

    samplers = {"prefix_forward": embed}
    for name, (rule, mask) in rules.items():
        generator = torch.Generator().manual_seed(1)

        def run(rule=rule, mask=mask, generator=generator):
            return sample_chain(policy, prefix=prefix, rule=rule, step_mask=mask, grid=grid, generator=generator)

        samplers[name] = run
    timings = timed_interleaved(samplers, args.repeats)
    results["prefix_forward"] = timings.pop("prefix_forward")
    results["sampling"] = timings
    chains = {name: samplers[name]() for name in rules}
    base = results["sampling"]["ode"]["median_ms"]
    for entry in results["sampling"].values():
        entry["ratio_vs_ode"] = entry["median_ms"] / base

    trainable = [p for p in policy.parameters()] + list(noise_head.parameters())
    steps = {}
    for name in ("sde_hybrid", "sde_all", "noise_all"):
        rule, _ = rules[name]
        chain = chains[name]
        for with_prefix in (False, True):

            def step(rule=rule, chain=chain, with_prefix=with_prefix):
                for param in trainable:
                    param.grad = None
                if with_prefix:
                    with torch.no_grad():  # frozen VLM (πRL): the prefix forward, no backward
                        step_prefix = policy.embed_prefix(inputs)
                else:
                    step_prefix = prefix
                out = chain_log_prob(policy, None, chain, rule, prefix=step_prefix)
                (out.log_prob.mean() + 0.005 * out.entropy.mean()).backward()

            steps[f"{name}{'_with_prefix' if with_prefix else ''}"] = step
    results["recompute"] = timed_interleaved(steps, args.repeats)
    for name in ("sde_hybrid", "sde_all", "noise_all"):
        for key in (name, f"{name}_with_prefix"):
            results["recompute"][key]["stochastic_steps_per_sample"] = chains[name].num_stochastic / args.batch
    for with_prefix in ("", "_with_prefix"):
        hybrid = results["recompute"][f"sde_hybrid{with_prefix}"]["median_ms"]
        for name in ("sde_hybrid", "sde_all", "noise_all"):
            entry = results["recompute"][f"{name}{with_prefix}"]
            entry["ratio_vs_hybrid"] = entry["median_ms"] / hybrid

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "flow.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = [
        "# pirl.flow benchmark",
        "",
        f"Model `{args.model}` (H={cfg.action_horizon}, D={cfg.action_dim}), batch {args.batch}, K={args.num_steps}, "
        f"{args.threads} thread(s), torch {torch.__version__}, CPU. Median of {args.repeats} runs. "
        f"Prefix (VLM) forward alone: {results['prefix_forward']['median_ms']:.1f} ms.",
        "",
        "## Sampling (rollout, no grad, prefix given)",
        "",
        "| rule | ms | ratio vs ODE |",
        "|---|---|---|",
    ]
    for name, entry in results["sampling"].items():
        lines.append(f"| {name} | {entry['median_ms']:.1f} | {entry['ratio_vs_ode']:.2f} |")
    lines += [
        "",
        "## Training recomputation (chain_log_prob forward + backward)",
        "",
        "| rule | stochastic steps / sample | ms (prefix given) | ratio vs hybrid | ms (with prefix forward) | ratio vs hybrid |",
        "|---|---|---|---|---|---|",
    ]
    for name in ("sde_hybrid", "sde_all", "noise_all"):
        a, b = results["recompute"][name], results["recompute"][f"{name}_with_prefix"]
        lines.append(f"| {name} | {a['stochastic_steps_per_sample']:.0f} | {a['median_ms']:.1f} | "
                     f"{a['ratio_vs_hybrid']:.2f} | {b['median_ms']:.1f} | {b['ratio_vs_hybrid']:.2f} |")
    (args.out / "flow.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
