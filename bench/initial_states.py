"""Which PickCube initial states an evaluated policy fails on: success split by where the cube starts
and where the goal is, for evaluation files that already exist (no policy is run).

`pirl train` and `pirl eval` write one record per episode (`evals/<name>.json`, `per_episode`: seed,
success, return, length). This script resets a ManiSkill PickCube env with each seed to recover the
initial cube and goal positions, then splits every file's successes by: the cube near the edge of its
spawn square (max(abs x, abs y) >= 0.08 m of the +-0.1 m square), the cube on the far side from the robot
(x >= 0.08 m), a high goal (z > 0.245 m), and a long carry (cube-to-goal distance > 0.2 m). Each cell
has its count and a 95% (Wilson) interval.

    python3 bench/initial_states.py --evals start=runs/a/evals/start.json seed0=runs/a/evals/iter_000134.json

Writes bench/results/initial_states.{json,md} (or --out).
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

from pirl.algos.stats import wilson_interval  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SPLITS = {  # name -> predicate on (cube xyz [N, 3], goal xyz [N, 3])
    "cube near the edge (max(abs x, abs y) >= 0.08 m)": lambda c, g: np.abs(c[:, :2]).max(1) >= 0.08,
    "cube on the far side (x >= 0.08 m)": lambda c, g: c[:, 0] >= 0.08,
    "goal high (z > 0.245 m)": lambda c, g: g[:, 2] > 0.245,
    "long carry (cube to goal > 0.2 m)": lambda c, g: np.linalg.norm(g - c, axis=1) > 0.2,
}


def initial_states(seeds: list[int]) -> dict[int, dict]:
    """Cube and goal positions (m, world frame) after resetting PickCube-v1 with each seed."""
    from envs.config import ManiSkillConfig
    from envs.maniskill import ManiSkillSingleEnv

    env = ManiSkillSingleEnv(ManiSkillConfig.from_dict(dict(
        task="PickCube-v1", num_envs=1, obs_mode="state", control_mode="pd_ee_delta_pose",
        reward_mode="sparse", max_episode_steps=100)))
    try:
        out = {}
        for seed in seeds:
            env.reset(seed)
            raw = env.raw_env.unwrapped
            out[seed] = {"cube": [float(x) for x in raw.cube.pose.p[0]], "goal": [float(x) for x in raw.goal_site.pose.p[0]]}
        return out
    finally:
        env.close()


def split_successes(episodes: list[dict], states: dict[int, dict]) -> dict[str, dict]:
    """Per split: successes / episodes inside it and outside it, with intervals."""
    seeds = [e["seed"] for e in episodes]
    ok = np.array([bool(e["success"]) for e in episodes])
    cube = np.array([states[s]["cube"] for s in seeds])
    goal = np.array([states[s]["goal"] for s in seeds])
    out = {}
    for name, predicate in SPLITS.items():
        inside = predicate(cube, goal)
        cells = {}
        for key, mask in (("inside", inside), ("outside", ~inside)):
            n, k = int(mask.sum()), int(ok[mask].sum())
            cells[key] = {"successes": k, "episodes": n, "interval": wilson_interval(k, n) if n else None}
        out[name] = cells
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--evals", nargs="+", required=True, metavar="LABEL=FILE",
                        help="evaluation files (evals/<name>.json of `pirl train`, or `pirl eval`'s JSON)")
    parser.add_argument("--out", default=str(RESULTS / "initial_states"))
    args = parser.parse_args()
    files = dict(item.split("=", 1) for item in args.evals)
    episodes = {label: json.loads(Path(f).read_text())["per_episode"] for label, f in files.items()}
    seeds = sorted({e["seed"] for eps in episodes.values() for e in eps})
    states = initial_states(seeds)
    results = {label: {"file": files[label], "success": sum(bool(e["success"]) for e in eps), "episodes": len(eps),
                       "splits": split_successes(eps, states)} for label, eps in episodes.items()}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps({"initial_states": states, "results": results}, indent=2))

    def cell(c):
        lo, hi = c["interval"] or (float("nan"), float("nan"))
        return f"{c['successes']}/{c['episodes']} = {c['successes'] / max(c['episodes'], 1):.2f} [{lo:.2f}, {hi:.2f}]"

    rows = ["| evaluation | success | " + " | ".join(f"{name}: inside | outside" for name in SPLITS) + " |",
            "|---|---|" + "---|---|" * len(SPLITS)]
    for label, res in results.items():
        rows.append(f"| {label} | {res['success']}/{res['episodes']} | "
                    + " | ".join(f"{cell(res['splits'][n]['inside'])} | {cell(res['splits'][n]['outside'])}"
                                 for n in SPLITS) + " |")
    table = "\n".join(rows)
    out.with_suffix(".md").write_text(
        "# PickCube successes by initial state\n\n`python3 bench/initial_states.py`: the episodes of existing "
        "evaluation files, split by where the cube starts (spawn square +-0.1 m; the robot's base is at "
        "x = -0.615 m, so x >= 0.08 m is the farthest reach) and where the goal is; 95% Wilson intervals.\n\n"
        f"{table}\n")
    print(table)


if __name__ == "__main__":
    main()
