"""Where a PickCube policy fails: per episode, did it grasp the cube, bring it within the goal radius,
succeed, and how far from the goal did a grasped cube end? For one or more checkpoints on the same
fixed seeds and initial noises (ODE sampling), so an SFT policy and its RL fine-tune compare directly.

Each episode runs in one in-process ManiSkill env (CPU sim) until success (the episode ends there) or
`--max-steps`. Because the state observation carries no clock, one run to a long limit also gives the
success rate at every shorter limit (`success by step`): it separates "too slow" from "stuck".

    python3 bench/failure_modes.py --checkpoints assets/pickcube_tiny_sft assets/pickcube_tiny_sft_18k_step6k

Writes bench/results/failure_modes.{json,md} (or --out).
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
HORIZONS = (50, 75, 100, 150, 200)
GOAL_RADIUS = 0.025  # PickCube's goal_thresh
GOAL_MINUS_CUBE = slice(39, 42)  # PickCube's state: goal position - cube position (obj_to_goal_pos)
HIGH_GOAL_Z = 0.245  # the top quarter of PickCube's goal heights (0.02-0.32 m above the table)


def run_episode(env, policy, processor, seed: int, max_steps: int, n_exec: int, num_steps: int,
                trace: bool = False) -> dict:
    """One ODE episode; first step of grasp / placement / success and the cube's goal distances.
    `trace`: also record, per chunk, what the policy saw and commanded in the env's units
    (`chunk_trace`)."""
    raw = env.raw_env.unwrapped
    generator = torch.Generator().manual_seed(seed)
    obs, _ = env.reset(seed, hard=True)  # a fresh scene, as evaluation resets: cheap resets carry PhysX state over
    rec = {"seed": seed, "first_grasp": None, "first_placed": None, "first_success": None,
           "min_goal_dist": float("inf"), "final_goal_dist": float("nan"), "steps": 0,
           "goal_z": float(raw.goal_site.pose.p[0, 2]), "clipped_dims": set(),
           "cube_xy": [float(v) for v in raw.cube.pose.p[0, :2]], "goal_dists": [], "grasped": [], "cube_z": []}
    if trace:
        rec["trace"] = []
    cfg = policy.config
    while rec["steps"] < max_steps and rec["first_success"] is None:
        inputs = processor({"images": {}, "state": obs["state"][None], "prompt": [obs["prompt"]]})
        rec["clipped_dims"] |= clipped_state_dims(obs["state"], processor.norm_stats["state"], processor.norm_mode)
        noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=generator)
        with torch.no_grad():
            chunk = processor.unnormalize_actions(policy.sample_actions(inputs, noise=noise, num_steps=num_steps))
        if trace:
            rec["trace"].append(chunk_trace(rec["steps"], raw, obs["state"], chunk[0], processor))
        for action in np.asarray(chunk[0, :n_exec]):
            obs, _, terminated, truncated, _ = env.step(action)
            step, done = rec["steps"], terminated or truncated
            rec["steps"] += 1
            flags = raw.evaluate()
            dist = float(torch.linalg.norm(raw.goal_site.pose.p - raw.cube.pose.p, dim=1)[0])
            rec["min_goal_dist"] = min(rec["min_goal_dist"], dist)
            rec["final_goal_dist"] = dist
            rec["goal_dists"].append(dist)
            rec["grasped"].append(bool(flags["is_grasped"][0]))
            rec["cube_z"].append(float(raw.cube.pose.p[0, 2]))
            for key, flag in (("first_grasp", "is_grasped"), ("first_placed", "is_obj_placed"),
                              ("first_success", "success")):
                if rec[key] is None and bool(flags[flag][0]):
                    rec[key] = step
            if done or rec["steps"] >= max_steps:
                break
    rec["clipped_dims"] = sorted(rec["clipped_dims"])
    rec["failure"] = failure_kind(rec)
    for key in ("goal_dists", "grasped", "cube_z"):  # per-step traces: only for the classification
        del rec[key]
    return rec


def chunk_trace(step: int, raw, state: np.ndarray, chunk, processor) -> dict:
    """One chunk as the env sees it: goal - cube (cm), the first commanded action's xyz (mm per step;
    pd_ee_delta_pose: 1.0 = 0.1 m) and gripper, whether the cube is held, and the normalised relative
    dims (goal - cube, 39-41) as computed and as the policy got them after the clip."""
    from vla.normalize import normalize, normalize_unclipped

    stats = processor.norm_stats["state"]
    seen = normalize(state, stats, processor.norm_mode)
    unclipped = normalize_unclipped(state, stats, stats.resolved_mode(processor.norm_mode))
    first = np.asarray(chunk[0], dtype=np.float64)
    return {"step": step, "grasped": bool(raw.evaluate()["is_grasped"][0]),
            "goal_minus_cube_cm": [round(float(v) * 100, 2) for v in raw.goal_site.pose.p[0] - raw.cube.pose.p[0]],
            "action_xyz_mm": [round(float(v) * 100, 2) for v in first[:3]], "gripper": round(float(first[6]), 3),
            "goal_minus_cube_normalised": [round(float(v), 3) for v in unclipped[GOAL_MINUS_CUBE]],
            "goal_minus_cube_seen": [round(float(v), 3) for v in seen[GOAL_MINUS_CUBE]]}


def failure_kind(rec: dict, limit: int = 100) -> str | None:
    """What a failed episode (no success within `limit` steps) was doing at step `limit`:
    never_grasped; lost (grasped once, not holding at the end: dropped, or closed on nothing);
    overshoot (holding the cube more than a goal radius above the goal); approaching (holding it,
    its goal distance shrank by more than 1 cm over the last 10 steps: too slow); stuck (holding it,
    not approaching). None for a success within the limit."""
    if rec["first_success"] is not None and rec["first_success"] < limit:
        return None
    if rec["first_grasp"] is None or rec["first_grasp"] >= limit:
        return "never_grasped"
    last = min(limit, len(rec["goal_dists"])) - 1
    if not rec["grasped"][last]:
        return "lost"
    if rec["cube_z"][last] > rec["goal_z"] + GOAL_RADIUS:
        return "overshoot"
    dists = rec["goal_dists"]
    return "approaching" if last >= 10 and dists[last - 10] - dists[last] > 0.01 else "stuck"


def clipped_state_dims(state: np.ndarray, stats, mode) -> set[int]:
    """Kept state dims whose normalised value sits at the clip: the policy cannot tell values beyond
    it apart (a symmetric ±3 clip cuts the cube's height above ~0.2 m at PickCube's high goals)."""
    from vla.normalize import normalize, normalize_unclipped

    cut = np.abs(normalize(state, stats, mode) - normalize_unclipped(state, stats, stats.resolved_mode(mode))) > 1e-6
    return {int(d) for d in np.flatnonzero(cut) if d not in stats.drop}


def summarize(records: list[dict]) -> dict:
    """Rates of each outcome, success by step limit, and where the grasped failures stopped."""
    n = len(records)
    grasped = [r for r in records if r["first_grasp"] is not None]
    stuck = [r for r in grasped if r["first_success"] is None]
    succ_steps = [r["first_success"] for r in records if r["first_success"] is not None]
    high = [r for r in records if r["goal_z"] > HIGH_GOAL_Z]
    return {
        "episodes": n,
        "success": len(succ_steps) / n,
        "success_by_step": {h: sum(s < h for s in succ_steps) / n for h in HORIZONS},
        "never_grasped": (n - len(grasped)) / n,
        "grasped_not_success": len(stuck) / n,
        "median_first_grasp": float(np.median([r["first_grasp"] for r in grasped])) if grasped else None,
        "median_first_success": float(np.median(succ_steps)) if succ_steps else None,
        "grasped_failures_final_goal_dist_quartiles":
            [float(q) for q in np.percentile([r["final_goal_dist"] for r in stuck], [25, 50, 75])] if stuck else None,
        "grasped_failures_min_goal_dist_median":
            float(np.median([r["min_goal_dist"] for r in stuck])) if stuck else None,
        "high_goals": len(high),
        "success_high_goals": sum(r["first_success"] is not None for r in high),
        "success_other_goals": sum(r["first_success"] is not None for r in records if r not in high),
        "episodes_with_clipped_state": sum(bool(r["clipped_dims"]) for r in records),
        "failures_at_100_steps": {kind: sum(r["failure"] == kind for r in records) for kind in FAILURE_KINDS},
        "edge_cubes": sum(is_edge(r) for r in records),
        "failures_at_100_steps_edge_cubes": sum(is_edge(r) and r["failure"] is not None for r in records),
    }


FAILURE_KINDS = ("never_grasped", "lost", "overshoot", "approaching", "stuck")
EDGE = 0.08  # a cube spawned within 2 cm of the edge of its +-0.1 m square (as bench/initial_states.py)


def is_edge(rec: dict) -> bool:
    return max(abs(v) for v in rec["cube_xy"]) >= EDGE


def print_trace(label: str, rec: dict) -> None:
    print(f"{label} seed {rec['seed']}: {rec['failure'] or 'success'}, goal z {rec['goal_z']:.3f} m")
    print("  step held  goal-cube (cm)          action xyz (mm/step)   grip   goal-cube normalised (seen)")
    for t in rec["trace"]:
        print(f"  {t['step']:4d} {int(t['grasped']):4d}  {str(t['goal_minus_cube_cm']):23s} "
              f"{str(t['action_xyz_mm']):22s} {t['gripper']:+.2f}  {t['goal_minus_cube_normalised']} "
              f"({t['goal_minus_cube_seen']})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoints", nargs="+", default=[str(ROOT / "assets" / "pickcube_tiny_sft")])
    parser.add_argument("--labels", nargs="*", default=None, help="one name per checkpoint for the table")
    parser.add_argument("--episodes", type=int, default=64)
    parser.add_argument("--seed", type=int, default=10000, help="episode i uses seed + i (env and noise)")
    parser.add_argument("--max-steps", type=int, default=max(HORIZONS))
    parser.add_argument("--n-exec", type=int, default=5)
    parser.add_argument("--num-steps", type=int, default=4)
    parser.add_argument("--trace", type=int, nargs="*", default=[],
                        help="episode indices whose per-chunk trace (env units) is printed and kept in the JSON")
    parser.add_argument("--out", default=str(RESULTS / "failure_modes"))
    args = parser.parse_args(argv)
    labels = args.labels or [Path(c).name for c in args.checkpoints]
    if len(labels) != len(args.checkpoints):
        parser.error("--labels needs one name per checkpoint")
    torch.set_num_threads(1)

    from envs.config import ManiSkillConfig
    from envs.maniskill import ManiSkillSingleEnv
    from pirl.train.rl import processor_for
    from vla.checkpoint import load_policy

    env = ManiSkillSingleEnv(ManiSkillConfig.from_dict(dict(
        task="PickCube-v1", num_envs=1, obs_mode="state", control_mode="pd_ee_delta_pose",
        reward_mode="sparse", max_episode_steps=args.max_steps)))
    results = {}
    try:
        for label, checkpoint in zip(labels, args.checkpoints):
            policy, _ = load_policy(checkpoint)
            policy.eval()
            processor = processor_for(checkpoint, {})
            records = [run_episode(env, policy, processor, args.seed + i, args.max_steps, args.n_exec,
                                   args.num_steps, trace=i in args.trace) for i in range(args.episodes)]
            for rec in records:
                if "trace" in rec:
                    print_trace(label, rec)
            results[label] = {"checkpoint": str(checkpoint), "summary": summarize(records), "episodes": records}
            print(label, json.dumps(results[label]["summary"]), flush=True)
    finally:
        env.close()

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"task": "PickCube-v1", "episodes": args.episodes, "seed": args.seed, "max_steps": args.max_steps,
            "n_exec": args.n_exec, "num_steps": args.num_steps}
    out.with_suffix(".json").write_text(json.dumps({"settings": meta, "results": results}, indent=2))
    head = ("| checkpoint | success | " + " | ".join(f"by step {h}" for h in HORIZONS)
            + " | never grasped | grasped, no success | final goal distance of those (m, quartiles) "
            + f"| success, goals above {HIGH_GOAL_Z} m | success, other goals | episodes with a state dim at its clip |")
    rows = [head, "|" + "---|" * (8 + len(HORIZONS))]
    for label, res in results.items():
        s = res["summary"]
        q = s["grasped_failures_final_goal_dist_quartiles"]
        rows.append(f"| {label} | {s['success']:.2f} | "
                    + " | ".join(f"{s['success_by_step'][h]:.2f}" for h in HORIZONS)
                    + f" | {s['never_grasped']:.2f} | {s['grasped_not_success']:.2f} | "
                    + (" / ".join(f"{x:.3f}" for x in q) if q else "-")
                    + f" | {s['success_high_goals']}/{s['high_goals']} | {s['success_other_goals']}/"
                    f"{s['episodes'] - s['high_goals']} | {s['episodes_with_clipped_state']} |")
    table = "\n".join(rows)
    kinds = ["| checkpoint | failed at 100 steps | of them, edge cubes | " + " | ".join(FAILURE_KINDS) + " |",
             "|" + "---|" * (3 + len(FAILURE_KINDS))]
    for label, res in results.items():
        s = res["summary"]
        counts = s["failures_at_100_steps"]
        kinds.append(f"| {label} | {sum(counts.values())} | {s['failures_at_100_steps_edge_cubes']} | "
                     + " | ".join(str(counts[k]) for k in FAILURE_KINDS) + " |")
    kinds_table = "\n".join(kinds)
    edge_counts = " / ".join(str(r["summary"]["edge_cubes"]) for r in results.values())
    out.with_suffix(".md").write_text(
        f"# PickCube failure modes\n\n{args.episodes} episodes per checkpoint, seeds {args.seed}.., ODE at "
        f"K = {args.num_steps}, {args.n_exec} actions per chunk, run to success or {args.max_steps} steps "
        f"(success by step h = success within an h-step limit). `python3 bench/failure_modes.py`.\n\n"
        f"{table}\n\nThe goal radius is {GOAL_RADIUS} m. A grasped failure whose final distance is well above it "
        "and does not shrink with a longer limit is stuck, not slow.\n\n"
        f"What the episodes that had not succeeded by step 100 (the env's limit) were doing then "
        f"(`failure_kind`): never grasped; lost (grasped once, not holding: dropped or closed on "
        f"nothing); overshoot (holding the cube more than a goal radius above the goal); approaching "
        f"(holding it, 1 cm closer than 10 steps before); stuck (holding it, not approaching). Edge "
        f"cubes: spawned with max(|x|, |y|) >= {EDGE} m ({edge_counts} of the episodes).\n\n{kinds_table}\n")
    print(table)
    print(kinds_table)


if __name__ == "__main__":
    main()
