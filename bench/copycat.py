"""Does a PickCube policy move because of where the goal is, or because the arm is already moving?

Behaviour cloning from smooth planner demos can learn the shortcut "keep doing what the joint
velocities say" (the copycat problem): in the demos the next action is almost a function of the
current velocity. Such a policy that slows down once stays slow. This script measures it:

1. ODE episodes of a checkpoint on fixed seeds (K = 4, 5 actions per chunk, 100 steps), recording the
   normalised state and the commanded hand motion per step;
2. stalled failures: the cube not at the goal and the commanded hand motion under 3 mm per step
   over the last 10 steps;
3. for each stalled final state, the commanded motion (mm per step, and its component toward the goal)
   of the same policy and noise with (a) the state as it is, (b) only the joint velocities (state dims
   9-17) replaced by those of the fastest step in the episode's last 40 steps, (c) only the joint
   velocities set to the data mean (normalised 0).

If (b) moves the hand several times faster than (a) while the goal is where it was, the velocity input
drives the motion. A policy trained without the velocity dims (`state_drop`) is the control: there
(b) and (c) must equal (a).

    python3 bench/copycat.py --checkpoints assets/pickcube_tiny_sft_v3 runs/sft_noqvel/checkpoints/step_0004000

Writes bench/results/copycat.{json,md} (or --out).
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
JOINT_VELOCITY_DIMS = slice(9, 18)  # PickCube state: qpos 0-8, qvel 9-17, ..., tcp->obj 36-38, obj->goal 39-41
STALL_MM = 3.0
MM_PER_RAW = 100.0  # pd_ee_delta_pose: 1.0 raw = 0.1 m


class Chunker:
    """The checkpoint's ODE chunk for a normalised state, with a fixed initial noise per call site."""

    def __init__(self, checkpoint: str):
        from pirl.train.rl import processor_for
        from vla.checkpoint import load_policy

        self.policy, _ = load_policy(checkpoint)
        self.policy.eval()
        self.processor = processor_for(checkpoint, {})

    def __call__(self, raw_state: np.ndarray, prompt: str, noise: torch.Tensor) -> np.ndarray:
        inputs = self.processor({"images": {}, "state": raw_state[None].astype(np.float32), "prompt": [prompt]})
        with torch.no_grad():
            chunk = self.policy.sample_actions(inputs, noise=noise, num_steps=4)
        return np.asarray(self.processor.unnormalize_actions(chunk))[0]

    def noise(self, seed: int) -> torch.Tensor:
        cfg = self.policy.config
        return torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(seed))


def run_episode(env, chunker: Chunker, seed: int, max_steps: int = 100, n_exec: int = 5) -> dict:
    obs, _ = env.reset(seed, hard=True)  # a fresh scene, as evaluation resets
    raw_env, generator = env.raw_env.unwrapped, torch.Generator().manual_seed(seed)
    states, actions, success = [], [], False
    cfg = chunker.policy.config
    while len(actions) < max_steps and not success:
        noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=generator)
        chunk = chunker(obs["state"], obs["prompt"], noise)
        for action in chunk[:n_exec]:
            states.append(np.asarray(obs["state"], np.float64))
            actions.append(action[:3] * MM_PER_RAW)
            obs, _, terminated, truncated, _ = env.step(action)
            success = bool(raw_env.evaluate()["success"][0])
            if success or terminated or truncated or len(actions) >= max_steps:
                break
    goal_distance = float(torch.linalg.norm(raw_env.goal_site.pose.p - raw_env.cube.pose.p, dim=1)[0])
    return {"seed": seed, "success": success, "states": states, "hand_mm": actions, "prompt": obs["prompt"],
            "final_state": np.asarray(obs["state"], np.float64), "goal_distance": goal_distance}


def motion(chunk: np.ndarray, toward: np.ndarray, n_exec: int = 5) -> tuple[float, float]:
    """Mean commanded hand motion over the executed actions (mm / step) and its component toward the goal."""
    xyz = chunk[:n_exec, :3] * MM_PER_RAW
    return float(np.linalg.norm(xyz, axis=1).mean()), float((xyz @ toward).mean())


