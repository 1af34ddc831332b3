"""Where Flow-SDE's exploration noise goes: how much of the noise injected at denoising step k reaches
the executed action, for a real policy on real observations (METHODS.md §2; `sampler.mask_low`).

For each state along ODE rollouts of the policy, and each step index k: the same initial noise, one
stochastic step at k (noise std_k * xi), the other steps ODE. The executed sub-chunk (n_exec steps x
the real action dims, normalised units) then differs from the ODE chunk by delta. Reported per k:

* `injected std`: std_k, the std of the Gaussian whose log-prob enters the PPO ratio;
* `action std`: the std of delta over noise draws (how much the executed action explores);
* `gain`: the regression slope of delta on std_k * xi, element by element. A PPO sample taken at step
  k only carries outcome signal through this gain, while its score-function gradient ~ xi / std_k
  does not shrink with it. Gain ~ 0 means the sample adds gradient noise and no signal.

    python3 bench/noise_propagation.py [--checkpoint assets/pickcube_tiny_sft] [--envs 8] [--draws 8]

Writes bench/results/noise_propagation.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]


def step_gains(policy, prefix, grid, a_noise: float, draws: int, n_exec: int, dims: int,
               generator: torch.Generator) -> list[dict]:
    """Per step index k: injected std, executed-action std and regression gain (module docstring)."""
    from pirl.flow import SDERule, sample_chain

    cfg = policy.config
    batch = prefix.batch_size
    x0 = torch.randn(batch, cfg.action_horizon, cfg.action_dim, generator=generator)
    ode = sample_chain(policy, prefix=prefix, rule=SDERule(a_noise), grid=grid, step_mask="none", noise=x0)
    rows = []
    for k in range(grid.num_steps):
        shifts, scaled_noise, stds = [], [], []
        for _ in range(draws):
            mask = torch.zeros(batch, grid.num_steps, dtype=torch.bool)
            mask[:, k] = True
            chain = sample_chain(policy, prefix=prefix, rule=SDERule(a_noise), grid=grid, step_mask=mask,
                                 noise=x0, generator=generator)
            injected = chain.latents[:, k + 1] - chain.means  # std_k * xi
            shifts.append((chain.actions - ode.actions)[:, :n_exec, :dims])
            scaled_noise.append(injected[:, :n_exec, :dims])
            stds.append(chain.stds[:, :n_exec, :dims])
        delta, noise, std = torch.stack(shifts), torch.stack(scaled_noise), torch.stack(stds)
        rows.append({
            "step": k,
            "injected_std": float(std.mean()),
            "action_std": float(delta.std(dim=0).mean()),
            "gain": float((delta * noise).mean() / (noise * noise).mean()),
        })
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "assets" / "pickcube_tiny_sft"))
    parser.add_argument("--task", default="PickCube-v1")
    parser.add_argument("--envs", type=int, default=8)
    parser.add_argument("--chunks", type=int, default=16, help="ODE chunks to roll out; measured every 4th")
    parser.add_argument("--n-exec", type=int, default=5)
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--a-noise", type=float, default=0.5)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--out", default=str(RESULTS / "noise_propagation"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from pirl.flow import DenoiseGrid, SDERule, sample_chain
    from pirl.train.rl import make_env, processor_for
    from vla.checkpoint import load_policy

    policy, _ = load_policy(args.checkpoint)
    policy.eval()
    processor = processor_for(args.checkpoint, {})
    dims = int(processor.dim_mask().sum())
    env = make_env({"simulator": "maniskill", "task": args.task, "obs_mode": "state",
                    "control_mode": "pd_ee_delta_pose", "max_episode_steps": 100}, args.envs, 0)
    grid = DenoiseGrid.uniform(args.num_steps)
    generator = torch.Generator().manual_seed(0)
    per_chunk = {}
    try:
        obs = env.reset(12345)
        with torch.no_grad():
            for chunk in range(args.chunks):
                prefix = policy.embed_prefix(processor(obs))
                if chunk % 4 == 0:
                    per_chunk[chunk] = step_gains(policy, prefix, grid, args.a_noise, args.draws, args.n_exec,
                                                  dims, generator)
                    print(f"chunk {chunk}: gains", [round(r["gain"], 3) for r in per_chunk[chunk]], flush=True)
                chain = sample_chain(policy, prefix=prefix, rule=SDERule(args.a_noise), grid=grid,
                                     step_mask="none", generator=generator)
                actions = processor.unnormalize_actions(chain.actions)[:, :args.n_exec]
                obs, *_ = env.step_chunk(actions, args.n_exec)
    finally:
        env.close()

    steps = range(args.num_steps)
    summary = [{key: float(np.mean([per_chunk[c][k][key] for c in per_chunk])) for key in
                ("injected_std", "action_std", "gain")} | {"step": k} for k in steps]
    result = {"checkpoint": str(args.checkpoint), "task": args.task, "envs": args.envs, "draws": args.draws,
              "num_steps": args.num_steps, "a_noise": args.a_noise, "n_exec": args.n_exec,
              "measured_at_chunks": list(per_chunk), "per_chunk": per_chunk, "mean": summary}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    rows = ["| stochastic step k | t_k | injected std | executed-action std | gain (signal per unit of injected noise) |",
            "|---|---|---|---|---|"]
    for row in summary:
        rows.append(f"| {row['step']} | {grid.times[row['step']]:.2f} | {row['injected_std']:.3f} | "
                    f"{row['action_std']:.3f} | {row['gain']:.3f} |")
    table = "\n".join(rows)
    out.with_suffix(".md").write_text(
        f"# Noise propagation: {Path(args.checkpoint).name} on {args.task}\n\n"
        f"Flow-SDE a_noise {args.a_noise}, K = {args.num_steps}, one stochastic step at k, the rest ODE; "
        f"{args.envs} envs x {args.draws} noise draws at chunks {list(per_chunk)} of ODE rollouts; executed "
        f"{args.n_exec} steps x {dims} real dims, normalised units. `python3 bench/noise_propagation.py`.\n\n"
        f"{table}\n\n"
        "How to read it: a PPO sample whose stochastic step is k has a score-function gradient ~ xi / std_k "
        "whatever the gain, but its outcome depends on xi only through the gain. A gain near 0 (noise "
        "the remaining ODE steps pull back to the policy's mode) means that sample adds gradient noise "
        "and almost no signal; `sampler.mask_low=-1` makes every sample's stochastic step the last one. "
        "The executed-action std of early steps exceeds gain x injected std because the expert mixes "
        "elements: the noise moves other elements a little, in directions its own log-prob does not "
        "credit.\n")
    print(table)


if __name__ == "__main__":
    main()
