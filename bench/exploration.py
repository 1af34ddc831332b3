"""How much the RL sampler explores, in the env's own units, and what it costs the policy's success.

    python bench/exploration.py --checkpoint assets/pickcube_tiny_sft --episodes 64 \
        --settings "a_noise=0.5" "a_noise=0.5,mask_low=-1" "explore_std=0.02,mask_low=-1" "explore_std=0.05:0.05:0.05:0.001:0.001:0.001:0.001,mask_low=-1"

For each sampler setting: rollouts of the stochastic policy on fixed seeds (the first episode of each
env after a reset), their success_once, and the executed action's deviation from its ODE-free mean in
raw units per dim (pd_ee_delta_pose: 1 raw = 0.1 m or 0.1 rad per step), measured from the chains
(the std of the stochastic steps times the action scale; for the last step this is exactly how far the
executed action is moved). Writes bench/results/exploration.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def parse_setting(text: str) -> dict:
    out = {}
    for part in filter(None, text.split(",")):
        key, value = part.split("=", 1)
        if key == "explore_std":  # one value, or one per dim separated by ":"
            out[key] = tuple(float(v) for v in value.split(":"))
        else:
            out[key] = int(value) if key.startswith("mask") else float(value)
    return out


def run(checkpoint: str, setting: dict, episodes: int, num_envs: int, seed: int, env_overrides: dict) -> dict:
    from pirl.algos.stats import wilson_interval
    from pirl.train.rl import build_agent, make_env, processor_for
    from pirl.train.rl_core import SamplerConfig, collect_rollout, exploration_std_raw

    sampler = SamplerConfig(num_steps=4, **setting)
    agent = build_agent(checkpoint, sampler, "expert")
    processor = processor_for(checkpoint, {})
    env_cfg = {"simulator": "maniskill", "task": "PickCube-v1", "obs_mode": "state", "control_mode": "pd_ee_delta_pose",
               "max_episode_steps": 100, **env_overrides}
    wins, explore, started, steps = [], [], time.perf_counter(), 0
    with make_env(env_cfg, num_envs, seed) as env:
        for start in range(seed, seed + episodes, num_envs):
            obs = env.reset(start)
            batch, _ = collect_rollout(agent, processor, env, obs, 20, 5, sampler, torch.Generator().manual_seed(start))
            wins += batch.first_episode_success.tolist()[: seed + episodes - start]
            explore.append(exploration_std_raw(batch.chain, batch.mask_dims, processor.action_scale()))
            steps += batch.env_steps
    k, n = int(sum(wins)), len(wins)
    low, high = wilson_interval(k, n)
    return {"setting": setting, "episodes": n, "successes": k, "success_rate": k / n, "ci95": [low, high],
            "explore_std_raw_per_dim": np.mean(explore, 0).round(5).tolist(), "seconds": time.perf_counter() - started,
            "env_steps": steps}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--settings", nargs="+", required=True, help='e.g. "a_noise=0.5" "explore_std=0.05,mask_low=-1"')
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--num-envs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=20_000, help="validation seeds (disjoint from eval's 10000+)")
    parser.add_argument("--out", default=str(RESULTS / "exploration"))
    args = parser.parse_args(argv)
    rows = []
    for text in args.settings:
        rows.append({"label": text, **run(args.checkpoint, parse_setting(text), args.episodes, args.num_envs, args.seed, {})})
        print(json.dumps(rows[-1]))
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"checkpoint": args.checkpoint, "rows": rows}, indent=2))
    lines = [f"Checkpoint `{args.checkpoint}`, PickCube-v1 (state, pd_ee_delta_pose, 100 steps), K = 4, seeds "
             f"{args.seed}..{args.seed + args.episodes - 1}, first episode per env. Exploration std per action dim "
             "in raw units (1 raw = 0.1 m or 0.1 rad per step; gripper in [-1, 1]).", "",
             "| sampler | rollout success | 95% interval | exploration std per dim (raw) | mean over xyz (mm/step) |",
             "|---|---|---|---|---|"]
    for r in rows:
        xyz_mm = 100.0 * float(np.mean(r["explore_std_raw_per_dim"][:3]))
        lines.append(f"| {r['label']} | {r['successes']}/{r['episodes']} = {r['success_rate']:.2f} | "
                     f"[{r['ci95'][0]:.2f}, {r['ci95'][1]:.2f}] | {r['explore_std_raw_per_dim']} | {xyz_mm:.2f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