def counterfactuals(chunker: Chunker, ep: dict) -> dict:
    """The stalled final state's commanded motion as is, with moving joint velocities, with mean ones."""
    state = ep["final_state"]
    toward = state[36:39] + state[39:42]  # goal - tcp = (obj - tcp) + (goal - obj)
    toward = toward / max(np.linalg.norm(toward), 1e-9)
    recent = range(max(0, len(ep["states"]) - 40), len(ep["states"]))
    fastest = max(recent, key=lambda i: np.linalg.norm(ep["hand_mm"][i]))
    moving = state.copy()
    moving[JOINT_VELOCITY_DIMS] = ep["states"][fastest][JOINT_VELOCITY_DIMS]
    mean_velocity = state.copy()
    mean_velocity[JOINT_VELOCITY_DIMS] = np.asarray(chunker.processor.norm_stats["state"].mean)[JOINT_VELOCITY_DIMS]
    noise = chunker.noise(ep["seed"])
    out = {"seed": ep["seed"], "goal_distance_cm": 100 * ep["goal_distance"], "fastest_step": fastest}
    for name, s in (("as_is", state), ("moving_velocities", moving), ("mean_velocities", mean_velocity)):
        out[name] = motion(chunker(s, ep["prompt"], noise), toward)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=["assets/pickcube_tiny_sft_v3"])
    parser.add_argument("--episodes", type=int, default=40)
    parser.add_argument("--seed", type=int, default=10000)
    parser.add_argument("--out", default=str(RESULTS / "copycat"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from envs.config import ManiSkillConfig
    from envs.maniskill import ManiSkillSingleEnv

    env = ManiSkillSingleEnv(ManiSkillConfig.from_dict(dict(
        task="PickCube-v1", num_envs=1, obs_mode="state", control_mode="pd_ee_delta_pose",
        reward_mode="sparse", max_episode_steps=100)))
    results = {}
    try:
        for checkpoint in args.checkpoints:
            chunker = Chunker(checkpoint)
            episodes = [run_episode(env, chunker, args.seed + i) for i in range(args.episodes)]
            stalled = [e for e in episodes if not e["success"]
                       and np.linalg.norm(e["hand_mm"][-10:], axis=1).mean() < STALL_MM]
            rows = [counterfactuals(chunker, e) for e in stalled]
            results[checkpoint] = {"episodes": len(episodes), "successes": sum(e["success"] for e in episodes),
                                   "stalled": len(stalled), "rows": rows}
            print(checkpoint, {k: v for k, v in results[checkpoint].items() if k != "rows"}, flush=True)
    finally:
        env.close()
    write(results, args)


def write(results: dict, args) -> None:
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "results": results}, indent=2))
    lines = ["# Copycat check: what drives a PickCube policy's hand motion", "",
             f"{args.episodes} ODE episodes per checkpoint (seeds {args.seed}.., K = 4, 5 actions per chunk, 100 "
             f"steps); a failure is *stalled* when its commanded hand motion over the last 10 steps is under "
             f"{STALL_MM:.0f} mm per step. For each stalled final state: the commanded motion (mm per step; toward "
             "the goal in brackets) of the same policy and noise with the state as is, with only the joint "
             "velocities (dims 9-17) taken from the episode's fastest recent step, and with them at the data "
             "mean. `python3 bench/copycat.py`.", ""]
    for checkpoint, r in results.items():
        lines += [f"## {checkpoint}: {r['successes']}/{r['episodes']} successes, {r['stalled']} stalled failures", ""]
        if not r["rows"]:
            continue
        lines += ["| seed | cube to goal (cm) | as is | joint velocities of a moving step | joint velocities at the mean |",
                  "|---|---|---|---|---|"]
        for row in r["rows"]:
            cells = [f"{row[k][0]:.1f} ({row[k][1]:+.1f})" for k in ("as_is", "moving_velocities", "mean_velocities")]
            lines.append(f"| {row['seed']} | {row['goal_distance_cm']:.1f} | " + " | ".join(cells) + " |")
        med = {k: np.median([row[k][0] for row in r["rows"]]) for k in ("as_is", "moving_velocities", "mean_velocities")}
        lines += ["", f"Median commanded motion: as is {med['as_is']:.1f}, with moving joint velocities "
                  f"{med['moving_velocities']:.1f}, at the mean {med['mean_velocities']:.1f} mm per step.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
