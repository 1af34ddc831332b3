"""What real-time chunking changes at each chunk switch, measured on the chunks a prefetching robot would get.

    python bench/inpaint_switch.py [--checkpoint assets/pickcube_tiny_sft_v5_2k] [--prefetch 2 5] [--beta 5 1]

Episodes are played as `pirl eval prefetch_steps=d` plays them, with the plain chunks. At every request the
same observation, noise and old plan also go through the inpainted sampler (`pirl.guidance.inpainted_sample`)
for each beta, without acting on it, so plain and inpainted chunks are compared on identical inputs. Per
switch, in the policy's normalised action units over the real dims (mean absolute difference):

- committed gap: new chunk vs the old plan on the d steps the robot runs from the old chunk anyway;
- switch jump: the new chunk's first executed action vs the old plan's action for that step;
- executed change: the inpainted chunk's executed actions vs the plain chunk's (what the pull costs in
  reactivity).

Writes bench/results/inpaint_switch_<checkpoint name>.{json,md}.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPO))

from bench.report import write_results  # noqa: E402
from pirl.guidance.sampler import Inpainting, inpainted_sample  # noqa: E402
from pirl.train.common import load_bundle  # noqa: E402
from pirl.train.rl import make_env  # noqa: E402
from pirl.train.rl_core import PolicyActor  # noqa: E402
from vla.checkpoint import read_rollout  # noqa: E402


def measure(actor: PolicyActor, env, seeds: list[int], n_exec: int, d: int, betas: list[float]) -> dict:
    policy, processor = actor.policy, actor.processor
    dims = processor.dim_mask()
    pair = torch.tensor([0, 0])  # a lone row as a batch of two, as PolicyActor computes it
    out: dict[str, list[float]] = {}

    def add(key, value):
        out.setdefault(key, []).append(float(value))

    for seed in seeds:
        obs = env.reset(seed)
        actor.reset([seed])
        chunk, first, done = actor(obs), 0, False
        while not done:
            ahead = n_exec - d
            if ahead:
                obs, _, term, trunc, _ = env.step_chunk(chunk[:, first:first + ahead], ahead)
                done = bool(term[0] or trunc[0])
            if done:
                break
            rest = chunk[0, first + ahead:]
            noise = torch.randn(*actor.chunk_shape, generator=actor.generators[0])[None].expand(2, -1, -1)
            inputs = processor(obs).select(pair)
            with torch.no_grad():
                plain = policy.sample_actions(inputs, noise=noise, num_steps=actor.num_steps)[0]
                prefix = policy.embed_prefix(inputs, hidden=False)
                chunks = {"plain": plain}
                for beta in betas:
                    inpainting = Inpainting.from_raw(processor, [rest], [d], [beta]).select(pair)
                    chunks[f"beta {beta:g}"] = inpainted_sample(policy, prefix, noise, inpainting).actions[0]
            target = Inpainting.from_raw(processor, [rest], [d]).target[0]
            for name, new in chunks.items():
                if d:
                    add(f"{name}: committed gap", (new[:d, dims] - target[:d, dims]).abs().mean())
                if d < len(rest):
                    add(f"{name}: switch jump", (new[d, dims] - target[d, dims]).abs().mean())
                if name != "plain":
                    add(f"{name}: executed change", (new[d:d + n_exec, dims] - plain[d:d + n_exec, dims]).abs().mean())
            if d:
                obs, _, term, trunc, _ = env.step_chunk(chunk[:, first + ahead:first + n_exec], d)
                done = bool(term[0] or trunc[0])
            chunk, first = processor.unnormalize_actions(plain[None]), d
    return {k: {"mean": float(np.mean(v)), "median": float(np.median(v)), "switches": len(v)} for k, v in out.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="assets/pickcube_tiny_sft_v5_2k")
    p.add_argument("--prefetch", type=int, nargs="+", default=[2, 5])
    p.add_argument("--beta", type=float, nargs="+", default=[5.0, 1.0])
    p.add_argument("--episodes", type=int, default=6)
    p.add_argument("--seed", type=int, default=10000)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    rollout = read_rollout(args.checkpoint)
    policy, processor = load_bundle(args.checkpoint)
    policy.eval()
    actor = PolicyActor(policy, processor, rollout["num_steps"])
    env_cfg = yaml.safe_load((REPO / "configs" / "env" / "maniskill_pickcube_state.yaml").read_text())
    section = {**env_cfg, **rollout["env"], "envs_per_process": 1}
    seeds = list(range(args.seed, args.seed + args.episodes))
    results = {}
    with make_env(section, 1, args.seed) as env:
        for d in args.prefetch:
            results[d] = measure(actor, env, seeds, rollout["n_exec"], d, args.beta)
    name = Path(args.checkpoint).name
    out = args.out or str(REPO / "bench" / "results" / f"inpaint_switch_{name}")
    meta = {"checkpoint": args.checkpoint, "seeds": [seeds[0], seeds[-1]], "n_exec": rollout["n_exec"],
            "num_steps": rollout["num_steps"], "betas": args.beta}
    lines = ["# Real-time chunking at the chunk switches (`bench/inpaint_switch.py`)\n",
             f"{args.checkpoint}, PickCube, K = {meta['num_steps']}, n_exec = {meta['n_exec']}, test seeds "
             f"{seeds[0]}..{seeds[-1]} played with plain prefetched chunks; at each request the same observation, "
             "noise and old plan also go through the inpainted sampler. Mean absolute difference per switch in "
             "normalised action units over the real dims (median in brackets).\n",
             "| prefetch d | sampler | committed gap | switch jump | executed change vs plain | switches |",
             "|---|---|---|---|---|---|"]
    for d, rows in results.items():
        for sampler in ["plain", *[f"beta {b:g}" for b in args.beta]]:
            def cell(key):
                r = rows.get(f"{sampler}: {key}")
                return f"{r['mean']:.3f} ({r['median']:.3f})" if r else "-"
            count = max((r["switches"] for k, r in rows.items() if k.startswith(sampler)), default=0)
            lines.append(f"| {d} | {sampler if sampler == 'plain' else 'inpaint, ' + sampler} | {cell('committed gap')} | "
                         f"{cell('switch jump')} | {cell('executed change')} | {count} |")
    return write_results(out, {"meta": meta, "results": {str(k): v for k, v in results.items()}}, lines)


if __name__ == "__main__":
    sys.exit(main())
